"""The code-execution sandbox stops what model-written code really does wrong."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from lmforge.eval.sandbox import SandboxLimits, network_isolation, network_namespace_available, run_python

FAST = SandboxLimits(timeout=1.0, memory_mb=256)
MODES = [pytest.param(None, id="default"), pytest.param(False, id="audit-hook-only")]


def test_runs_a_program_and_captures_output():
    result = run_python("import math\nprint(math.factorial(5))", FAST)
    assert result.status == "ok" and result.passed
    assert result.stdout == "120\n"


def test_failing_assertion_is_an_error():
    result = run_python("assert 1 + 1 == 3, 'wrong'", FAST)
    assert result.status == "error" and not result.passed
    assert "AssertionError: wrong" in result.stderr


@pytest.mark.parametrize("code", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"], ids=["busy", "sleep"])
def test_runaway_program_is_killed_at_the_time_limit(code):
    started = time.perf_counter()
    result = run_python(code, FAST)
    elapsed = time.perf_counter() - started
    assert result.status == "timeout" and result.returncode is None
    assert 1.0 <= elapsed < 4.0


@pytest.mark.parametrize("code", [
    "block = bytearray(8 * 1024 ** 3)\n",
    "hoard = []\nwhile True:\n    hoard.append(' ' * 10 ** 7)\n",
], ids=["one-allocation", "gradual"])
def test_memory_bomb_is_stopped(code):
    # A generous time limit: on a loaded machine filling 256 MiB can take a while, and the
    # point is that the memory limit, not the clock, ends the program.
    result = run_python(code, SandboxLimits(timeout=20, memory_mb=256))
    assert result.status == "memory"
    assert "MemoryError" in result.stderr


@pytest.mark.parametrize("use_namespace", MODES)
def test_network_is_unreachable(use_namespace):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    got = []

    def accept():
        try:
            got.append(server.accept())
        except OSError:
            pass

    waiter = threading.Thread(target=accept)
    waiter.start()
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')\n"
    result = run_python(code, FAST, use_namespace=use_namespace)
    waiter.join()
    server.close()
    assert result.status == "error"
    assert not got, "the sandboxed program reached a socket outside"


def test_network_isolation_is_reported():
    assert network_isolation() in ("namespace+audit-hook", "audit-hook")
    assert (network_isolation() == "namespace+audit-hook") == network_namespace_available()


@pytest.mark.parametrize("use_namespace", MODES)
def test_writing_outside_the_sandbox_fails(tmp_path, use_namespace):
    target = tmp_path / "escaped.txt"
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for code in (f"open({str(target)!r}, 'w').write('x')",
                 f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n",
                 f"import os\nos.remove({str(victim)!r})",
                 f"import shutil\nshutil.copyfile('program.py', {str(target)!r})"):
        result = run_python(code, FAST, use_namespace=use_namespace)
        assert result.status == "error" and "PermissionError" in result.stderr, code
    assert not target.exists()
    assert victim.read_text() == "precious"


def test_writing_inside_the_sandbox_works_and_is_cleaned_up():
    code = ("import os, tempfile\nopen('notes.txt', 'w').write('kept')\nprint(open('notes.txt').read())\n"
            "print(os.getcwd())\nwith tempfile.NamedTemporaryFile('w') as f:\n    f.write('scratch')\n")
    result = run_python(code, FAST)
    assert result.status == "ok", result.stderr
    first, cwd = result.stdout.splitlines()
    assert first == "kept"
    assert "lmforge-sandbox-" in cwd
    import os

    assert not os.path.exists(cwd)


@pytest.mark.parametrize("code", ["import os\nos.system('true')", "import subprocess\nsubprocess.run(['true'])",
                                  "import os\nos.fork()", "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))"])
def test_processes_and_limit_changes_are_refused(code):
    result = run_python(code, FAST)
    assert result.status == "error" and "PermissionError" in result.stderr


def test_output_flood_is_capped():
    result = run_python("while True:\n    print('x' * 10000)\n", SandboxLimits(timeout=5, output_bytes=1 << 16))
    assert result.status == "output"
    assert len(result.stdout) <= 1 << 16


def test_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "do-not-leak")
    result = run_python("import os, sys\nprint(sorted(os.environ))\nprint(any('site-packages' in p for p in sys.path))", FAST)
    names, site = result.stdout.splitlines()
    assert "SECRET_TOKEN" not in names
    assert site == "False"
