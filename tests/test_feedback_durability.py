"""Acknowledged feedback survives SIGKILL of `lmforge serve` in the middle of a stream."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lmforge", "serve", "--host", "127.0.0.1", "--port", str(port), "--db", str(db),
           "--max-batch", "2", "--device", "cpu", "--dtype", "float32"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"lmforge serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"lmforge serve did not come up:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_acknowledged_feedback_survives_sigkill_mid_stream(tmp_path):
    db, port, log = tmp_path / "serve.db", free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    proc = start_server(db, port, log)
    acknowledged: dict[int, tuple[int, str]] = {}  # message id -> (rating, comment) the server confirmed
    try:
        client = httpx.Client(base_url=url, timeout=30)
        turns = [m for k in range(1000) for m in ({"role": "user", "content": f"question {k}"},
                                                  {"role": "assistant", "content": f"answer {k}"})]
        conv = client.post("/api/conversations", json={"messages": turns[:1000]}).json()
        added = client.post(f"/api/conversations/{conv['id']}/messages", json={"messages": turns[1000:]}).json()
        answers = [m["id"] for m in conv["messages"] + added["data"] if m["role"] == "assistant"]
        for k, mid in enumerate(answers[:5]):  # some before the stream starts
            r = client.post("/api/feedback", json={"message_id": mid, "rating": 1 if k % 2 else -1, "comment": f"c{k}"})
            assert r.status_code == 201
            acknowledged[mid] = (r.json()["rating"], r.json()["comment"])

        # More feedback keeps arriving while the model streams; the kill lands among these writes.
        streaming = threading.Event()
        killed = threading.Event()

        def keep_rating():
            with httpx.Client(base_url=url, timeout=10) as c:
                streaming.wait(60)
                for k, mid in enumerate(answers[5:], start=5):
                    if killed.is_set():
                        return
                    try:
                        r = c.post("/api/feedback", json={"message_id": mid, "rating": 1, "comment": f"live {k}"})
                    except httpx.HTTPError:
                        return  # the server died before answering: not acknowledged
                    if r.status_code == 201:
                        acknowledged[mid] = (1, f"live {k}")
                    time.sleep(0.01)  # paced, so the supply of answers outlasts a slow stream

        rater = threading.Thread(target=keep_rating)
        rater.start()
        pieces, done = [], False
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
                "max_tokens": 1000, "temperature": 0.8, "stream": True}) as r:
            assert r.status_code == 200
            try:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                    if delta:
                        pieces.append(delta)
                        streaming.set()
                    if len(pieces) == 4:
                        deadline = time.time() + 15  # let the rater land some writes first
                        while len(acknowledged) < 15 and time.time() < deadline:
                            time.sleep(0.02)
                        proc.send_signal(signal.SIGKILL)
                        killed.set()
            except (httpx.HTTPError, json.JSONDecodeError):
                pass  # the connection dies with the server
        killed.set()
        rater.join(30)
        client.close()
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL and not done, "the server was not killed mid-stream"
        assert 5 < len(acknowledged) < len(answers), "the kill did not land while feedback was being written"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    proc = start_server(db, port, log)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            stored = {e["message_id"]: (e["rating"], e["comment"]) for e in client.get("/api/feedback").json()["data"]}
            missing = {mid: v for mid, v in acknowledged.items() if stored.get(mid) != v}
            assert not missing, f"{len(missing)} acknowledged ratings lost or changed: {missing}"
            # The server works again: chat, and new feedback is stored.
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                          "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
            assert client.get(f"/api/conversations/{conv['id']}").json()["message_count"] == 2000
            more = client.post(f"/api/conversations/{conv['id']}/messages", json={"messages": [
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "sure"}]}).json()["data"]
            assert client.post("/api/feedback", json={"message_id": more[1]["id"], "rating": 1}).status_code == 201
    finally:
        stop(proc)
