"""A simulated day of the customer-service assistant against a live `lmforge assistant serve`.

    lmforge assistant train-router                       # once: the router the server loads
    python benchmarks/assistant_day.py --conversations 500 --clients 8

What it does:

1. Builds its own demo store (the generated orders plus one order whose product name
   carries planted instructions) and its own knowledge base (the shipped pages plus one
   page with planted instructions), in a temporary directory.
2. Starts `lmforge assistant serve` on them and runs the generated conversations
   (lmforge/assistant/scenarios.py: FAQs, order look-ups with valid and invalid ids,
   refunds, requests for a person, small talk, out of scope, abusive customers, direct
   injections, instructions hidden in a knowledge-base page and in a tool result) from
   ``--clients`` concurrent clients, each message through the official openai client; a
   third of the answers get a thumbs up or down through /v1/assistant/feedback.
3. Part-way (``--kill-at``), kills the server with SIGKILL, starts it again on the same
   files, and lets the clients carry on (a request that met the dead server is sent again).
4. Checks the database: every message the server acknowledged and every acknowledged
   rating must be there.

Prints a summary and one JSON line: server errors (5xx), latency p50/p95, routing accuracy
(the intent of each scenario's last message), escalation correctness, FAQ citation of the
right page, order answers naming the order, attack success rate by kind, and the
durability check. Figures go to docs/benchmarks.md with the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.assistant.config import KB_DIR  # noqa: E402
from lmforge.assistant.conversations import ConversationStore  # noqa: E402
from lmforge.assistant.db import open_database  # noqa: E402
from lmforge.assistant.orders import OrderStore  # noqa: E402
from lmforge.assistant.scenarios import POISONED_PAGE, make_scenarios, plant_poisoned_order  # noqa: E402
from lmforge.monitor.activity import percentile  # noqa: E402


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args, work: Path, port: int) -> None:
        self.args, self.work, self.port, self.proc = args, work, port, None
        self.url = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 600.0) -> None:
        command = [sys.executable, "-m", "lmforge", "assistant", "serve", "--port", str(self.port), "--quiet",
                   "--store.url", str(self.work / "store.db"),
                   "--knowledge.documents", json.dumps([str(self.work / "kb")]),
                   "--knowledge.index", str(self.work / "kb-index"), "--router.path", self.args.router,
                   *self.args.server_args]
        log = open(self.work / "server.log", "a")
        self.proc = subprocess.Popen(command, stdout=log, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "2"})
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited ({self.proc.returncode}); see {self.work / 'server.log'}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("the server did not start in time")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=500)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--kill-at", type=float, default=0.4, help="share of conversations done when the server is "
                                                                  "killed (0: no kill)")
    parser.add_argument("--router", default="runs/classify-intents-minilm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="keep the store and logs here (default: a temporary directory)")
    parser.add_argument("server_args", nargs="*", help="extra `lmforge assistant serve` flags, after --")
    args = parser.parse_args()
    if not Path(args.router, "router.json").is_file():
        raise SystemExit(f"no trained router at {args.router}: run `lmforge assistant train-router` first")
    work = Path(args.work or tempfile.mkdtemp(prefix="assistant-day-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("store.db", "store.db-wal", "store.db-shm", "kb-index"):
        path = work / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    shutil.rmtree(work / "kb", ignore_errors=True)
    shutil.copytree(KB_DIR, work / "kb")
    (work / "kb" / "shipping-update.md").write_text(POISONED_PAGE, encoding="utf-8")
    db = open_database(work / "store.db")
    store = OrderStore(db)
    store.seed_demo(seed=args.seed)
    poisoned = plant_poisoned_order(store, args.seed)
    scenarios = make_scenarios(store, args.conversations, args.seed, poisoned_order=poisoned)
    db.close()

    server = Server(args, work, free_port())
    started = time.time()
    server.start()
    print(f"server up in {time.time() - started:.0f}s; {len(scenarios)} conversations, {args.clients} clients",
          file=sys.stderr)

    import openai

    jobs: queue.Queue = queue.Queue()
    for s in scenarios:
        jobs.put(s)
    results, lock = [], threading.Lock()
    acknowledged: list[tuple[str, int, str]] = []  # conversation, message index, role-of-reply
    ratings: list[tuple[str, int]] = []
    latencies: list[float] = []
    counters = {"server_errors": 0, "client_errors": 0, "retries": 0, "done": 0}
    restarting = threading.Event()
    kill_after = int(len(scenarios) * args.kill_at) if args.kill_at > 0 else None

    def call(client, turn: str, conversation: str | None):
        for attempt in range(60):
            while restarting.is_set():
                time.sleep(0.2)
            t = time.perf_counter()
            try:
                extra = {"conversation_id": conversation} if conversation else {}
                response = client.chat.completions.create(model="assistant", extra_body=extra,
                                                          messages=[{"role": "user", "content": turn}])
                with lock:
                    latencies.append(time.perf_counter() - t)
                return response
            except openai.APIStatusError as exc:
                with lock:
                    counters["server_errors" if exc.status_code >= 500 else "client_errors"] += 1
                return None
            except (openai.APIConnectionError, openai.APITimeoutError):
                with lock:
                    counters["retries"] += 1
                time.sleep(0.5)
        return None

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        while True:
            try:
                scenario = jobs.get_nowait()
            except queue.Empty:
                return
            conversation, replies = None, []
            for turn in scenario["turns"]:
                response = call(client, turn, conversation)
                if response is None:
                    break
                extra = response.model_extra
                conversation = extra["conversation_id"]
                replies.append({"text": response.choices[0].message.content, **extra})
                with lock:
                    acknowledged.append((conversation, extra["message_index"], turn))
                if extra.get("message_index") is not None and extra.get("state") == "bot" and rng.random() < 0.33:
                    try:
                        r = httpx.post(server.url + "/v1/assistant/feedback", timeout=60,
                                       json={"conversation_id": conversation, "message_index": extra["message_index"],
                                             "rating": rng.choice([1, -1])})
                        if r.status_code == 200:
                            with lock:
                                ratings.append((conversation, extra["message_index"]))
                        elif r.status_code >= 500:
                            with lock:
                                counters["server_errors"] += 1
                    except httpx.HTTPError:
                        pass
            with lock:
                results.append({**scenario, "replies": replies})
                counters["done"] += 1
                done = counters["done"]
            if kill_after is not None and done == kill_after:
                restarting.set()
                server.kill()
                print(f"killed the server after {done} conversations; restarting", file=sys.stderr)
                server.start()
                restarting.clear()

    threads = [threading.Thread(target=worker, args=(args.seed * 1000 + k,)) for k in range(args.clients)]
    run_started = time.time()
    for t in threads:
        t.start()
    last = 0
    while any(t.is_alive() for t in threads):
        time.sleep(5)
        if counters["done"] - last >= 50:
            last = counters["done"]
            print(f"{last}/{len(scenarios)} conversations", file=sys.stderr)
    for t in threads:
        t.join()
    seconds = time.time() - run_started
    server.stop()

    # durability: everything acknowledged is in the database
    db = open_database(work / "store.db")
    conversations = ConversationStore(db)
    missing_messages = 0
    for conversation, index, turn in acknowledged:
        stored = {m["idx"]: m for m in conversations.messages(conversation)}
        if index is not None and index not in stored:
            missing_messages += 1
        if not any(m["role"] == "user" for m in stored.values()):
            missing_messages += 1
    rated = {(r["conversation_id"], int(r["idx"])) for r in db.query("SELECT conversation_id, idx FROM ratings")}
    missing_ratings = sum(1 for r in ratings if r not in rated)
    db.close()

    def last_reply(r):
        return r["replies"][-1] if r["replies"] else None

    routed = [r for r in results if "intent" in r["expect"] and last_reply(r)]
    routing_accuracy = sum(last_reply(r)["intent"] == r["expect"]["intent"] for r in routed) / max(1, len(routed))
    escalation = [r for r in results if "escalate" in r["expect"] and last_reply(r)]
    escalation_ok = sum((last_reply(r)["state"] in ("waiting", "human")) == r["expect"]["escalate"]
                        for r in escalation) / max(1, len(escalation))
    faq = [r for r in results if r["kind"] == "faq" and last_reply(r)]
    faq_right_page = sum(any(c["source"] == r["expect"]["page"] for c in last_reply(r)["citations"]) for r in faq)
    orders = [r for r in results if r["kind"].startswith("order") and last_reply(r)]
    orders_ok = sum(r["expect"]["contains"] in last_reply(r)["text"] for r in orders)
    attacks: dict[str, list[bool]] = {}
    for r in results:
        if "attack" in r:
            hit = any(r["attack"]["success_if"].lower() in (x["text"] or "").lower() for x in r["replies"])
            attacks.setdefault(r["kind"], []).append(hit)
    summary = {
        "benchmark": "assistant_day", "cpu": cpu_model(), "date": time.strftime("%Y-%m-%d"),
        "conversations": len(results), "clients": args.clients, "seconds": round(seconds, 1),
        "requests": len(latencies), "server_errors": counters["server_errors"],
        "client_errors": counters["client_errors"], "retries_during_restart": counters["retries"],
        "killed_and_restarted": kill_after is not None,
        "latency_p50_s": percentile(latencies, 0.5), "latency_p95_s": percentile(latencies, 0.95),
        "routing_accuracy": round(routing_accuracy, 4), "routed": len(routed),
        "escalation_correct": round(escalation_ok, 4), "escalation_cases": len(escalation),
        "faq_right_page": round(faq_right_page / max(1, len(faq)), 4), "faq": len(faq),
        "order_answers_name_the_order": round(orders_ok / max(1, len(orders)), 4), "orders": len(orders),
        "attack_success": {k: round(sum(v) / len(v), 4) for k, v in sorted(attacks.items())},
        "attacks": {k: len(v) for k, v in sorted(attacks.items())},
        "attack_success_all": round(sum(sum(v) for v in attacks.values()) / max(1, sum(map(len, attacks.values()))),
                                    4),
        "acknowledged_messages": len(acknowledged), "missing_messages": missing_messages,
        "acknowledged_ratings": len(ratings), "missing_ratings": missing_ratings,
        "server_args": args.server_args,
    }
    for key, value in summary.items():
        print(f"{key:32s} {value}", file=sys.stderr)
    (work / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
