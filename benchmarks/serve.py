"""Server throughput under concurrent streaming clients, on loopback.

Starts `lmforge serve` on the default model as a subprocess, then for 1, 4 and 16
concurrent clients streams completions (each client runs its requests back to back) and
measures aggregate generated tokens/s, time to first token and request latency
(p50/p95), errors, and the server's resident memory before and after each phase.

    python benchmarks/serve.py                       # 1, 4, 16 clients
    python benchmarks/serve.py --clients 1 8 --requests 3 --max-tokens 48
    python benchmarks/serve.py --clients 1 --requests 4 --rounds 3 --engine   # server path vs engine

`--engine` adds, in each round, the same requests one at a time straight to a `Scheduler`
built as `lmforge serve` builds it (same model loading, rows, sequence length, prefix
cache; its own thread stepping, no HTTP), in a second process started the same way, while
the server idles. Both sides report the decode rate of a stream: tokens after the first
over the time from the first to the last one (time to first token is reported apart), so
the ratio is what the HTTP layer, the event loop and the server's threads cost a stream.
The engine process also streams each request from a one-row scheduler stepped on its own
main thread (what `Generator.stream` does): "direct" in the output.

Requests use `ignore_eos` so every answer has the same length and tokens/s compares
like with like. They carry no `seed`, like most chat traffic: the server computes seeded
requests in full, never from its prefix cache (see lmforge/infer/scheduler.py), and
`--prefix-cache-mb 0` measures the server with that cache off. `--rounds` repeats the
whole sequence of phases and reports each phase's median. Prints a table and one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx

from lmforge.io.progress import Progress

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright, step by step.",
    "Describe a busy market in a city you would like to visit.",
    "Write a letter to a friend about learning to cook.",
]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one_request(url: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = last = None
    tokens = 0
    payload = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": prompt}],
               "max_tokens": max_tokens, "temperature": 0.8, "stream": True, "ignore_eos": True,
               "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=payload, timeout=600) as r:
        if r.status_code != 200:
            r.read()
            return {"error": f"{r.status_code}: {r.text[:100]}"}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                if choice["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "latency": end - start, "tokens": tokens,
            "decode_tok_s": (tokens - 1) / (last - first) if first is not None and last and last > first else None}


def phase(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for j in range(requests):
            try:
                res = one_request(url, PROMPTS[(k + j) % len(PROMPTS)], max_tokens)
            except httpx.HTTPError as exc:
                res = {"error": str(exc)}
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]

    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")

    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "tokens": sum(r["tokens"] for r in ok),
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_p50_s": pct([r["ttft"] for r in ok], 0.5),
        "ttft_p95_s": pct([r["ttft"] for r in ok], 0.95),
        "latency_p50_s": pct([r["latency"] for r in ok], 0.5),
        "latency_p95_s": pct([r["latency"] for r in ok], 0.95),
        "decode_tok_s_p50": pct([r["decode_tok_s"] for r in ok if r["decode_tok_s"]], 0.5),
        "wall_s": wall,
    }


ENGINE = """
import json, sys, time
sys.argv = sys.argv[:1]
import torch
from lmforge.infer.loaded import load
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.scheduler import Scheduler
cfg = json.loads(%r)
lm = load(None)
scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=cfg["max_batch"], max_seq_len=1024,
                      prefix_cache_bytes=int(cfg["prefix_cache_mb"] * 2**20)).start()
def chat_ids(prompt):
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return lm.tokenizer.encode(text)
def sampling(max_tokens):
    return SamplingParams(max_tokens=max_tokens, temperature=0.8, ignore_eos=True)
def measure(start, events):
    # time to the first token, and the decode rate after it, of one streamed request
    first = last = None
    tokens = 0
    for event in events:
        if event.token_ids:
            last = time.perf_counter()
            first = first or last
            tokens += len(event.token_ids)
    return {"ttft": first - start, "tokens": tokens, "decode_tok_s": (tokens - 1) / (last - first)}
def request(prompt, max_tokens):
    params = sampling(max_tokens)
    start = time.perf_counter()
    return measure(start, scheduler.submit(chat_ids(prompt), params, stream=True))
def stepped(own, handle):
    busy = True
    while busy:
        busy = own.step()
        yield from handle.poll()
def direct(prompt, max_tokens):
    # What Generator.stream does: a one-row scheduler stepped on this thread.
    ids = chat_ids(prompt)
    own = Scheduler(lm.model, lm.tokenizer, max_batch=1, max_seq_len=len(ids) + max_tokens, prefix_cache_bytes=0)
    start = time.perf_counter()
    handle = own.submit(ids, sampling(max_tokens), stream=True)
    return measure(start, stepped(own, handle))
request("Hello", 8)
print("ready", flush=True)
for line in sys.stdin:
    prompts = json.loads(line)
    print(json.dumps([request(p, cfg["max_tokens"]) for p in prompts]), flush=True)
    print(json.dumps([direct(p, cfg["max_tokens"]) for p in prompts]), flush=True)
