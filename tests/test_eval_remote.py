"""`lmforge eval perplexity | bench --base-url`: log-probs from a real `lmforge serve`, same figures as locally."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from test_serve import running_server

import lmforge
from lmforge.cli import main
from lmforge.model.loading import resolve_tokenizer
from lmforge.eval.perplexity import perplexity
from lmforge.eval.remote import RemoteScorer
from lmforge.infer.remote import RemoteModel

ROOT = Path(__file__).resolve().parents[1]
# The same float32 forward passes on both sides, except that the local scorer stacks slices
# into batches and the server runs one prompt at a time: the sums of a few hundred log-probs
# came out identical or 1e-8 apart (relative) on this machine. 1e-6 leaves room for other
# kernels and still catches one token scored with the wrong context, which moves far more.
REL = 1e-6


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A small random model with the default model's tokenizer, sharp enough that context matters."""
    from lmforge.model import ModelConfig, Transformer
    from lmforge.model.checkpoint import save_hf_model

    tokenizer = resolve_tokenizer(None)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_embd=32, n_head=4, intermediate_size=64,
                         max_position_embeddings=2048, eos_token_id=tokenizer.eos_id)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path_factory.mktemp("remote") / "tiny"
    save_hf_model(model, path, tokenizer=tokenizer)
    return str(path)


@pytest.fixture(scope="module")
def tiny_server(tiny_dir):
    lm = lmforge.load(tiny_dir, dtype="float32", device="cpu")
    with running_server(lm, max_batch=2) as (url, _):
        yield url, lm


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "license.txt"
    path.write_text((ROOT / "LICENSE").read_text(encoding="utf-8")[2000:3500], encoding="utf-8")
    return path


def test_remote_perplexity_cli_equals_local(tiny_dir, tiny_server, text_file, tmp_path, capsys):
    url, _ = tiny_server
    window = ["--window", 64, "--stride", 24, "--json"]
    code, out, err = run_cli(capsys, "eval", "perplexity", tiny_dir, "--file", text_file, *window, "--device", "cpu")
    assert code == 0, err
    local = json.loads(out)
    code, out, err = run_cli(capsys, "eval", "perplexity", "--base-url", url, "--tokenizer", tiny_dir,
                             "--file", text_file, *window, "--batch-tokens", 1000, "--out", tmp_path / "report")
    assert code == 0, err
    remote = json.loads(out)
    assert local["windows"] > 10  # many slices, so batching and the stride are exercised
    for key in ("tokens", "bytes", "windows", "window", "stride", "documents"):
        assert remote[key] == local[key], key
    assert remote["nll"] == pytest.approx(local["nll"], rel=REL)
    assert remote["ppl"] == pytest.approx(local["ppl"], rel=REL)
    assert remote["bpb"] == pytest.approx(local["bpb"], rel=REL)
    assert remote["base_url"] == url + "/v1" and remote["model"] == "smollm2-135m-instruct"  # the served name
    saved = json.loads((tmp_path / "report" / "perplexity.json").read_text())
    assert saved["ppl"] == remote["ppl"]
    table = (tmp_path / "report" / "perplexity.md").read_text()
    assert f"{remote['ppl']:.4f}" in table and url in table


def test_remote_scorer_batches_slices_and_matches_the_model(tiny_server):
    url, lm = tiny_server
    scorer = RemoteScorer(RemoteModel(url), lm.tokenizer, batch_tokens=200)
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")[5000:6500]
    remote = perplexity(scorer, text, window=48, stride=16)
    local = perplexity(lm, text, window=48, stride=16)
    assert (remote.tokens, remote.windows) == (local.tokens, local.windows)
    assert remote.nll == pytest.approx(local.nll, rel=REL)
    assert scorer.requests < remote.windows  # several slices per request
    ids = lm.tokenizer.encode(text)
    slices = [ids[s : s + 49] for s in range(0, 10 * 16, 16)]
    before = scorer.requests
    batched = scorer.score_batch(slices, [48] * 10)
    assert scorer.requests - before == 3  # 200 tokens per request: 4 + 4 + 2 slices of 49 tokens
    assert batched == [scorer(s) for s in slices]  # packing changes nothing: each prompt is scored on its own


