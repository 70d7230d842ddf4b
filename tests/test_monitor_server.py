"""Monitoring on a live tiny server: the new metrics on /metrics after real requests, /dashboard
and its JSON, the feedback store's ratings, an attached drift monitor, and the Grafana
dashboard's queries naming only metrics the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from lmforge.infer.scheduler import Scheduler
from lmforge.monitor.activity import Price
from lmforge.monitor.config import DriftOptions
from lmforge.monitor.drift import DriftMonitor
from lmforge.monitor.grafana import grafana_dashboard, metric_names
from lmforge.serve.app import ServeSettings, create_app
from lmforge.serve.feedback import FeedbackStore

from conftest import live_server

PRICE = Price(prompt=0.5, completion=1.5)  # dollars per 1k tokens


@pytest.fixture(scope="module")
def tokenizer():
    from lmforge.model.loading import resolve_tokenizer

    return resolve_tokenizer(None)


def tiny_scheduler(tokenizer):
    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=32, n_head=2, intermediate_size=64,
                         max_position_embeddings=512, eos_token_id=tokenizer.eos_id)
    return Scheduler(Transformer(config).eval(), tokenizer, max_batch=2, max_seq_len=512).start()


@pytest.fixture(scope="module")
def served(tokenizer, tmp_path_factory):
    """A tiny random model behind the real server, with a feedback store, prices and a drift monitor."""
    store = FeedbackStore(tmp_path_factory.mktemp("monitor") / "chat.db")
    rng = np.random.default_rng(0)
    drift = DriftMonitor(DriftOptions(window=8, reference_size=8, check_every=8, clusters=2, permutations=199),
                         embed=lambda texts: rng.normal(size=(len(texts), 4)))
    scheduler = tiny_scheduler(tokenizer)
    app = create_app(scheduler, tokenizer, "tiny", ServeSettings(embedding_model="none"), store=store,
                     prices={"tiny": PRICE}, drift=drift)
    with live_server(app, scheduler) as url:
        yield url, store, drift, app.state.server.metrics
    store.close()


def metric(text: str, name: str, labels: str = "") -> float:
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert found, f"{name}{labels} not in /metrics"
    return float(found[1])


def test_request_metrics_cost_and_ratings_reach_metrics_and_dashboard(served):
    url, store, drift, _ = served
    usage = []
    for prompt in ("Hello there", "Tell me about refunds"):
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                             "max_tokens": 6, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        usage.append(r.json()["usage"])
    assert httpx.post(url + "/v1/chat/completions", json={"messages": "not a list"}).status_code == 422
    conversation = store.create_conversation("t", "tiny", {}, [{"role": "user", "content": "q"},
                                                               {"role": "assistant", "content": "a"},
                                                               {"role": "user", "content": "q2"},
                                                               {"role": "assistant", "content": "b"}])
    answers = [m["id"] for m in conversation["messages"] if m["role"] == "assistant"]
    store.add_feedback(answers[0], 1)
    store.add_feedback(answers[1], -1)
    drift.feed([f"question {i}" for i in range(16)])  # reference of 8, then one full window: one check

    text = httpx.get(url + "/metrics").text
    prompt_tokens = sum(u["prompt_tokens"] for u in usage)
    completion_tokens = sum(u["completion_tokens"] for u in usage)
    expected_cost = (prompt_tokens * PRICE.prompt + completion_tokens * PRICE.completion) / 1000
    assert metric(text, "lmforge_cost_usd_total", '{model="tiny"}') == pytest.approx(expected_cost)
    assert metric(text, "lmforge_generation_tokens_count", '{kind="completion"}') == 2
    assert metric(text, "lmforge_generation_tokens_sum", '{kind="prompt"}') == prompt_tokens
    assert metric(text, "lmforge_feedback_ratings_total", '{rating="up"}') == 1
    assert metric(text, "lmforge_feedback_ratings_total", '{rating="down"}') == 1
    assert metric(text, "lmforge_feedback_thumbs_up_ratio") == 0.5
    assert metric(text, "lmforge_requests_total", '{endpoint="/v1/chat/completions",status="422"}') == 1
    assert metric(text, "lmforge_drift_alert", '{test="mmd"}') in (0.0, 1.0)
    assert 0 < metric(text, "lmforge_drift_mmd_p_value") <= 1
    for name in ("lmforge_refusals_total", "lmforge_escalations", "lmforge_intents", "lmforge_blocked_requests",
                 "lmforge_moderation_hits", "lmforge_rag_groundedness"):
        assert name in text

    data = httpx.get(url + "/dashboard/data").json()
    totals = data["totals"]
    assert totals["generations"] == 2 and totals["completion_tokens"] == completion_tokens
    assert totals["requests"] >= 3 and totals["client_error_rate"] > 0 and totals["error_rate"] == 0
    assert totals["cost"] == pytest.approx(expected_cost) and totals["latency_p95"] > 0
    assert data["counters"]["feedback_ratings"] == {"up": 1.0, "down": 1.0}
    assert data["drift"]["checks"] == 1 and data["model"] == "tiny"


def test_counters_other_components_feed_are_bounded(served):
    """Escalations, intents, blocked requests and moderation hits as the assistant and the guards
    will count them: on /metrics and the dashboard's JSON, with at most MAX_LABEL_VALUES label values."""
    from lmforge.serve.metrics import MAX_LABEL_VALUES

    url, metrics = served[0], served[3]
    for i in range(MAX_LABEL_VALUES + 10):
        metrics.count_intent(f"intent-{i}")
    metrics.count_blocked("input")
    metrics.count_blocked("input")
    metrics.count_escalation("angry customer")
    metrics.count_moderation("violence")
    text = httpx.get(url + "/metrics").text
    intents = re.findall(r'^lmforge_intents_total\{intent="([^"]+)"\} (\S+)$', text, re.M)
    assert len(intents) == MAX_LABEL_VALUES + 1 and ("other", "10.0") in intents
    assert metric(text, "lmforge_blocked_requests_total", '{layer="input"}') == 2
    assert metric(text, "lmforge_escalations_total", '{reason="angry customer"}') == 1
    assert metric(text, "lmforge_moderation_hits_total", '{category="violence"}') == 1
    counters = httpx.get(url + "/dashboard/data").json()["counters"]
    assert counters["blocked_requests"] == {"input": 2.0} and counters["intents"]["other"] == 10.0
    paths = httpx.get(url + "/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/dashboard")]  # the page is no part of the API schema


