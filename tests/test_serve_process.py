"""`lmforge serve` as a real process: startup checks and graceful shutdown."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from lmforge.cli import main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_non_loopback_bind_requires_api_key(capsys):
    code = main(["serve", "--host", "0.0.0.0", "--port", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "--api-key" in err and err.count("\n") == 1


@pytest.mark.slow
def test_sigterm_finishes_inflight_stream_then_exits(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        payload = {"model": "smollm2-135m-instruct", "prompt": "Once upon a time", "max_tokens": 40,
                   "temperature": 0.8, "seed": 1, "stream": True, "ignore_eos": True}
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=payload, timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 3:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
        assert lines[-1] == "data: [DONE]"  # the in-flight stream ran to its end
        assert sum(1 for line in lines if '"text": "' in line and '"finish_reason": null' in line) >= 10
        assert proc.wait(60) == 0
        try:  # and no new connections are accepted any more
            httpx.get(url + "/health", timeout=2)
            accepted = True
        except httpx.HTTPError:
            accepted = False
        assert not accepted
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
