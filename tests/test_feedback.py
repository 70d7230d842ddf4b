"""The feedback store (SQLite) and the web chat's /api/* routes on a real server."""

from __future__ import annotations

import re
import sqlite3
import threading

import httpx
import pytest

from lmforge.errors import LmforgeError
from lmforge.serve.app import ServeSettings
from lmforge.serve.feedback import SCHEMA_VERSION, FeedbackStore, NotFound
from lmforge.serve.webui import STATIC_DIR
from test_serve import running_server

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


# --------------------------------------------------------------------- store
@pytest.fixture
def store(tmp_path):
    with FeedbackStore(tmp_path / "chat.db") as s:
        yield s


def test_round_trip_survives_reopen(tmp_path):
    path = tmp_path / "chat.db"
    with FeedbackStore(path) as store:
        conv = store.create_conversation(model="m", settings={"temperature": 0.3},
                                         messages=[{"role": "system", "content": "Be brief."}])
        added = store.append_messages(conv["id"], [{"role": "user", "content": "  What is   2+2? "},
                                                   {"role": "assistant", "content": "4"}])
        fb = store.add_feedback(added[1]["id"], 1, " right ")
    assert [m["index"] for m in added] == [1, 2] and conv["messages"][0]["index"] == 0
    assert fb["rating"] == 1 and fb["comment"] == "right" and fb["message_index"] == 2

    with FeedbackStore(path) as store:
        got = store.get_conversation(conv["id"])
        assert got["title"] == "What is 2+2?" and got["model"] == "m" and got["settings"] == {"temperature": 0.3}
        assert [(m["role"], m["content"]) for m in got["messages"]] == [
            ("system", "Be brief."), ("user", "  What is   2+2? "), ("assistant", "4")]
        assert got["messages"][2]["feedback"]["rating"] == 1 and got["messages"][1]["feedback"] is None
        assert store.list_conversations()[0]["message_count"] == 3
        # Rating again replaces the earlier rating of the same answer.
        store.add_feedback(added[1]["id"], -1, "")
        (record,) = store.export()
        assert record["rating"] == -1 and record["completion"] == "4"
        assert record["prompt"] == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "  What is   2+2? "}]
        assert store.export(rating=1) == []


def test_wal_mode_synchronous_full_and_schema_version(store, tmp_path):
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("synchronous") == 2  # FULL
    assert store.schema_version == SCHEMA_VERSION
    store.create_conversation(messages=[{"role": "user", "content": "hi"}])
    assert (tmp_path / "chat.db-wal").exists()
    raw = sqlite3.connect(tmp_path / "chat.db")
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"schema_version", "conversations", "messages", "feedback"} <= tables
    finally:
        raw.close()


def test_newer_schema_and_unreadable_file_are_refused(tmp_path):
    path = tmp_path / "new.db"
    FeedbackStore(path).close()
    raw = sqlite3.connect(path)
    raw.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    raw.commit()
    raw.close()
    with pytest.raises(LmforgeError, match="newer lmforge"):
        FeedbackStore(path)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LmforgeError, match="cannot open"):
        FeedbackStore(junk)


def test_store_refuses_bad_input(store):
    conv = store.create_conversation(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    user_id, answer_id = (m["id"] for m in conv["messages"])
    with pytest.raises(NotFound):
        store.get_conversation("nope")
    with pytest.raises(NotFound):
        store.append_messages("nope", [{"role": "user", "content": "x"}])
    with pytest.raises(NotFound):
        store.add_feedback(answer_id + 100, 1)
    with pytest.raises(ValueError, match="assistant"):
        store.add_feedback(user_id, 1)
    with pytest.raises(ValueError, match="rating"):
        store.add_feedback(answer_id, 0)
    with pytest.raises(ValueError, match="role"):
        store.append_messages(conv["id"], [{"role": "tool", "content": "x"}])
    assert len(store.get_conversation(conv["id"])["messages"]) == 2  # nothing half-written


def test_concurrent_appends_get_distinct_indexes(store):
    conv = store.create_conversation()

    def writer(k):
        for i in range(10):
            store.append_messages(conv["id"], [{"role": "user", "content": f"{k}-{i}"}])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    messages = store.get_conversation(conv["id"])["messages"]
    assert [m["index"] for m in messages] == list(range(40))
    assert len({m["content"] for m in messages}) == 40


# ---------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def api(default_lm, tmp_path_factory):
    """A real server with API keys configured, and its store."""
    store = FeedbackStore(tmp_path_factory.mktemp("webui") / "chat.db")
    with running_server(default_lm, ServeSettings(api_keys=[KEY]), store=store, max_batch=2) as (url, _):
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
            yield client, store
    store.close()


def test_api_round_trip(api):
    client, store = api
    r = client.post("/api/conversations", json={"model": "m", "settings": {"top_p": 0.9},
                                                "messages": [{"role": "system", "content": "Be kind."}]})
    assert r.status_code == 201, r.text
    conv = r.json()
    assert conv["messages"][0]["role"] == "system" and conv["title"] == ""
    r = client.post(f"/api/conversations/{conv['id']}/messages",
                    json={"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."}]})
    assert r.status_code == 201, r.text
    user, answer = r.json()["data"]
    assert (user["index"], answer["index"]) == (1, 2)
    r = client.post("/api/feedback", json={"message_id": answer["id"], "rating": -1, "comment": "too short"})
    assert r.status_code == 201, r.text
    assert r.json()["rating"] == -1 and r.json()["conversation_id"] == conv["id"]

    got = client.get(f"/api/conversations/{conv['id']}").json()
    assert got["title"] == "Hello!" and got["settings"] == {"top_p": 0.9}
    assert got["messages"][2]["feedback"]["comment"] == "too short"
    listed = client.get("/api/conversations").json()["data"]
    assert listed[0]["id"] == conv["id"] and listed[0]["message_count"] == 3
    exported = [e for e in client.get("/api/feedback").json()["data"] if e["conversation_id"] == conv["id"]]
    assert exported[0]["prompt"][-1] == {"role": "user", "content": "Hello!"} and exported[0]["completion"] == "Hi."
    assert all(e["rating"] == -1 for e in client.get("/api/feedback", params={"rating": -1}).json()["data"])
    lines = client.get("/api/feedback", params={"format": "jsonl"})
    assert lines.headers["content-type"].startswith("application/x-ndjson")
    assert len(lines.text.splitlines()) == len(client.get("/api/feedback").json()["data"])
    # What the server acknowledged is in the database file.
    assert store.get_conversation(conv["id"])["messages"][2]["feedback"]["rating"] == -1


