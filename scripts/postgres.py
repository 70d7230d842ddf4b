#!/usr/bin/env python3
"""A private PostgreSQL server with pgvector, for lmforge's PostgreSQL vector store and its tests.

    python scripts/postgres.py start [--dir DIR] [--port PORT]   # prints the server's URL
    python scripts/postgres.py url   [--dir DIR]
    python scripts/postgres.py stop  [--dir DIR]

The server is the one the PyPI package `pgserver` ships (PostgreSQL 16 with the `vector`
extension, no system install needed; it is in lmforge's test extra), or any PostgreSQL
whose binaries `--bin-dir` names. It listens on 127.0.0.1 only, at a free port, trusts
local connections (no password: it is a private instance for one user), and keeps its data,
log and URL in DIR (default: a directory under the system's temporary directory).

PostgreSQL refuses to run as root. Run as root (containers, CI), the server runs as an
unprivileged user instead (`nobody` unless `--user` says otherwise): DIR is made theirs, and
DIR and the binaries must be reachable by that user (any directory under /tmp is).

Tests import this file and call `start`/`stop`; its errors are `LmforgeError`s with one line
that says what to do.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.errors import LmforgeError  # noqa: E402

STATE_FILE = "lmforge-postgres.json"
DEFAULT_DIR = Path(tempfile.gettempdir()) / f"lmforge-postgres-{os.getuid()}"
START_TIMEOUT_S = 60


def binaries(bin_dir: str | Path | None = None) -> Path:
    """The directory holding initdb, pg_ctl and postgres."""
    if bin_dir is None:
        bin_dir = os.environ.get("LMFORGE_POSTGRES_BIN")
    if bin_dir is None:
        spec = importlib.util.find_spec("pgserver")  # located, not imported: its import has side effects
        if spec is None or not spec.submodule_search_locations:
            raise LmforgeError("no PostgreSQL found: pip install pgserver (lmforge's test extra), "
                               "or pass --bin-dir with a PostgreSQL that has pgvector")
        bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    bin_dir = Path(bin_dir)
    for name in ("initdb", "pg_ctl", "postgres"):
        if not (bin_dir / name).is_file():
            raise LmforgeError(f"{bin_dir} has no {name}: not a PostgreSQL bin directory")
    return bin_dir


def service_user(user: str | None = None) -> pwd.struct_passwd | None:
    """The account the server runs as: None (this one) unless we are root."""
    if os.geteuid() != 0:
        return None
    name = user or os.environ.get("LMFORGE_POSTGRES_USER") or "nobody"
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise LmforgeError(f"PostgreSQL refuses to run as root and there is no user {name!r} to run it as: "
                           f"create one or pass --user") from None


def _reachable_by(path: Path, account: pwd.struct_passwd) -> Path | None:
    """The first directory on the way to `path` that `account` cannot enter (None: all can be)."""
    for parent in reversed([path, *path.parents]):
        if not parent.exists():
            break
        st = parent.stat()
        if st.st_uid == account.pw_uid:
            ok = st.st_mode & 0o100
        elif st.st_gid == account.pw_gid:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if parent.is_dir() and not ok:
            return parent
    return None


def _run(args: list[str], account: pwd.struct_passwd | None, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    kwargs = {}
    if account is not None:
        kwargs = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no stray PGDATA/PGPORT
    env["LC_ALL"] = "C"
    try:
        return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        raise LmforgeError(f"{Path(args[0]).name} did not finish within {timeout:.0f} s") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(directory: Path) -> dict | None:
    try:
        return json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _running(directory: Path) -> bool:
    pid_file = directory / "data" / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by the service user
    return True


def url(directory: str | Path = DEFAULT_DIR) -> str:
    """The URL of the server running in `directory`."""
    directory = Path(directory)
    state = _state(directory)
    if state is None or not _running(directory):
        raise LmforgeError(f"no PostgreSQL is running in {directory}: start one with "
                           f"python scripts/postgres.py start --dir {directory}")
    return state["url"]


def start(directory: str | Path = DEFAULT_DIR, *, port: int | None = None, bin_dir: str | Path | None = None,
          user: str | None = None) -> str:
    """Start (initializing on first use) a server with its data in `directory`; its URL.

    A server already running there is left alone and its URL returned.
    """
    directory = Path(directory).resolve()
    if (directory / STATE_FILE).exists() and _running(directory):
        return url(directory)
    bins = binaries(bin_dir)
    account = service_user(user)
    directory.mkdir(parents=True, exist_ok=True)
    if account is not None:
        # The directory itself becomes theirs; the directories above it must let them through.
        for path, what in ((directory.parent, "the data directory"), (bins, "the PostgreSQL binaries")):
            blocked = _reachable_by(path, account)
            if blocked is not None:
                raise LmforgeError(f"PostgreSQL runs as {account.pw_name} (it refuses root), who cannot enter "
                                   f"{blocked} on the way to {what}: choose a directory under "
                                   f"{tempfile.gettempdir()} or allow others to enter {blocked} (chmod o+x)")
        os.chown(directory, account.pw_uid, account.pw_gid)
    data = directory / "data"
    if not (data / "PG_VERSION").exists():
        if data.exists():
            shutil.rmtree(data)  # a half-initialized cluster from an interrupted initdb
        result = _run([str(bins / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                       "--no-locale", "--no-sync"], account, directory, START_TIMEOUT_S)
        if result.returncode != 0:
            raise LmforgeError(f"initdb failed in {data}: {_last_line(result)}")
    for attempt in range(3):  # the free port we picked may be taken before the server binds it
        chosen = port or _free_port()
        log = directory / "postgres.log"
        result = _run([str(bins / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", str(START_TIMEOUT_S),
                       "-o", f"-h 127.0.0.1 -p {chosen} -k ''", "start"], account, directory, START_TIMEOUT_S + 10)
        if result.returncode == 0:
            address = f"postgresql://postgres@127.0.0.1:{chosen}/postgres"
            state = {"url": address, "port": chosen, "started": time.time()}
            tmp = directory / f".{STATE_FILE}.tmp"
            tmp.write_text(json.dumps(state))
            os.replace(tmp, directory / STATE_FILE)
            return address
        if port is not None:
            break
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
    raise LmforgeError(f"PostgreSQL did not start in {directory}: {tail[0] if tail else _last_line(result)} "
                       f"(log: {log})")


def stop(directory: str | Path = DEFAULT_DIR, *, bin_dir: str | Path | None = None, user: str | None = None,
         remove: bool = False) -> None:
    """Stop the server running in `directory` (fast shutdown); with `remove`, delete its data too."""
    directory = Path(directory).resolve()
    if _running(directory):
        result = _run([str(binaries(bin_dir) / "pg_ctl"), "-D", str(directory / "data"), "-m", "fast", "-w", "stop"],
                      service_user(user), directory, START_TIMEOUT_S)
        if result.returncode != 0 and _running(directory):
            raise LmforgeError(f"could not stop PostgreSQL in {directory}: {_last_line(result)}")
    (directory / STATE_FILE).unlink(missing_ok=True)
    if remove:
        shutil.rmtree(directory, ignore_errors=True)


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = (result.stderr or result.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "url"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"data directory (default {DEFAULT_DIR})")
    parser.add_argument("--port", type=int, help="TCP port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--bin-dir", help="PostgreSQL bin directory (default: the one pgserver ships)")
    parser.add_argument("--user", help="account to run the server as when started by root (default nobody)")
    parser.add_argument("--remove", action="store_true", help="with stop: delete the data directory as well")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            print(start(args.dir, port=args.port, bin_dir=args.bin_dir, user=args.user))
        elif args.action == "url":
            print(url(args.dir))
        else:
            stop(args.dir, bin_dir=args.bin_dir, user=args.user, remove=args.remove)
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
