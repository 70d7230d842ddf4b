"""`lmforge serve --rag INDEX`: chat answers from a knowledge base, with their sources.

The index is built from three real handbook pages with the real all-MiniLM-L6-v2; the
server runs the default model, and the official `openai` client talks to it. Most tests
quote the sources (extractive answers: fast and exact); the test of the served model
writing through the scheduler is marked slow.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import test_webui_browser

from lmforge.errors import LmforgeError
from lmforge.infer.scheduler import Scheduler
from lmforge.rag.answer import REFUSAL
from lmforge.rag.types import Chunk
from lmforge.serve.app import ServeSettings, create_app
from lmforge.serve.rag import KnowledgeBase, source_page
from tests.conftest import live_server

MODEL = "smollm2-135m-instruct"
PAGES = ("kv-cache.md", "attention.md", "decoding.md")
HANDBOOK = Path(__file__).resolve().parents[1] / "docs" / "handbook"
KV_QUESTION = [{"role": "user", "content": "What is a KV cache?"}]
OFF_TOPIC = [{"role": "user", "content": "How do I bake sourdough bread?"}]

browser = test_webui_browser.browser  # headless Chromium (skipped where it is missing, a failure in CI)


@pytest.fixture(scope="module")
def rag_index(tmp_path_factory, minilm_dir):
    """A SQLite index of three handbook pages, embedded by the real MiniLM."""
    from lmforge.rag.embedder import load_embedder
    from lmforge.rag.index import build_index

    pages = tmp_path_factory.mktemp("pages")
    for name in PAGES:
        shutil.copy(HANDBOOK / name, pages / name)
    path = tmp_path_factory.mktemp("index") / "pages.sqlite"
    report = build_index(pages, path, load_embedder())
    assert sorted(report.added) == sorted(PAGES) and report.chunks_total > 20
    return path


@pytest.fixture(scope="module")
def knowledge(rag_index):
    kb = KnowledgeBase.open(str(rag_index))
    yield kb
    kb.close()


@contextlib.contextmanager
def serving(lm, settings: ServeSettings, knowledge=None, store=None, max_seq_len=2048, **scheduler_kwargs):
    """A live server on loopback (uvicorn in a thread) over `lm`, answering from `knowledge`."""
    scheduler = Scheduler(lm.model, lm.tokenizer, max_seq_len=max_seq_len, **scheduler_kwargs).start()
    app = create_app(scheduler, lm.tokenizer, MODEL, settings, store=store, knowledge=knowledge)
    opened = app.state.server.knowledge if knowledge is None else None  # create_app opened it: closed here
    try:
        with live_server(app, scheduler) as url:
            yield url, scheduler
    finally:
        if opened is not None:
            opened.close()


@pytest.fixture(scope="module")
def server(default_lm, knowledge, rag_index):
    settings = ServeSettings(rag=str(rag_index), rag_answer="extractive")
    with serving(default_lm, settings, knowledge, max_batch=4) as (url, scheduler):
        yield url, scheduler


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def cited_numbers(text: str) -> set[int]:
    return {int(n) for n in re.findall(r"\[(\d+)\]", text)}


def check_sources(text: str, sources: list[dict], url: str) -> None:
    """Every [n] of the text is a listed source, and every source is one of the text's [n], linked to its page."""
    assert sources and cited_numbers(text) == {s["number"] for s in sources}
    for s in sources:
        assert set(s) == {"number", "id", "source", "title", "headings", "line_start", "line_end", "url"}
        assert s["url"] == f"{url}/rag/sources/{s['id']}"
        assert s["source"] in PAGES and 1 <= s["line_start"] <= s["line_end"] and s["headings"][0] == s["title"]


# ----------------------------------------------------------------------- answers
def test_openai_client_gets_an_answer_citing_the_kv_cache_page(server, client, knowledge):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=KV_QUESTION)
    body = json.loads(raw.http_response.text)
    r = raw.parse()  # the official client's own model of the response
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.role == "assistant"
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == text
    check_sources(text, body["sources"], server[0])
    assert body["sources"][0]["source"] == "kv-cache.md"  # the first source cited is the page on the question
    assert r.model_extra["sources"] == body["sources"]
    assert body["rag"]["mode"] == "extractive" and not body["rag"]["refused"] and body["rag"]["confidence"] >= 1
    assert r.usage.completion_tokens == 0  # quoted, not generated
    # The quoted sentences are the cited chunks' own words.
    chunks = {s["number"]: knowledge.chunk(s["id"]) for s in body["sources"]}
    for sentence, number in re.findall(r"(.+?) \[(\d+)\]\s*", text):
        words = re.sub(r"[`*]", "", sentence).split()[:6]
        assert " ".join(words) in " ".join(re.sub(r"[`*]", "", chunks[int(number)].text).split()), sentence