@pytest.mark.slow  # seconds of the fast suite: run with the slow tests
def test_remote_perplexity_of_the_default_model(default_lm, capsys, text_file):
    with running_server(default_lm, max_batch=2) as (url, _):
        code, out, err = run_cli(capsys, "eval", "perplexity", "--base-url", url, "--file", text_file,
                                 "--window", 128, "--json")  # default --tokenizer: the default model's
    assert code == 0, err
    remote = json.loads(out)
    local = perplexity(default_lm, text_file.read_text(encoding="utf-8"), window=128, stride=64)
    assert remote["tokens"] == local.tokens and remote["windows"] == local.windows
    assert remote["ppl"] == pytest.approx(local.ppl, rel=REL)
    assert 2 < remote["ppl"] < 100  # a trained model on English prose, not a random one


def test_remote_multiple_choice_bench_equals_local(tiny_dir, tiny_server, tmp_path, capsys):
    url, _ = tiny_server
    task = ["--task", "mmlu-cot-281", "--limit", 4, "--shots", 1, "--json", "--quiet"]
    code, out, err = run_cli(capsys, "eval", "bench", tiny_dir, *task, "--device", "cpu", "--out", tmp_path / "local")
    assert code == 0, err
    local = json.loads(out)
    code, out, err = run_cli(capsys, "eval", "bench", "--base-url", url, "--tokenizer", tiny_dir, *task,
                             "--out", tmp_path / "remote")
    assert code == 0, err
    remote = json.loads(out)
    assert remote["kind"] == "multiple_choice" and remote["n"] == local["n"] == 4
    assert remote["metrics"] == pytest.approx(local["metrics"])
    assert remote["groups"] == local["groups"]

    def items(folder):
        path = tmp_path / folder / "bench-mmlu-cot-281-items.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    for a, b in zip(items("local"), items("remote"), strict=True):
        assert (a["id"], a["gold"], a["pred"], a["pred_norm"], a["prompt_tokens"]) == \
               (b["id"], b["gold"], b["pred"], b["pred_norm"], b["prompt_tokens"])
        assert b["logprobs"] == pytest.approx(a["logprobs"], rel=REL, abs=1e-5)
    assert (tmp_path / "remote" / "bench-mmlu-cot-281.md").read_text().startswith("# mmlu-cot-281 on ")


def test_remote_loglikelihood_greedy_flags_and_shared_requests(tiny_server):
    url, lm = tiny_server
    from lmforge.eval.bench import LoglikelihoodScorer

    tok = lm.tokenizer
    context = tok.encode("The quick brown fox jumps over the")
    requests = [(context, tok.encode(" lazy dog", add_special_tokens=False)),
                (context, tok.encode(" lazy", add_special_tokens=False)),
                (context, tok.encode(" lazy dog", add_special_tokens=False)),  # asked twice: sent once
                (context[:3], context[3:5])]
    with torch.no_grad():  # the token the model likes most after the context: its greedy continuation
        best = int(lm.model(torch.tensor([context]))[0, -1].argmax())
    requests.append((context, [best]))
    scorer = RemoteScorer(RemoteModel(url), tok)
    remote = scorer.score(requests)
    local = LoglikelihoodScorer(lm.model).score(requests)
    assert scorer.requests == 1  # four distinct sequences fit one request
    assert [r.tokens for r in remote] == [r.tokens for r in local]
    assert [r.greedy for r in remote] == [r.greedy for r in local]
    assert remote[-1].greedy
    assert [r.logprob for r in remote] == pytest.approx([r.logprob for r in local], rel=REL, abs=1e-5)


