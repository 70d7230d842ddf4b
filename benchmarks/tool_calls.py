"""Tool calls of a live `lmforge serve` through the official `openai` client (S5).

Starts `lmforge serve` (default model unless --model) on a free loopback port and sends
the generated tool-use prompts (lmforge/agent/tool_prompts.py), each with all five
functions offered, non-streaming and streaming (the client's stream helper assembles
the `delta.tool_calls` chunks). For every response it checks that the calls parse as
JSON and validate against the called function's schema (`valid`: of all responses;
`cut_by_length`: responses the token budget ended before a whole call), that the first call names the
expected function, and that its arguments equal the expected ones exactly. Latency is
per request, client side. With --auto N, the first N prompts are also sent with
tool_choice "auto" to see how often the model chooses to call.

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/tool_calls.py --n 200 --auto 40
    python benchmarks/tool_calls.py --send 25 --stream-send 10   # a quicker sample of the set

Prints a table on stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.agent.tool_prompts import TOOLS, tool_prompts  # noqa: E402
from lmforge.agent.validate import schema_errors  # noqa: E402

SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def judge(calls, expected) -> dict:
    """valid: every call parses and validates; name/args: the first call is the expected one."""
    parsed = []
    for call in calls or []:
        try:
            arguments = json.loads(call.function.arguments)
        except (json.JSONDecodeError, TypeError):
            return {"called": True, "valid": False, "name": False, "args": False}
        if call.function.name not in SCHEMAS or schema_errors(arguments, SCHEMAS[call.function.name]):
            return {"called": True, "valid": False, "name": False, "args": False}
        parsed.append((call.function.name, arguments))
    if not parsed:
        return {"called": False, "valid": False, "name": False, "args": False}
    name, arguments = parsed[0]
    return {"called": True, "valid": True, "name": name == expected.name,
            "args": name == expected.name and json.dumps(arguments, sort_keys=True) ==
            json.dumps(expected.arguments, sort_keys=True)}


def run_mode(client, model, prompts, stream: bool, tool_choice: str, max_tokens: int, parallel: bool) -> dict:
    marks, seconds = [], []
    for p in prompts:
        kwargs = dict(model=model, messages=[{"role": "user", "content": p.prompt}], tools=TOOLS,
                      tool_choice=tool_choice, temperature=0.0, max_tokens=max_tokens, parallel_tool_calls=parallel)
        start = time.perf_counter()
        try:
            if stream:
                with client.chat.completions.stream(**kwargs) as s:
                    choice = s.get_final_completion().choices[0]
            else:
                choice = client.chat.completions.create(**kwargs).choices[0]
        except openai.LengthFinishReasonError as exc:  # the stream helper's way of reporting "length"
            choice = exc.completion.choices[0]
        seconds.append(time.perf_counter() - start)
        marks.append({**judge(choice.message.tool_calls, p), "cut": choice.finish_reason == "length",
                      "tool": p.name})
    n = len(marks)
    called = sum(m["called"] for m in marks)
    cut = [m["tool"] for m in marks if m["cut"]]
    return {"requests": n, "called": called / n, "valid": sum(m["valid"] for m in marks) / n,
            "cut_by_length": len(cut) / n, "cut_tools": {t: cut.count(t) for t in sorted(set(cut))},
            "valid_of_called": sum(m["valid"] for m in marks) / max(1, called),
            "name_accuracy": sum(m["name"] for m in marks) / n, "args_exact": sum(m["args"] for m in marks) / n,
            "latency_median_s": round(statistics.median(seconds), 3),
            "latency_p95_s": round(sorted(seconds)[max(0, int(0.95 * n) - 1)], 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model to serve (default: lmforge's default model)")
    ap.add_argument("--n", type=int, default=200, help="prompts")
    ap.add_argument("--send", type=int, default=None,
                    help="send only the first N prompts of the set in each mode (they cycle through the five functions)")
    ap.add_argument("--stream-send", type=int, default=None, help="of those, stream only the first N")
    ap.add_argument("--auto", type=int, default=0, help="also send the first N prompts with tool_choice auto")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--no-parallel", action="store_true", help="send parallel_tool_calls=false (one call a reply)")
    args = ap.parse_args()
    prompts = tool_prompts(args.n)
    sent = prompts[: args.send] if args.send else prompts
    streamed = sent[: args.stream_send] if args.stream_send is not None else sent
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "lmforge", "serve", "--port", str(port), "--max-batch", "1",
                   "--db", os.path.join(tmp, "serve.db")] + (["--model", args.model] if args.model else [])
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 300
            while time.time() < deadline:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(1)
            else:
                print("the server did not start", file=sys.stderr)
                return 1
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
            results = {}
            for name, stream, choice, subset in (("required", False, "required", sent),
                                                 ("required_stream", True, "required", streamed),
                                                 ("auto", False, "auto", prompts[: args.auto])):
                if subset:
                    results[name] = run_mode(client, model, subset, stream, choice, args.max_tokens,
                                             not args.no_parallel)
                    print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
        finally:
            server.terminate()
            server.wait(30)
    print(json.dumps({"benchmark": "tool_calls", "model": model, "prompts": args.n, "sent": len(sent),
                      "parallel_tool_calls": not args.no_parallel, "max_tokens": args.max_tokens, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
