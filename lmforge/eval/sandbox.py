"""Run untrusted Python (model-written code) in a child process with limits (E3).

Each run gets its own temporary directory as working directory, a minimal environment,
and these limits:

- wall-clock time: the whole process group is killed (SIGKILL) at `timeout`; CPU time
  is also capped with RLIMIT_CPU as a second line;
- memory: RLIMIT_AS caps the address space, so a memory bomb ends in `MemoryError`;
- output: stdout and stderr go to files capped by RLIMIT_FSIZE (a flood of prints
  cannot fill the parent's memory; Python then fails with "File too large");
- network: where unprivileged user namespaces work, the child runs in a fresh network
  namespace with no interfaces (`unshare -rn`); in every case an audit hook in the child
  refuses `socket.*` events;
- files: the same audit hook refuses opening for writing, deleting, renaming or
  changing anything outside the temporary directory, and refuses starting processes,
  loading native libraries through ctypes and raising the resource limits.

Limitations, on purpose stated plainly: the audit hook runs inside the untrusted
interpreter, so code that reaches C level (a compiled extension already importable,
or a CPython bug) can get around it. Without a network namespace the only network
barrier is that hook. The child starts with `-I -S` (no site-packages, no user
environment), so nothing outside the standard library is importable by default. For
hostile code, run the whole evaluation inside a container or VM; this sandbox is meant
to stop the accidents model-written code really makes: infinite loops, runaway
allocations, stray writes and network calls.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

# Runs in the child before the untrusted program: limits, then the audit hook, then the program.
_GUARD = r'''
import os, resource, runpy, sys
limits = {LIMITS!r}
for name, value in limits.items():
    resource.setrlimit(getattr(resource, name), (value, value))
ROOT = os.path.realpath(os.getcwd())
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {{"os.remove": 1, "os.rename": 2, "os.replace": 2, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1,
               "os.chown": 1, "os.link": 2, "os.symlink": 2, "os.truncate": 1, "os.utime": 1,
               "shutil.rmtree": 1, "shutil.copyfile": 2, "shutil.move": 2, "os.chdir": 1}}
FORBIDDEN = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
             "os.forkpty", "os.kill", "os.killpg", "pty.spawn", "ctypes.", "resource.setrlimit",
             "resource.prlimit", "sys.addaudithook", "os.putenv", "os.unsetenv", "webbrowser.open")

def inside(path):
    if isinstance(path, int):
        return True
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return real == ROOT or real.startswith(ROOT + os.sep) or real == os.devnull

def guard(event, args):
    if event.startswith("socket."):
        raise PermissionError("sandbox: network access is disabled")
    if event.startswith(FORBIDDEN):
        raise PermissionError(f"sandbox: {{event}} is not allowed")
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
        if writing and not inside(path):
            raise PermissionError(f"sandbox: writing outside the sandbox directory is not allowed: {{path}}")
    elif event in PATH_EVENTS:
        for path in args[: PATH_EVENTS[event]]:
            if path is not None and not inside(path):
                raise PermissionError(f"sandbox: {{event}} outside the sandbox directory is not allowed: {{path}}")

program = sys.argv[1]
sys.argv = [program]
sys.addaudithook(guard)
del guard, limits
runpy.run_path(program, run_name="__main__")
'''


@dataclass
class SandboxLimits:
    """What one run may use. `network` is never granted; the field documents intent in reports."""

    timeout: float = 10.0  # seconds of wall-clock time
    memory_mb: int = 1024  # address space (RLIMIT_AS); Python itself needs ~30 MB
    output_bytes: int = 1 << 20  # per stream, and the largest file the program may write
    open_files: int = 64


@dataclass
class SandboxResult:
    status: str  # "ok", "error" (non-zero exit), "timeout", "memory" or "output" (output limit)
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """True when `unshare -rn` can start a process in an empty network namespace here."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return False
    try:
        done = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def network_isolation() -> str:
    """How network access is blocked: "namespace+audit-hook" or "audit-hook" (see the module docstring)."""
    return "namespace+audit-hook" if network_namespace_available() else "audit-hook"


def _command(program: Path, limits: SandboxLimits, use_namespace: bool | None) -> list[str]:
    rlimits = {
        "RLIMIT_AS": int(limits.memory_mb) << 20,
        "RLIMIT_CPU": int(limits.timeout) + 2,
        "RLIMIT_FSIZE": int(limits.output_bytes),
        "RLIMIT_NOFILE": int(limits.open_files),
        "RLIMIT_CORE": 0,
    }
    python = [sys.executable, "-I", "-S", "-B", "-c", _GUARD.format(LIMITS=rlimits), str(program)]
    if use_namespace is None:
        use_namespace = network_namespace_available()
    return (["unshare", "-rn"] if use_namespace else []) + python


def _read(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(limit)
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def run_python(
    code: str,
    limits: SandboxLimits | None = None,
    files: dict[str, str] | None = None,
    use_namespace: bool | None = None,
) -> SandboxResult:
    """Run `code` as a script in a fresh temporary directory; the directory is removed afterwards.

    `files` are extra text files written beside the program. `use_namespace=None` uses a
    network namespace when one is available; False relies on the audit hook alone.
    """
    limits = limits or SandboxLimits()
    root = Path(tempfile.mkdtemp(prefix="lmforge-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        program = work / "program.py"
        program.write_text(code, encoding="utf-8")
        for name, text in (files or {}).items():
            target = (work / name).resolve()
            if not target.is_relative_to(work.resolve()):
                raise ValueError(f"sandbox file {name!r} would land outside the sandbox directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(work),
            "TMPDIR": str(work),
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        started = time.perf_counter()
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            proc = subprocess.Popen(
                _command(program, limits, use_namespace), cwd=work, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, start_new_session=True, close_fds=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
            except BaseException:
                _kill_group(proc)
                raise
        seconds = time.perf_counter() - started
        stdout = _read(root / "stdout", limits.output_bytes)
        stderr = _read(root / "stderr", limits.output_bytes)
        code_ = proc.returncode
        if timed_out:
            status = "timeout"
        elif code_ == 0:
            status = "ok"
        elif "MemoryError" in stderr[-4000:]:
            status = "memory"
        elif code_ in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or "File too large" in stderr[-4000:]:
            status = "output"
        elif code_ in (-signal.SIGXCPU, 128 + signal.SIGXCPU, -signal.SIGKILL):
            status = "timeout"
        else:
            status = "error"
        return SandboxResult(status, None if timed_out else code_, stdout, stderr, seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the child and anything it started (it leads its own session), then reap it.

    Called only while the child is unreaped, so its process-group id cannot have been reused.
    """
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