@pytest.fixture(scope="module")
def ids(api):
    client, _ = api
    conv = client.post("/api/conversations", json={
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}).json()
    return conv["id"], conv["messages"][0]["id"], conv["messages"][1]["id"]


@pytest.mark.parametrize("method, path, payload, status", [
    ("GET", "/api/conversations/does-not-exist", None, 404),
    ("POST", "/api/conversations/does-not-exist/messages", {"messages": [{"role": "user", "content": "x"}]}, 404),
    ("POST", "/api/feedback", {"message_id": 10**9, "rating": 1}, 404),
    ("POST", "/api/feedback", {"message_id": "ANSWER", "rating": 0}, 422),
    ("POST", "/api/feedback", {"message_id": "ANSWER", "rating": 2}, 422),
    ("POST", "/api/feedback", {"message_id": "ANSWER", "rating": "up"}, 422),
    ("POST", "/api/feedback", {"message_id": "ANSWER", "rating": "1"}, 422),
    ("POST", "/api/feedback", {"message_id": "ANSWER", "rating": True}, 422),
    ("POST", "/api/feedback", {"message_id": "ANSWER"}, 422),
    ("POST", "/api/feedback", {"message_id": "ANSWER", "rating": 1, "comment": "x" * 5000}, 422),
    ("POST", "/api/feedback", {"message_id": "USER", "rating": 1}, 400),
    ("POST", "/api/conversations/CONV/messages", {"messages": []}, 422),
    ("POST", "/api/conversations/CONV/messages", {"messages": [{"role": "tool", "content": "x"}]}, 422),
    ("POST", "/api/conversations/CONV/messages", {"messages": [{"role": "user"}]}, 422),
    ("POST", "/api/conversations", {"settings": "hot"}, 422),
    ("POST", "/api/conversations", {"unknown": 1}, 422),
    ("GET", "/api/conversations?limit=0", None, 422),
    ("GET", "/api/feedback?rating=5", None, 422),
])
def test_api_errors_have_openai_bodies(api, ids, method, path, payload, status):
    client, _ = api
    conv_id, user_id, answer_id = ids
    path = path.replace("CONV", conv_id)
    if payload and payload.get("message_id") in ("ANSWER", "USER"):
        payload = {**payload, "message_id": answer_id if payload["message_id"] == "ANSWER" else user_id}
    r = client.request(method, path, json=payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if status == 404:
        assert err["type"] == "not_found_error"


def test_api_needs_the_key_but_the_page_is_public(api):
    client, _ = api
    bare = httpx.Client(base_url=str(client.base_url), timeout=30)
    with bare:
        for path in ("/api/conversations", "/api/feedback"):
            r = bare.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert bare.post("/api/feedback", json={"message_id": 1, "rating": 1}).status_code == 401
        assert bare.get("/api/conversations", headers={"Authorization": "Bearer wrong"}).status_code == 401
        page = bare.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for asset in ("/static/chat.js", "/static/chat.css", "/static/favicon.svg", "/static/thumb.svg"):
            assert bare.get(asset).status_code == 200, asset
        assert bare.get("/static/missing.js").status_code == 404


def test_page_loads_nothing_from_elsewhere():
    """Every reference in the page's files is to the server itself (works offline, passes the CSP)."""
    for f in STATIC_DIR.iterdir():
        text = f.read_text(encoding="utf-8")
        text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a namespace name, never fetched
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), f.name
        assert "@import" not in text and "<iframe" not in text, f.name
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(r.startswith(("/static/", "#")) for r in refs), refs


def test_server_without_store_has_no_web_chat(default_lm):
    with running_server(default_lm, max_batch=1) as (url, _):
        assert httpx.get(url + "/").status_code == 404
        assert httpx.get(url + "/api/conversations").status_code == 404
