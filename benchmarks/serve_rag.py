"""`lmforge serve --rag`: what serving costs an answer, and what answers cost the other requests.

One process: the default model and the handbook index (built on first use) behind a real
server on loopback (uvicorn in a thread, the official HTTP path), and the same answers
computed in-process with `Answerer` as the reference, in the same run.

1. Overhead: the labelled handbook questions answered extractively, one at a time, by
   `Answerer` directly and through POST /v1/chat/completions; the texts must be equal, and
   the ratio of mean latencies is the cost of serving (HTTP, the answer's thread, the
   embedder queued on the scheduler's thread).
2. Concurrency: the same questions from several clients at once (answers per second).
3. Interference: the decode speed of a plain streaming chat request alone, and while
   clients keep asking the knowledge base, with the embedder on the scheduler's thread
   (lmforge's choice) and on each answer's own thread (the alternative), side by side.
4. Auto answers: the served model writes first and only supported sentences are kept,
   else the answer falls back to the sources' own sentences; how often each happens with
   the default model, and what it costs.

    python benchmarks/serve_rag.py
    python benchmarks/serve_rag.py --questions 40 --clients 4 --auto-questions 8 --rounds 3

Prints one line per phase and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

from lmforge.io.progress import Progress

QUESTIONS = Path(__file__).resolve().parents[1] / "lmforge" / "rag" / "data" / "handbook_questions.jsonl"
PLAIN = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]


def questions(n: int) -> list[str]:
    rows = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    english = [r["question"] for r in rows if r["lang"] == "en"]
    chinese = [r["question"] for r in rows if r["lang"] != "en"]
    picked = english[: n - n // 4] + chinese[: n // 4]  # three English questions to one Chinese
    return picked[:n]


class Server:
    """A live server in this process, on a free loopback port."""

    def __init__(self, lm, knowledge, answer: str, max_batch: int) -> None:
        import uvicorn

        from lmforge.infer.scheduler import Scheduler
        from lmforge.serve.app import ServeSettings, create_app

        self.scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=max_batch, max_seq_len=2048).start()
        settings = ServeSettings(rag=knowledge.location, rag_answer=answer)
        app = create_app(self.scheduler, lm.tokenizer, lm.name, settings, knowledge=knowledge)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.scheduler.shutdown(drain=False, timeout=10)


_local = threading.local()


def ask(url: str, question: str, **extra) -> tuple[dict, float]:
    """One answer and its latency, on this thread's keep-alive connection (as real clients keep one)."""
    if getattr(_local, "client", None) is None:
        _local.client = httpx.Client(timeout=600)
    start = time.perf_counter()
    r = _local.client.post(url + "/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": question}], **extra})
    r.raise_for_status()
    return r.json(), time.perf_counter() - start