scheduler.shutdown()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client, back to back")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prefix-cache-mb", type=float, default=None, help="passed to lmforge serve (default: its own)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the phases; each phase reports its median round")
    ap.add_argument("--weights", choices=("float", "q4", "q8"), default="float",
                    help="passed to lmforge serve: the linear layers kept quantized (not with --engine)")
    ap.add_argument("--engine", action="store_true",
                    help="also stream the requests straight from a Scheduler built like the server's, in each round")
    args = ap.parse_args()
    if args.engine and args.weights != "float":
        ap.error("--engine builds the default float model; leave out --weights")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    db = os.path.join(tempfile.mkdtemp(prefix="lmforge-bench-"), "serve.db")
    command = [sys.executable, "-m", "lmforge", "serve", "--port", str(port), "--max-batch", str(args.max_batch),
               "--max-seq-len", "1024", "--db", db]
    if args.prefix_cache_mb is not None:
        command += ["--prefix-cache-mb", str(args.prefix_cache_mb)]
    if args.weights != "float":
        command += ["--weights", args.weights]
    server = subprocess.Popen(command,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engine = None
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                sys.exit("the server did not start")
            time.sleep(0.5)
        one_request(url, "Hello", 8)  # warm-up
        if args.engine:
            from lmforge.serve.config import ServeRuntime

            cache_mb = ServeRuntime().prefix_cache_mb if args.prefix_cache_mb is None else args.prefix_cache_mb
            engine = subprocess.Popen([sys.executable, "-c", ENGINE % json.dumps(
                {"max_batch": args.max_batch, "prefix_cache_mb": cache_mb, "max_tokens": args.max_tokens})],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            if engine.stdout.readline().strip() != "ready":
                sys.exit("the engine process did not start")
        engine_runs: list[dict] = []
        runs: dict[int, list[dict]] = {c: [] for c in args.clients}
        progress = Progress("serve benchmark", args.rounds * len(args.clients), unit="phases", log_every=0.0)
        for r in range(args.rounds):
            for clients in args.clients:
                before = rss_mb(server.pid)
                row = phase(url, clients, args.requests, args.max_tokens)
                row["rss_before_mb"], row["rss_after_mb"] = round(before, 1), round(rss_mb(server.pid), 1)
                runs[clients].append(row)
                if engine is not None and clients == 1:
                    engine.stdin.write(json.dumps([PROMPTS[j % len(PROMPTS)] for j in range(args.requests)]) + "\n")
                    engine.stdin.flush()
                    done = json.loads(engine.stdout.readline())
                    alone = json.loads(engine.stdout.readline())
                    engine_runs.append({"decode_tok_s_p50": sorted(r["decode_tok_s"] for r in done)[len(done) // 2],
                                        "ttft_p50_s": sorted(r["ttft"] for r in done)[len(done) // 2],
                                        "direct_tok_s_p50": sorted(r["decode_tok_s"] for r in alone)[len(alone) // 2]})
                progress.update(progress.done + 1, info=(
                    f"round {r + 1}: {clients:>3} clients: {row['tokens_per_s']:7.1f} tok/s, TTFT p50 "
                    f"{row['ttft_p50_s']:.2f}s p95 {row['ttft_p95_s']:.2f}s, latency p50 {row['latency_p50_s']:.2f}s "
                    f"p95 {row['latency_p95_s']:.2f}s, errors {row['errors']}, "
                    f"RSS {row['rss_before_mb']:.0f}->{row['rss_after_mb']:.0f} MB"))
        progress.close()
        rows = []
        for clients in args.clients:
            ordered = sorted(runs[clients], key=lambda row: row["tokens_per_s"])
            median = dict(ordered[len(ordered) // 2])
            median["errors"] = sum(row["errors"] for row in ordered)
            median["tokens_per_s_rounds"] = [round(row["tokens_per_s"], 1) for row in runs[clients]]
            rows.append(median)
        peak_rss = max(row["rss_after_mb"] for rs in runs.values() for row in rs)
    finally:
        server.terminate()
        server.wait(30)
        if engine is not None:
            engine.stdin.close()
            engine.wait(30)
    base = rows[0]["tokens_per_s"]
    out = {
        "benchmark": "serve",
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
        "date": time.strftime("%Y-%m-%d"),
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "prefix_cache_mb": args.prefix_cache_mb,
        "weights": args.weights,
        "peak_rss_mb": peak_rss,
        "phases": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "scaling_vs_first": {str(r["clients"]): round(r["tokens_per_s"] / base, 2) for r in rows},
        # each round's phases against that round's first phase: measured seconds apart, so a swing
        # of the machine's speed between rounds cancels out of the ratio
        "scaling_per_round": {str(c): [round(a["tokens_per_s"] / b["tokens_per_s"], 2)
                                       for a, b in zip(runs[c], runs[args.clients[0]])] for c in args.clients},
    }
    out["scaling_median_of_rounds"] = {c: statistics.median(v) for c, v in out["scaling_per_round"].items()}
    if engine_runs:
        served = runs[1]
        out["engine"] = {
            "decode_tok_s_rounds": [round(r["decode_tok_s_p50"], 1) for r in engine_runs],
            "ttft_p50_s_rounds": [round(r["ttft_p50_s"], 3) for r in engine_runs],
            "server_decode_tok_s_rounds": [round(r["decode_tok_s_p50"], 1) for r in served],
            "server_vs_engine_rounds": [round(a["decode_tok_s_p50"] / b["decode_tok_s_p50"], 3)
                                        for a, b in zip(served, engine_runs)],
            "direct_decode_tok_s_rounds": [round(r["direct_tok_s_p50"], 1) for r in engine_runs],
            "server_vs_direct_rounds": [round(a["decode_tok_s_p50"] / b["direct_tok_s_p50"], 3)
                                        for a, b in zip(served, engine_runs)],
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