def test_streamed_answer_equals_the_whole_one_and_ends_with_the_sources(server, client):
    whole = client.chat.completions.create(model=MODEL, messages=KV_QUESTION)
    chunks = list(client.chat.completions.create(model=MODEL, messages=KV_QUESTION, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert finals[0].model_extra["sources"] == whole.model_extra["sources"]
    assert chunks[-1].usage.total_tokens == 0 and not chunks[-1].choices

    # On the wire: the last chunk before [DONE] carries the sources when no usage chunk follows.
    events = []
    with httpx.stream("POST", server[0] + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": KV_QUESTION, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "stop" and last["sources"] == whole.model_extra["sources"]
    assert all("sources" not in json.loads(e) for e in events[:-2])


def test_out_of_scope_question_gets_the_refusal_without_sources(client):
    r = client.chat.completions.create(model=MODEL, messages=OFF_TOPIC)
    assert r.choices[0].message.content == REFUSAL and r.choices[0].finish_reason == "stop"
    assert r.model_extra["sources"] == [] and r.model_extra["rag"]["refused"] is True
    chunks = list(client.chat.completions.create(model=MODEL, messages=OFF_TOPIC, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == REFUSAL
    assert [c.model_extra["sources"] for c in chunks if "sources" in c.model_extra] == [[]]


def test_the_last_user_message_is_the_question(client):
    conversation = [{"role": "system", "content": "You are a pirate."}, *OFF_TOPIC,
                    {"role": "assistant", "content": REFUSAL}, *KV_QUESTION]
    r = client.chat.completions.create(model=MODEL, messages=conversation)
    assert r.choices[0].message.content == client.chat.completions.create(
        model=MODEL, messages=KV_QUESTION).choices[0].message.content


def test_rag_false_talks_to_the_bare_model(client, default_lm):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=question, temperature=0, max_tokens=30,
                                       extra_body={"rag": False})
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert "sources" not in r.model_extra and r.usage.completion_tokens == 7
    kv = client.chat.completions.create(model=MODEL, messages=KV_QUESTION, temperature=0, max_tokens=12,
                                        extra_body={"rag": False})
    assert "sources" not in kv.model_extra
    assert kv.choices[0].message.content == default_lm.chat(KV_QUESTION, temperature=0, max_tokens=12)


def test_concurrent_answers_match_sequential_ones(server, client):
    questions = [KV_QUESTION, OFF_TOPIC, [{"role": "user", "content": "What does top-p sampling do?"}]]
    alone = [client.chat.completions.create(model=MODEL, messages=q).choices[0].message.content for q in questions]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        results[i] = client.chat.completions.create(model=MODEL, messages=questions[i % 3]).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i] for i in range(6)] == alone * 2
    assert "decoding.md" in {s["source"] for s in client.chat.completions.create(
        model=MODEL, messages=questions[2]).model_extra["sources"]}


def test_answers_are_counted_by_mode(server, client):
    def count(mode: str) -> float:
        text = httpx.get(server[0] + "/metrics").text
        found = re.search(rf'^lmforge_rag_answers_total{{mode="{mode}"}} (\S+)$', text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    before = count("refused"), count("extractive")
    client.chat.completions.create(model=MODEL, messages=OFF_TOPIC)
    client.chat.completions.create(model=MODEL, messages=KV_QUESTION)
    assert (count("refused"), count("extractive")) == (before[0] + 1, before[1] + 1)
    assert httpx.get(server[0] + "/health").json()["knowledge_base"] is True


# ------------------------------------------------------------------- bad requests
@pytest.mark.parametrize(
    "payload, status, param",
    [
        ({"messages": KV_QUESTION, "rag": "yes"}, 422, "rag"),
        ({"messages": KV_QUESTION, "rag": 1}, 422, "rag"),
        ({"messages": KV_QUESTION, "n": 2}, 400, "n"),
        ({"messages": KV_QUESTION, "logprobs": True}, 400, "logprobs"),
        ({"messages": KV_QUESTION, "response_format": {"type": "json_object"}}, 400, "response_format"),
        ({"messages": [{"role": "system", "content": "Be brief."}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "   "}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "kv cache " * 2000}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
         "messages"),
        ({"messages": []}, 422, "messages"),
        ({"messages": KV_QUESTION, "max_tokens": 100000}, 400, "max_tokens"),
        ({"messages": KV_QUESTION, "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": KV_QUESTION, "stop": [""]}, 400, "stop"),
        ({"messages": KV_QUESTION, "temperature": 5}, 422, "temperature"),
        ({"model": "gpt-9", "messages": KV_QUESTION}, 404, "model"),
    ],
)
def test_bad_bodies_get_openai_error_bodies(server, payload, status, param):
    r = httpx.post(server[0] + "/v1/chat/completions", json={"model": MODEL, **payload}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"].split(".")[0] == param


def test_malformed_json_and_a_server_without_knowledge_base(default_lm, server):
    r = httpx.post(server[0] + "/v1/chat/completions", content=b'{"messages": [', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["message"]
    with serving(default_lm, ServeSettings(), max_batch=1) as (url, _):
        r = httpx.post(url + "/v1/chat/completions", json={"messages": KV_QUESTION, "rag": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "rag"
        assert httpx.get(url + "/v1/rag/sources/0123456789abcdef").status_code == 404
        assert httpx.get(url + "/rag/sources/0123456789abcdef").status_code == 404
        assert httpx.get(url + "/health").json()["knowledge_base"] is False
        r = httpx.post(url + "/v1/chat/completions", json={"messages": KV_QUESTION, "rag": False, "max_tokens": 2})
        assert r.status_code == 200 and "sources" not in r.json()


def test_a_full_queue_is_429_or_an_error_event(default_lm, knowledge, rag_index):
    settings = ServeSettings(rag=str(rag_index), rag_answer="generate")
    with serving(default_lm, settings, knowledge, max_batch=1, max_waiting=0) as (url, _):  # no room to wait
        r = httpx.post(url + "/v1/chat/completions", json={"messages": KV_QUESTION}, timeout=60)
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
        r = httpx.post(url + "/v1/chat/completions", json={"messages": KV_QUESTION, "stream": True}, timeout=60)
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert r.status_code == 200 and events[-1]["error"]["code"] == "queue_full"
        assert not any("sources" in e for e in events)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": OFF_TOPIC}, timeout=60)
        assert r.status_code == 200 and r.json()["rag"]["refused"]  # a refusal needs no generation


# ----------------------------------------------------------------------- sources
def test_source_endpoints_return_the_cited_chunk(server, client, knowledge):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "How does attention "
                                                                                      "weigh the values?"}])
    source = r.model_extra["sources"][0]
    chunk = knowledge.chunk(source["id"])
    got = httpx.get(f"{server[0]}/v1/rag/sources/{source['id']}").json()
    assert got["object"] == "rag.source" and got["url"] == source["url"]
    assert (got["id"], got["text"], got["source"], got["headings"], got["line_start"], got["line_end"]) == \
        (chunk.id, chunk.text, chunk.source, list(chunk.headings), chunk.line_start, chunk.line_end)
    assert got["metadata"]["title"] == chunk.title == source["title"]

    page = httpx.get(source["url"])
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src" not in page.headers["content-security-policy"]  # no script may run at all
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    import html

    assert html.escape(chunk.text) in page.text and html.escape(chunk.title) in page.text


def test_source_page_escapes_markup_in_the_text(server, knowledge):
    chunk = next(c for c in knowledge.store.all_chunks() if "<" in c.text and '"' in c.text)
    page = httpx.get(f"{server[0]}/rag/sources/{chunk.id}").text
    body = page.split("<main>", 1)[1]
    assert chunk.text not in body  # the raw text would carry a live "<"
    assert chunk.text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;") \
        .replace("'", "&#x27;") in body


def test_source_page_escapes_every_field():
    hostile = Chunk(source="javascript:alert(1)//x.md", text='</pre><script>alert("x")</script> & more',
                    headings=("<img src=x onerror=alert(1)>", "<b>bold</b>"), line_start=3, line_end=9,
                    metadata={"title": "<title>t</title>"})
    page = source_page(hostile)
    for raw in ("<script>", "<img", "<b>", "</pre><", "<title>t", "href=\"javascript"):
        assert raw not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; more" in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "lines 3\u20139" in page
    web = source_page(Chunk(source="https://example.org/a?b=1&c=2", text="x"))
    assert '<a href="https://example.org/a?b=1&amp;c=2"' in web


@pytest.mark.parametrize("path", ["/v1/rag/sources/0123456789abcdef", "/v1/rag/sources/" + "f" * 300,
                                  "/v1/rag/sources/%3Cscript%3E", "/rag/sources/0123456789abcdef",
                                  "/rag/sources/%3Cscript%3E"])
def test_unknown_sources_are_404(server, path):
    r = httpx.get(server[0] + path)
    assert r.status_code == 404
    if path.startswith("/v1/"):
        assert r.json()["error"]["type"] == "not_found_error"
    else:
        assert "<script>" not in r.text and "Source not found" in r.text


def test_source_api_needs_the_key_when_the_server_has_keys(default_lm, knowledge, rag_index):
    settings = ServeSettings(rag=str(rag_index), rag_answer="extractive", api_keys=["k1"])
    with serving(default_lm, settings, knowledge, max_batch=1) as (url, _):
        anyone = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            anyone.chat.completions.create(model=MODEL, messages=KV_QUESTION)
        r = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0).chat.completions.create(
            model=MODEL, messages=KV_QUESTION)
        source = r.model_extra["sources"][0]
        assert httpx.get(f"{url}/v1/rag/sources/{source['id']}").status_code == 401
        assert httpx.get(f"{url}/v1/rag/sources/{source['id']}", headers={"Authorization": "Bearer k1"}).json()[
            "id"] == source["id"]
        assert httpx.get(source["url"]).status_code == 200  # the page is a link: its id is the capability


# ------------------------------------------------- the web chat's store keeps sources
OLD_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE conversations (id TEXT PRIMARY KEY, created REAL NOT NULL, updated REAL NOT NULL,
                            title TEXT NOT NULL DEFAULT '', model TEXT, settings TEXT NOT NULL DEFAULT '{}');
CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL REFERENCES conversations (id)
                       ON DELETE CASCADE, idx INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL,
                       created REAL NOT NULL, UNIQUE (conversation_id, idx));
CREATE TABLE feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, message_id INTEGER NOT NULL UNIQUE REFERENCES messages (id)
                       ON DELETE CASCADE, rating INTEGER NOT NULL, comment TEXT NOT NULL DEFAULT '', created REAL NOT NULL);
INSERT INTO schema_version VALUES (1);
INSERT INTO conversations VALUES ('c1', 1.0, 1.0, 'old', NULL, '{}');
INSERT INTO messages VALUES (1, 'c1', 0, 'user', 'What is a KV cache?', 1.0);
INSERT INTO messages VALUES (2, 'c1', 1, 'assistant', 'It stores keys and values. [1]', 1.0);
INSERT INTO feedback VALUES (1, 2, 1, '', 1.0);
"""

SOURCE = {"number": 1, "id": "754f7afe0bfe738f", "source": "kv-cache.md", "title": "The KV cache",
          "headings": ["The KV cache", "What it is"], "line_start": 6, "line_end": 18,
          "url": "http://127.0.0.1:8000/rag/sources/754f7afe0bfe738f"}


def test_feedback_store_keeps_an_answers_sources_and_migrates_older_files(tmp_path):
    import sqlite3

    from lmforge.serve.feedback import SCHEMA_VERSION, FeedbackStore

    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as raw:
        raw.executescript(OLD_SCHEMA)
    with FeedbackStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION == 2
        old = store.get_conversation("c1")["messages"]
        assert [m["sources"] for m in old] == [None, None] and old[1]["feedback"]["rating"] == 1
        added = store.append_messages("c1", [{"role": "user", "content": "And paging?"},
                                             {"role": "assistant", "content": "Blocks. [1]", "sources": [SOURCE]}])
        assert [m["sources"] for m in added] == [None, [SOURCE]]
        assert store.get_conversation("c1")["messages"][-1]["sources"] == [SOURCE]
        store.add_feedback(added[-1]["id"], -1, "wrong page")
        assert [r["sources"] for r in store.export()] == [None, [SOURCE]]
        with pytest.raises(ValueError, match="assistant"):
            store.append_messages("c1", [{"role": "user", "content": "x", "sources": [SOURCE]}])
    with FeedbackStore(path) as again:  # reopened: already current, nothing migrated twice
        assert again.schema_version == 2 and again.get_conversation("c1")["message_count"] == 4


def test_web_chat_api_stores_sources_with_answers(default_lm, knowledge, rag_index, tmp_path):
    from lmforge.serve.feedback import FeedbackStore

    store = FeedbackStore(tmp_path / "chat.db")
    settings = ServeSettings(rag=str(rag_index), rag_answer="extractive")
    with serving(default_lm, settings, knowledge, store=store, max_batch=1) as (url, _):
        conv = httpx.post(url + "/api/conversations", json={"messages": KV_QUESTION}).json()
        answer = httpx.post(url + "/v1/chat/completions", json={"messages": KV_QUESTION}).json()
        message = {"role": "assistant", "content": answer["choices"][0]["message"]["content"],
                   "sources": [{**s, "later_field": 1} for s in answer["sources"]]}
        r = httpx.post(f"{url}/api/conversations/{conv['id']}/messages", json={"messages": [message]})
        assert r.status_code == 201 and r.json()["data"][0]["sources"] == answer["sources"]
        got = httpx.get(f"{url}/api/conversations/{conv['id']}").json()["messages"]
        assert got[-1]["sources"] == answer["sources"] and got[0]["sources"] is None
        for bad in ({"role": "user", "content": "x", "sources": answer["sources"]},
                    {"role": "assistant", "content": "x", "sources": [{"number": "1", "id": "a", "source": "b"}]},
                    {"role": "assistant", "content": "x", "sources": [{"number": 1, "source": "b"}]},
                    {"role": "assistant", "content": "x", "sources": [SOURCE] * 65}):
            r = httpx.post(f"{url}/api/conversations/{conv['id']}/messages", json={"messages": [bad]})
            assert r.status_code == 422 and r.json()["error"]["message"], bad
    store.close()


# ------------------------------------------------------------------ settings, CLI
def test_settings_and_answer_modes():
    from lmforge.rag.config import ANSWER_MODES
    from lmforge.serve.config import RAG_ANSWER_MODES

    assert RAG_ANSWER_MODES == ANSWER_MODES
    with pytest.raises(LmforgeError, match="--rag-answer"):
        ServeSettings(rag="x.sqlite", rag_answer="guess")
    with pytest.raises(LmforgeError, match="--rag needs"):
        ServeSettings(rag="  ")


def test_opening_a_bad_index_is_one_clear_error(tmp_path, knowledge):
    with pytest.raises(LmforgeError, match="no such index"):
        KnowledgeBase.open(str(tmp_path / "missing.sqlite"))
    from lmforge.rag.store import open_store

    with open_store(tmp_path / "empty.sqlite", create=True):
        pass
    with pytest.raises(LmforgeError, match="holds no documents"):
        KnowledgeBase.open(str(tmp_path / "empty.sqlite"))
    with open_store(tmp_path / "other.sqlite", create=True) as store:
        store.set_meta(model_id="some-model@0000", dim=384, embedder="not-a-registered-model")
    with pytest.raises(LmforgeError, match="give its directory with --embedding-model"):
        KnowledgeBase.open(str(tmp_path / "other.sqlite"))
    (tmp_path / "notes.txt").write_text("not an index")
    with pytest.raises(LmforgeError):
        KnowledgeBase.open(str(tmp_path / "notes.txt"))


def test_cli_serve_refuses_a_missing_index_before_loading_the_model(tmp_path, capsys):
    from lmforge.cli import main

    started = time.perf_counter()
    code = main(["serve", "--rag", str(tmp_path / "nope.sqlite"), "--db", str(tmp_path / "chat.db"), "--port", "0"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("lmforge: error: --rag") and err.count("\n") == 1
    assert time.perf_counter() - started < 10  # no model was loaded
    with pytest.raises(SystemExit):  # argparse lists the choices
        main(["serve", "--rag-answer", "guess"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_serves_answers_from_the_index(rag_index, tmp_path):
    """`lmforge serve --rag INDEX` as a process: the banner names the knowledge base, the official
    client gets a cited answer, and SIGTERM stops it cleanly."""
    import signal
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--rag", str(rag_index), "--rag-answer",
                             "extractive", "--port", str(port), "--max-batch", "2", "--db", str(tmp_path / "chat.db")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=KV_QUESTION)
        check_sources(r.choices[0].message.content, r.model_extra["sources"], url)
        assert httpx.get(r.model_extra["sources"][0]["url"]).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        assert f"knowledge base: {rag_index}" in err and "extractive answers" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_postgres_index_answers_like_the_sqlite_one(default_lm, postgres_url, server, client, tmp_path_factory):
    """The same pages indexed into PostgreSQL (pgvector): the server answers the same, with the same sources."""
    import uuid

    import psycopg

    from lmforge.rag.embedder import load_embedder
    from lmforge.rag.index import build_index

    schema = f"t_{uuid.uuid4().hex[:12]}"
    location = f"{postgres_url}?schema={schema}"
    pages = tmp_path_factory.mktemp("pg-pages")
    for name in PAGES:
        shutil.copy(HANDBOOK / name, pages / name)
    try:
        build_index(pages, location, load_embedder())
        settings = ServeSettings(rag=location, rag_answer="extractive")
        with serving(default_lm, settings, max_batch=2) as (url, _):  # create_app opens the URL itself
            pg = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            for question in (KV_QUESTION, OFF_TOPIC):
                a = client.chat.completions.create(model=MODEL, messages=question)
                b = pg.chat.completions.create(model=MODEL, messages=question)
                assert b.choices[0].message.content == a.choices[0].message.content
                assert [s["id"] for s in b.model_extra["sources"]] == [s["id"] for s in a.model_extra["sources"]]
            chunk_id = pg.chat.completions.create(model=MODEL, messages=KV_QUESTION).model_extra["sources"][0]["id"]
            assert httpx.get(f"{url}/v1/rag/sources/{chunk_id}").json()["id"] == chunk_id
            assert "text/html" in httpx.get(f"{url}/rag/sources/{chunk_id}").headers["content-type"]
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


# ------------------------------------------------------------------------ fuzzing
@pytest.mark.slow
def test_no_body_causes_a_server_error(default_lm, knowledge, rag_index):
    """Generated chat bodies (real questions and random text, every field in and out of range, streamed
    or not) against a server answering from the index in auto mode (a tiny random model writes): 4xx or
    an answer, never a 5xx nor an error event in a stream."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from starlette.testclient import TestClient

    from lmforge.model import ModelConfig, Transformer

    tokenizer = default_lm.tokenizer
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=32, n_head=2, intermediate_size=64,
                         max_position_embeddings=2048, eos_token_id=tokenizer.eos_id)
    scheduler = Scheduler(Transformer(config).eval(), tokenizer, max_batch=4, max_seq_len=2048).start()
    app = create_app(scheduler, tokenizer, "tiny", ServeSettings(max_tokens_limit=8, allowed_hosts=["testserver"],
                                                                 rag=str(rag_index), rag_answer="auto"),
                     knowledge=knowledge)
    text = st.one_of(st.sampled_from(["What is a KV cache?", "How does top-p sampling work?", "什麼是注意力機制？",
                                      "How do I bake bread?", "\ud800 broken", "[1] <script>x</script>", ""]),
                     st.text(max_size=120))
    part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": text})
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "user", "system", "assistant", "developer",
                                                              "tool", "robot"]),
                                     "content": st.one_of(text, st.none(), st.lists(part, max_size=2))})
    wild = st.fixed_dictionaries({"messages": st.lists(message, max_size=3)}, optional={
        "rag": st.one_of(st.booleans(), st.none(), st.integers(-1, 2), st.just("true")),
        "stream": st.booleans(),
        "max_tokens": st.one_of(st.none(), st.integers(-1, 12)),
        "max_completion_tokens": st.integers(0, 3),
        "temperature": st.floats(-0.5, 2.5, allow_nan=False),
        "top_p": st.floats(0, 1.2, allow_nan=False),
        "n": st.integers(0, 2),
        "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=5)),
        "seed": st.integers(-(2**64), 2**64),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(-1, 3),
        "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "xml"}]),
        "stream_options": st.sampled_from([{"include_usage": True}, {"include_usage": "no"}, None]),
        "model": st.sampled_from(["tiny", None, "other"]),
    })
    question = st.fixed_dictionaries({"role": st.just("user"), "content": text})
    plausible = st.fixed_dictionaries({"messages": st.lists(message, max_size=2).flatmap(
        lambda history: question.map(lambda q: history + [q]))}, optional={
        "rag": st.one_of(st.booleans(), st.none()),
        "stream": st.booleans(),
        "max_tokens": st.integers(1, 8),
        "temperature": st.floats(0, 2, allow_nan=False),
        "top_p": st.floats(0.05, 1, allow_nan=False),
        "stop": st.lists(st.text(min_size=1, max_size=3), max_size=4),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "stream_options": st.just({"include_usage": True}),
    })
    body = st.one_of(plausible, wild)
    seen = {"answered": 0, "from_sources": 0}
    try:
        with TestClient(app) as http:
            @given(payload=body)
            @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
            def check(payload):
                r = http.post("/v1/chat/completions", content=json.dumps(payload),  # lone surrogates escaped
                              headers={"content-type": "application/json"})
                assert r.status_code < 500, (payload, r.text)
                assert "server_error" not in r.text, (payload, r.text)
                if r.status_code == 200:
                    seen["answered"] += 1
                    seen["from_sources"] += '"sources"' in r.text
                else:
                    assert r.json()["error"]["message"]

            check()
    finally:
        scheduler.shutdown(drain=False, timeout=10)
    assert seen["from_sources"] >= 20 and seen["answered"] > seen["from_sources"], seen  # both paths ran