def test_dashboard_page_and_assets(served):
    url = served[0]
    page = httpx.get(url + "/dashboard")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<canvas id="chart-latency"' in page.text and "/dashboard/dashboard.js" in page.text
    script = httpx.get(url + "/dashboard/dashboard.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "/dashboard/data" in script.text
    assert httpx.get(url + "/dashboard/dashboard.css").status_code == 200
    missing = httpx.get(url + "/dashboard/secret.txt")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_grafana_dashboard_reads_only_exported_metrics(served):
    url = served[0]
    exported = set()
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            exported.add(name)
            exported.update({"counter": [name + "_total"], "histogram": [name + "_bucket", name + "_sum",
                             name + "_count"]}.get(kind, []))
    dashboard = grafana_dashboard()
    used = metric_names(dashboard)
    assert len(used) >= 20 and used <= exported, sorted(used - exported)

    shipped = json.loads((Path(__file__).parents[1] / "docs/monitoring/grafana-dashboard.json").read_text())
    assert shipped == dashboard  # regenerate with: lmforge monitor grafana --out docs/monitoring/grafana-dashboard.json


def test_refusals_are_counted_from_the_finished_text(served, tokenizer):
    """A generation whose text opens with a refusal raises lmforge_refusals_total (the tiny random
    model never writes one, so the finished request is built from the engine's own classes)."""
    from lmforge.infer.request import DecodeState
    from lmforge.infer.sampling import SamplingParams
    from lmforge.infer.scheduler import RequestHandle

    url, metrics = served[0], served[3]
    before = metric(httpx.get(url + "/metrics").text, "lmforge_refusals_total")
    for text in ("I'm sorry, but I can't help with that.", "Your parcel left the warehouse today."):
        handle = RequestHandle(10_000, [1, 2, 3], None, stream=False)
        state = DecodeState([1, 2, 3], SamplingParams(), 32, tokenizer, [tokenizer.eos_id], "cpu",
                            tokenizer.vocab_size)
        state.generated = tokenizer.encode(text, add_special_tokens=False)
        state.text, state.finish_reason = text, "stop"
        handle.state, handle.first_token_at, handle.finished_at = state, handle.submitted_at + 0.01, handle.submitted_at + 0.1
        metrics.observe_generation(handle)
    assert metric(httpx.get(url + "/metrics").text, "lmforge_refusals_total") == before + 1


def test_golden_runs_through_the_endpoint_and_flag_regressions(served, tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.monitor.golden import load_run, save_run

    url = served[0]
    golden = tmp_path / "golden.jsonl"
    golden.write_text("".join(json.dumps({"id": f"city-{i}", "question": f"Name city number {i}.",
                                          "checks": [{"contains": "Paris"}, {"not_contains": "zzqx"}]}) + "\n"
                              for i in range(4)))
    run = tmp_path / "today.json"
    common = ["monitor", "golden", "--golden", str(golden), "--base-url", url, "--max-tokens", "5"]
    assert main(common + ["--out", str(run)]) == 0
    today = load_run(run)
    assert today["format"] == "lmforge-golden-run/1" and today["model"] == f"tiny at {url}"
    assert [r["id"] for r in today["items"]] == [f"city-{i}" for i in range(4)]
    assert all(r["score"] == 0.5 for r in today["items"])  # random text: no "Paris", no "zzqx"

    good = dict(today, items=[dict(r, answer="Paris.", score=1.0, passed=True) for r in today["items"]])
    save_run(good, tmp_path / "good.json")
    report = tmp_path / "report.json"
    capsys.readouterr()
    assert main(["monitor", "golden", "--golden", str(golden), "--against", str(tmp_path / "good.json"), str(run),
                 "--report", str(report)]) == 2
    out = capsys.readouterr().out
    assert "REGRESSION" in out and out.count("REGRESSED city-") == 4
    assert json.loads(report.read_text())["regressed_items"] == [f"city-{i}" for i in range(4)]
    # Answered again (greedy, the same server): same answers, so nothing regressed.
    assert main(common + ["--out", str(tmp_path / "again.json"), "--against", str(run)]) == 0
    assert [r["answer"] for r in load_run(tmp_path / "again.json")["items"]] == [r["answer"] for r in today["items"]]


def test_golden_cli_errors(tmp_path, capsys):
    from lmforge.cli import main

    golden = tmp_path / "golden.jsonl"
    golden.write_text('{"question": "q", "expected": "x"}\n')
    assert main(["monitor", "golden", "--golden", str(tmp_path / "missing.jsonl"), "--out", "x.json"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["monitor", "golden", "--golden", str(golden)]) == 1
    assert "--out" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(["monitor", "golden", "--golden", str(golden), "--against", str(tmp_path / "bad.json"),
                 str(tmp_path / "bad.json")]) == 1
    assert "not a golden run" in capsys.readouterr().err


def test_groundedness_of_knowledge_base_answers(served):
    """A generated answer's groundedness is the share of its sentences the support check kept;
    extractive and refused answers carry none."""
    from lmforge.rag.answer import Answer

    url, metrics = served[0], served[3]
    kept = "The KV cache stores keys and values of earlier tokens [1]. It grows linearly with the context length [1]."
    metrics.observe_answer("generated", Answer("q", kept, mode="generated",
                                               dropped=["It was invented in 1850 by a famous baker."]))
    metrics.observe_answer("extractive", Answer("q", "Quoted text from the source.", mode="extractive"))
    metrics.observe_answer("refused")
    text = httpx.get(url + "/metrics").text
    assert metric(text, "lmforge_rag_groundedness_count") == 1
    assert metric(text, "lmforge_rag_groundedness_sum") == pytest.approx(2 / 3)
    assert metric(text, "lmforge_rag_answers_total", '{mode="refused"}') == 1
    assert httpx.get(url + "/dashboard/data").json()["groundedness_mean"] == pytest.approx(2 / 3)


def test_monitor_cli_questions_and_grafana(tmp_path, capsys):
    from lmforge.cli import main

    assert main(["monitor", "questions", "--n", "30", "--shift-share", "1", "--seed", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 30 and len(set(lines)) > 20
    assert main(["monitor", "questions", "--shift-topic", "weather"]) == 1
    assert "unknown topic" in capsys.readouterr().err
    out = tmp_path / "dash.json"
    assert main(["monitor", "grafana", "--out", str(out), "--title", "prod"]) == 0
    assert json.loads(out.read_text())["title"] == "prod"


@pytest.mark.slow
def test_monitor_cli_drift_with_minilm(tmp_path, capsys, minilm_dir):
    """`lmforge monitor drift` with the real MiniLM encoder: calm traffic, then half of it about a
    new topic; the checks after the shift alert, the calm ones do not."""
    import random

    from lmforge.cli import main
    from lmforge.monitor.questions import questions

    rng = random.Random(5)
    (tmp_path / "ref.txt").write_text("\n".join(questions(120, rng)) + "\n")
    (tmp_path / "traffic.txt").write_text("\n".join(questions(120, rng) + questions(120, rng, shift_share=0.6)) + "\n")
    assert main(["monitor", "drift", "--reference", str(tmp_path / "ref.txt"), str(tmp_path / "traffic.txt"),
                 "--window", "120", "--reference-size", "120", "--check-every", "120", "--embedding-model",
                 str(minilm_dir), "--out", str(tmp_path / "state.json")]) == 0
    checks = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [c["after"] for c in checks] == [120, 240]
    assert checks[0]["drifting"]["mmd"] is False and checks[0]["alerts"] == []
    assert checks[1]["drifting"]["mmd"] is True and "mmd" in checks[1]["alerts"]
    assert json.loads((tmp_path / "state.json").read_text())["alerts"]["mmd"] == 1


def test_golden_run_on_a_local_model_batches_and_agrees_with_one_at_a_time(tokenizer):
    from pathlib import Path as P

    from lmforge.infer.loaded import LoadedModel
    from lmforge.model import ModelConfig, Transformer
    from lmforge.model.registry import ModelSpec
    from lmforge.monitor.config import GoldenOptions
    from lmforge.monitor.golden import GoldenItem, model_answerer, run_golden

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=32, n_head=2, intermediate_size=64,
                         max_position_embeddings=512, eos_token_id=tokenizer.eos_id)
    lm = LoadedModel(Transformer(config).eval(), tokenizer, ModelSpec("tiny", "hf", P("tiny")))
    items = [GoldenItem(str(i), f"Question {i}?", checks=[{"not_contains": "zzqx"}],
                     system="Be brief." if i == 2 else None) for i in range(5)]
    options = GoldenOptions(max_tokens=6, batch_size=3)
    answer = model_answerer(lm, options)
    steps = []
    batched = run_golden(items, answer, options, progress=lambda done, total: steps.append(done))
    assert steps == [3, 5]  # two batches
    one_by_one = [answer(item) for item in items]
    assert [r["answer"] for r in batched["items"]] == one_by_one and all(one_by_one)
    assert batched["summary"]["items"] == 5 and batched["summary"]["pass_rate"] == 1.0