# -- errors -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def stub_endpoint(logprob: float | None, busy_first: int = 0):
    """An OpenAI-style server without a model: every prompt token gets `logprob` (None: no
    prompt log-probs at all, as chat-only APIs answer); the first `busy_first` completion
    requests are answered 503."""
    calls = {"completions": 0}

    class Handler(BaseHTTPRequestHandler):
        def _send(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send({"object": "list", "data": [{"id": "text-only", "object": "model"}]})

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls["completions"] += 1
            if calls["completions"] <= busy_first:
                self.send_response(503)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            prompts = request["prompt"] if isinstance(request["prompt"][0], list) else [request["prompt"]]
            self._send({"object": "text_completion", "choices": [
                {"index": i, "text": "", "finish_reason": "length",
                 "logprobs": None if logprob is None else {"token_logprobs": [None] + [logprob] * (len(p) - 1)}}
                for i, p in enumerate(prompts)]})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", calls
    finally:
        server.shutdown()
        thread.join(5)


def assert_one_line_error(code, err, message):
    assert code == 1
    assert err.startswith("lmforge: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("verb", ["perplexity", "bench"])
def test_endpoint_without_prompt_logprobs_is_one_line_error(verb, text_file, capsys):
    with stub_endpoint(logprob=None) as (url, _):
        args = (["--file", text_file, "--window", 32] if verb == "perplexity"
                else ["--task", "mmlu-cot-281", "--limit", 1, "--quiet"])
        code, _, err = run_cli(capsys, "eval", verb, "--base-url", url, *args)
    assert_one_line_error(code, err, "does not return prompt log-probabilities")


def test_busy_answers_are_retried(text_file, capsys):
    import math

    with stub_endpoint(logprob=-math.log(1000), busy_first=1) as (url, calls):
        code, out, err = run_cli(capsys, "eval", "perplexity", "--base-url", url, "--file", text_file,
                                 "--window", 32, "--json")
        assert code == 0, err
        assert json.loads(out)["ppl"] == pytest.approx(1000)  # a uniform 1000-way guess at every token
        windows = json.loads(out)["windows"]
        assert 2 <= calls["completions"] <= windows + 1  # the refused request was sent again, nothing more
    with stub_endpoint(logprob=-1.0, busy_first=1) as (url, _):
        code, _, err = run_cli(capsys, "eval", "perplexity", "--base-url", url, "--file", text_file,
                               "--window", 32, "--retries", 0)
    assert_one_line_error(code, err, "answered 503")


def test_unreachable_endpoint_is_one_line_error(text_file, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    code, _, err = run_cli(capsys, "eval", "perplexity", "text-model", "--base-url", url, "--file", text_file,
                           "--retries", 1, "--request-timeout", 5)
    assert_one_line_error(code, err, f"cannot reach {url}/v1")
    code, _, err = run_cli(capsys, "eval", "bench", "--base-url", url, "--task", "mmlu-cot-281", "--limit", 1)
    assert_one_line_error(code, err, "cannot reach")


def test_wrong_tokenizer_is_one_line_error(tiny_server, tmp_path, text_file, capsys):
    from lmforge.tokenizer.train import train_tokenizer

    url, _ = tiny_server  # serves a model with the default model's tokenizer; this one is trained here
    train_tokenizer([(ROOT / "LICENSE").read_text(encoding="utf-8")], "bpe", vocab_size=400).save(tmp_path / "other")
    code, _, err = run_cli(capsys, "eval", "perplexity", "--base-url", url, "--tokenizer", tmp_path / "other",
                           "--file", text_file, "--window", 32)
    assert_one_line_error(code, err, "pass --tokenizer of the served model")


def test_tokenizer_without_base_url_is_refused(text_file, capsys):
    code, _, err = run_cli(capsys, "eval", "perplexity", "--tokenizer", "x.json", "--file", text_file)
    assert_one_line_error(code, err, "--tokenizer applies to --base-url")