def plain_decode(url: str, max_tokens: int) -> float:
    """Tokens per second of one streamed plain chat answer, from its first token to its last."""
    payload = {"messages": PLAIN, "max_tokens": max_tokens, "temperature": 0.8, "ignore_eos": True, "stream": True,
               "rag": False, "stream_options": {"include_usage": True}}
    first = tokens = None
    with httpx.stream("POST", url + "/v1/chat/completions", json=payload, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    return (tokens - 1) / (time.perf_counter() - first)


def clients_asking(url: str, qs: list[str], clients: int, stop: threading.Event | None = None) -> list[float]:
    """`clients` threads asking `qs` round robin (all once, or until `stop`); the latencies."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        i = k
        while (stop is None and i < len(qs)) or (stop is not None and not stop.is_set()):
            _, seconds = ask(url, qs[i % len(qs)])
            with lock:
                latencies.append(seconds)
            i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=32, help="labelled handbook questions asked (3 English : 1 Chinese)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients in the concurrency and interference phases")
    ap.add_argument("--decode-tokens", type=int, default=96, help="tokens of the plain request timed for interference")
    ap.add_argument("--auto-questions", type=int, default=6, help="questions answered in auto mode (0: skip)")
    ap.add_argument("--rounds", type=int, default=3, help="repeats of the timed phases; medians are reported")
    ap.add_argument("--index", help="an index to serve (default: the handbook's, built on first use)")
    args = ap.parse_args()

    import lmforge
    from lmforge.rag.answer import Answerer
    from lmforge.rag.config import AnswerOptions
    from lmforge.rag.embedder import load_embedder
    from lmforge.serve import rag as served

    embedder = load_embedder()
    if args.index is None:
        from lmforge.rag.handbook import handbook_index

        line = Progress("indexing the handbook (first use)", unit="chunks")
        index = str(handbook_index(embedder, progress=lambda stage, done, total: line.update(done, total=total)))
        line.close()
    else:
        index = args.index
    knowledge = served.KnowledgeBase.open(index)
    lm = lmforge.load(dtype="float32", device="cpu")
    qs = questions(args.questions)
    out: dict = {"benchmark": "serve_rag", "machine": f"{platform.machine()} {os.cpu_count()} cpu",
                 "date": time.strftime("%Y-%m-%d"), "chunks": knowledge.chunks, "questions": len(qs),
                 "clients": args.clients, "rounds": args.rounds}
    progress = Progress("serve --rag benchmark", 4, unit="phases", log_every=0.0)

    # 1. Overhead against the in-process reference, answers compared. The reference runs first,
    # alone: PyTorch on two threads at once would slow both (see OnSchedulerThread).
    reference = Answerer(knowledge.retriever, None, AnswerOptions(mode="extractive"))
    reference.answer(qs[0])  # warm-up
    local_runs, served_runs, mismatches, wanted = [], [], 0, {}
    for _ in range(args.rounds):
        local = []
        for q in qs:
            start = time.perf_counter()
            wanted[q] = reference.answer(q)
            local.append(time.perf_counter() - start)
        local_runs.append(statistics.mean(local))
    with Server(lm, knowledge, "extractive", max_batch=8) as server:
        ask(server.url, qs[0])
        for _ in range(args.rounds):
            remote = []
            for q in qs:
                body, seconds = ask(server.url, q)
                remote.append(seconds)
                mismatches += body["choices"][0]["message"]["content"] != wanted[q].text
                mismatches += [s["id"] for s in body["sources"]] != [c.chunk.id for c in wanted[q].cited()]
            served_runs.append(statistics.mean(remote))
        local_s, served_s = statistics.median(local_runs), statistics.median(served_runs)
        out["overhead"] = {"in_process_mean_s": round(local_s, 4), "served_mean_s": round(served_s, 4),
                           "ratio": round(served_s / local_s, 2), "mismatches": mismatches}
        progress.update(1, info=f"overhead: in-process {local_s * 1000:.0f} ms, served {served_s * 1000:.0f} ms "
                                f"({served_s / local_s:.2f}x), {mismatches} mismatches")

        # 2. Concurrency.
        rates = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            clients_asking(server.url, qs, args.clients)
            rates.append(len(qs) / (time.perf_counter() - start))
        rate = statistics.median(rates)
        out["concurrency"] = {"sequential_answers_per_s": round(1 / served_s, 2),
                              f"answers_per_s_{args.clients}_clients": round(rate, 2),
                              "speedup": round(rate * served_s, 2)}
        progress.update(2, info=f"concurrency: {1 / served_s:.1f} answers/s alone, {rate:.1f} with "
                                f"{args.clients} clients ({rate * served_s:.2f}x)")

        # 3. Interference: plain decode alone, then beside answering clients, embedder on each thread.
        on_scheduler = served.OnSchedulerThread.encode

        def on_caller_thread(self, texts, *a, **kw):
            return self._embedder.encode(texts, *a, **kw)

        plain_decode(server.url, 8)
        rows = {"alone": [], "embedder_on_scheduler_thread": [], "embedder_on_answer_threads": []}
        answer_latency = {"embedder_on_scheduler_thread": [], "embedder_on_answer_threads": []}
        for _ in range(args.rounds):
            rows["alone"].append(plain_decode(server.url, args.decode_tokens))
            for name, encode in (("embedder_on_scheduler_thread", on_scheduler),
                                 ("embedder_on_answer_threads", on_caller_thread)):
                served.OnSchedulerThread.encode = encode
                stop = threading.Event()
                latencies: list[float] = []
                runner = threading.Thread(target=lambda: latencies.extend(
                    clients_asking(server.url, qs, args.clients, stop)))
                runner.start()
                time.sleep(0.5)
                rows[name].append(plain_decode(server.url, args.decode_tokens))
                stop.set()
                runner.join()
                answer_latency[name].append(statistics.median(latencies))
        served.OnSchedulerThread.encode = on_scheduler
        alone = statistics.median(rows["alone"])
        out["interference"] = {
            "plain_decode_tok_s_alone": round(alone, 1),
            **{f"plain_decode_tok_s_{k}": round(statistics.median(v), 1) for k, v in rows.items() if k != "alone"},
            **{f"answer_p50_s_{k}": round(statistics.median(v), 3) for k, v in answer_latency.items()},
            "decode_ratio_scheduler_vs_alone": round(statistics.median(rows["embedder_on_scheduler_thread"]) / alone, 2),
            "decode_ratio_answer_threads_vs_alone": round(statistics.median(rows["embedder_on_answer_threads"]) / alone,
                                                          2),
        }
        i = out["interference"]
        progress.update(3, info=(
            f"interference: plain decode {alone:.1f} tok/s alone; beside {args.clients} answering clients "
            f"{i['plain_decode_tok_s_embedder_on_scheduler_thread']} tok/s with the embedder on the scheduler thread "
            f"(answers p50 {i['answer_p50_s_embedder_on_scheduler_thread'] * 1000:.0f} ms), "
            f"{i['plain_decode_tok_s_embedder_on_answer_threads']} tok/s on the answers' threads "
            f"(p50 {i['answer_p50_s_embedder_on_answer_threads'] * 1000:.0f} ms)"))

    # 4. Auto mode: the served model writes, supported sentences are kept, else the sources'.
    if args.auto_questions:
        with Server(lm, knowledge, "auto", max_batch=8) as server:
            modes: dict[str, int] = {}
            seconds, written = [], 0
            for q in qs[: args.auto_questions]:
                body, took = ask(server.url, q)
                mode = body["rag"]["mode"]
                modes[mode] = modes.get(mode, 0) + 1
                seconds.append(took)
                written += body["usage"]["completion_tokens"]
            out["auto"] = {"answers": modes, "p50_s": round(statistics.median(seconds), 2),
                           "generated_tokens_per_answer": round(written / len(seconds), 1)}
        progress.update(4, info=f"auto: {modes}, p50 {statistics.median(seconds):.1f} s, "
                                f"{written / len(seconds):.0f} tokens written per answer")
    progress.close()
    knowledge.close()
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