# ------------------------------------------------------ the served model writing
@pytest.mark.slow
def test_auto_answers_are_written_through_the_scheduler(default_lm, knowledge, rag_index):
    """In auto mode the served model writes first, through the one scheduler, and only the sentences
    the cited sources support are kept; when none is, the answer is the sources' own sentences."""
    from lmforge.rag.answer import Answerer
    from lmforge.rag.config import AnswerOptions
    from lmforge.rag.groundedness import SupportChecker, answer_sentences

    extractive = Answerer(knowledge.retriever, None, AnswerOptions(mode="extractive")).answer(KV_QUESTION[0]["content"])
    settings = ServeSettings(rag=str(rag_index), rag_answer="auto")
    with serving(default_lm, settings, knowledge, max_batch=4) as (url, scheduler):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        prompts_before, finished_before = scheduler.stats.prompt_tokens, scheduler.stats.finished
        r = client.chat.completions.create(model=MODEL, messages=KV_QUESTION)
        text, info, sources = r.choices[0].message.content, r.model_extra["rag"], r.model_extra["sources"]
        assert r.usage.prompt_tokens > 300 and r.usage.completion_tokens > 0  # the grounded prompt was decoded
        assert scheduler.stats.prompt_tokens - prompts_before == r.usage.prompt_tokens
        assert scheduler.stats.finished == finished_before + 1
        check_sources(text, sources, url)
        assert info["verified"] is True and info["mode"] in ("generated", "extractive")
        if info["mode"] == "generated":  # every kept sentence is supported by the passages it cites
            checker = SupportChecker(knowledge.embedder)
            passages = {s["number"]: knowledge.chunk(s["id"]).text for s in sources}
            for sentence in re.split(r"(?<=\])\s+", text):
                cited = [passages[n] for n in cited_numbers(sentence)]
                for part in answer_sentences(sentence):
                    assert checker.check(part, cited).supported, sentence
        else:
            assert text == extractive.text

        # One token is nothing the sources can support: the answer falls back to their own sentences.
        short = httpx.post(url + "/v1/chat/completions", timeout=120, json={"messages": KV_QUESTION, "max_tokens": 1})
        body = short.json()
        assert body["usage"]["completion_tokens"] == 1 and body["rag"]["mode"] == "extractive"
        assert body["choices"][0]["message"]["content"] == extractive.text
        assert [s["id"] for s in body["sources"]] == [c.chunk.id for c in extractive.cited()]

        # Streamed the same way; a client that goes away stops the generation.
        streamed = list(client.chat.completions.create(model=MODEL, messages=KV_QUESTION, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == text
        finished = scheduler.stats.finished
        tokens = scheduler.stats.generated_tokens
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                          json={"messages": KV_QUESTION, "stream": True, "max_tokens": 160,
                                "temperature": 1.0, "seed": 3}) as r:
            lines = r.iter_lines()  # kept: a discarded iterator would close the stream at once
            next(lines)  # the role chunk: the answer is under way
            deadline = time.time() + 30
            while not scheduler.stats.running and time.time() < deadline:  # retrieved; the model writes
                time.sleep(0.01)
            assert scheduler.stats.running == 1
        deadline = time.time() + 30
        while (scheduler.stats.running or scheduler.stats.finished == finished) and time.time() < deadline:
            time.sleep(0.05)
        assert scheduler.stats.running == 0 and scheduler.stats.finished == finished + 1
        assert scheduler.stats.generated_tokens - tokens < 100


# ---------------------------------------------------------------- the web chat
@pytest.mark.slow
def test_web_chat_lists_the_sources_as_links(browser, default_lm, knowledge, rag_index, tmp_path):
    """Headless Chromium: the answer's sources appear under it as links to their pages, and so do its [n]."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from lmforge.serve.feedback import FeedbackStore

    store = FeedbackStore(tmp_path / "chat.db")
    settings = ServeSettings(rag=str(rag_index), rag_answer="extractive")
    with serving(default_lm, settings, knowledge, store=store, max_batch=2) as (url, _):
        d = browser
        wait = WebDriverWait(d, 60, poll_frequency=0.05)
        d.get(url + "/")
        d.execute_script("localStorage.clear()")
        d.get(url + "/")
        wait.until(lambda d: d.find_element(By.ID, "rag-field").get_attribute("hidden") is None)  # /health said so
        assert d.find_element(By.ID, "rag-hint").is_displayed() and d.find_element(By.ID, "use-rag").is_selected()
        d.find_element(By.ID, "prompt").send_keys(KV_QUESTION[0]["content"], Keys.ENTER)
        links = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant .sources li a"))
        expected = client_sources(url)
        assert [a.get_attribute("href") for a in links] == [s["url"] for s in expected]
        assert "kv-cache.md" in links[0].text
        cites = d.find_elements(By.CSS_SELECTOR, ".message.assistant .content a.cite")
        assert cites and {c.text for c in cites} == {f"[{s['number']}]" for s in expected}
        assert all(a.get_attribute("target") == "_blank" and "noopener" in a.get_attribute("rel")
                   for a in cites + links)
        answer = d.find_element(By.CSS_SELECTOR, ".message.assistant .content").text
        assert answer == client_answer(url)  # the links changed nothing in the text
        _shot(d, tmp_path / "web-chat-sources.png")

        # Stored with the answer: a fresh page, the conversation reopened, shows the same links.
        wait.until(lambda d: test_webui_browser._enabled(d, ".message.assistant .thumb.up"))
        d.get(url + "/")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#conversation-list button"))[0].click()
        reopened = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant .sources li a"))
        assert [a.get_attribute("href") for a in reopened] == [s["url"] for s in expected]
        assert len(d.find_elements(By.CSS_SELECTOR, ".message.assistant .content a.cite")) == len(cites)

        # The source page opens and shows the passage.
        d.get(reopened[0].get_attribute("href"))
        passage = d.find_element(By.CSS_SELECTOR, "pre.passage").text
        assert " ".join(passage.split()) == " ".join(knowledge.chunk(expected[0]["id"]).text.split())
        _shot(d, tmp_path / "source-page.png")

        # Unchecked, the next question goes to the bare model: no sources under its answer.
        d.get(url + "/")
        d.find_element(By.CSS_SELECTOR, "#settings summary").click()
        wait.until(lambda d: d.find_element(By.ID, "use-rag").is_displayed())
        d.find_element(By.ID, "use-rag").click()
        tokens = d.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys("6")
        d.find_element(By.CSS_SELECTOR, "#settings summary").click()
        d.find_element(By.ID, "prompt").send_keys("Say hi.", Keys.ENTER)
        wait.until(lambda d: test_webui_browser._enabled(d, ".message.assistant .thumb.up"))
        assert not d.find_elements(By.CSS_SELECTOR, ".message.assistant .sources")
        assert not d.find_elements(By.CSS_SELECTOR, ".message.assistant .content a")
        errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
        d.execute_script("localStorage.clear()")
        assert not errors, errors  # no CSP violations or script errors, on the chat or the source page
    store.close()


def _shot(d, path: Path) -> None:
    test_webui_browser._screenshot(d, path)


def client_answer(url: str) -> str:
    r = httpx.post(url + "/v1/chat/completions", json={"messages": KV_QUESTION}, timeout=60)
    return r.json()["choices"][0]["message"]["content"]


def client_sources(url: str) -> list[dict]:
    r = httpx.post(url + "/v1/chat/completions", json={"messages": KV_QUESTION}, timeout=60)
    return r.json()["sources"]
