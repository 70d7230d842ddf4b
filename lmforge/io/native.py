"""Small C kernels, compiled on the machine that runs them and loaded with ctypes.

A kernel is one C file shipped inside the package. The first call builds it with the
system's C compiler (`$CC`, else `cc`) for this CPU (`-O3 -march=native`, OpenMP where the
compiler has it) into lmforge's cache directory, keyed by a hash of the source, the
compiler, the flags and the CPU's feature flags; later processes load the built library in
milliseconds. Nothing here is required: where no compiler is present, the build fails, the
source is missing, or `LMFORGE_NATIVE=0` is set, `load` returns None and the caller keeps its
PyTorch path. The reason is kept in `why_not(name)`.

OpenMP: the library is linked against `libgomp.so.1`. PyTorch's CPU wheels ship a
`libgomp.so.1` of their own and load it first, so the kernels share PyTorch's thread pool
and its `torch.set_num_threads` setting instead of starting a second pool that would
compete with it for the same cores.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from .cache import cache_dir

_loaded: dict[str, ctypes.CDLL | None] = {}
_reasons: dict[str, str] = {}

FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno"]


def enabled() -> bool:
    return os.environ.get("LMFORGE_NATIVE", "1") not in ("0", "false", "no", "off")


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


@functools.lru_cache(maxsize=None)
def _version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def _compile(cc: str, source: Path, target: Path, openmp: bool) -> tuple[bool, str]:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            cmd = [cc, *FLAGS, *(["-fopenmp"] if openmp else []), str(source), "-o", str(out), "-lm"]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                return False, f"{cc} failed to run: {e}"
            if done.returncode != 0:
                lines = done.stderr.strip().splitlines()
                errors = [line for line in lines if "error" in line]
                return False, (errors or lines or ["(no message)"])[0]
            os.replace(out, target)  # atomic: another process sees the whole library or none
    except OSError as e:  # the cache directory cannot be written: no library, not a crash
        return False, f"cannot write {target.parent}: {e}"
    return True, ""


Signatures = dict[str, tuple[object, list]]


def load(name: str, source: Path, includes: tuple[Path, ...] = (),
         signatures: Signatures | None = None) -> ctypes.CDLL | None:
    """The library built from `source` (a C file, which may #include the files listed in
    `includes`: their text is part of the build's key), or None (see `why_not(name)`).

    `signatures`: {function: (restype, argtypes)} set on the library's functions when it is
    first loaded; a library missing one of them counts as not built. Later calls return the
    same library (or None) without touching the disk.
    """
    if name in _loaded:
        return _loaded[name]
    lib = None
    if not enabled():
        _reasons[name] = "disabled by LMFORGE_NATIVE=0"
    elif not source.is_file():
        _reasons[name] = f"source {source} is missing"
    elif (cc := _compiler()) is None:
        _reasons[name] = "no C compiler (set CC or install one, e.g. gcc)"
    else:
        text = source.read_bytes() + b"".join(p.read_bytes() for p in includes if p.is_file())
        for openmp in (True, False):
            key = hashlib.sha256(b"\0".join([text, _version(cc).encode(), " ".join(FLAGS).encode(),
                                             str(openmp).encode(), _cpu_flags().encode()])).hexdigest()[:16]
            target = cache_dir() / "native" / f"{name}-{key}.so"
            ok, why = (True, "") if target.is_file() else _compile(cc, source, target, openmp)
            if not ok:
                _reasons[name] = f"compile failed: {why}"
                continue
            try:
                lib = ctypes.CDLL(str(target))
                for function, (restype, argtypes) in (signatures or {}).items():
                    fn = getattr(lib, function)
                    fn.restype, fn.argtypes = restype, argtypes
            except (OSError, AttributeError) as e:
                _reasons[name] = f"built library does not load: {e}"
                lib = None
            else:
                lib._lmforge_openmp = openmp  # type: ignore[attr-defined]
                _reasons.pop(name, None)
            break
    _loaded[name] = lib
    return lib


def why_not(name: str) -> str | None:
    """Why `load(name, ...)` returned None, or None if it did not (or was not called)."""
    return _reasons.get(name)


def ptr(tensor) -> int | None:
    """A tensor's data address for a C pointer argument, or NULL (None) for no tensor."""
    return None if tensor is None else tensor.data_ptr()


def has_openmp(lib: ctypes.CDLL) -> bool:
    return bool(getattr(lib, "_lmforge_openmp", False))
