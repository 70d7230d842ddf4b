"""A Python tool: model-written code runs in the OS-isolated sandbox of lmforge/eval/sandbox.py.

The code runs as its own process under bubblewrap (no network, no view of the user's
files, limits on time, memory and output), never in this process. Where the machine
cannot isolate, building the tool fails with the sandbox's own message, unless the
caller allowed unisolated runs on purpose (`allow_unsafe`).
"""

from __future__ import annotations

from ..eval.sandbox import SandboxLimits, require_isolation, run_python
from .tools import Tool

_MAX_REPORTED = 4000  # characters of output the model is given back


def python_tool(allow_unsafe: bool = False, limits: SandboxLimits | None = None, isolation=None) -> Tool:
    """The tool; `isolation` (found once here) is reused for every call."""
    isolation = isolation or require_isolation(allow_unsafe=allow_unsafe)
    limits = limits or SandboxLimits(timeout=10.0, memory_mb=512)

    def run(code: str) -> str:
        result = run_python(code, limits, isolation=isolation)
        out = result.stdout[-_MAX_REPORTED:]
        if result.status == "ok":
            return out if out.strip() else "(the program printed nothing: print() what you want to see)"
        return f"{result.status}: {result.stderr[-_MAX_REPORTED:].strip() or out}"

    return Tool(
        name="python",
        description="Run a Python 3 program in a sandbox (no network, no files of the user) and get what it "
                    "prints. Use print() for results.",
        parameters={"type": "object", "properties": {"code": {"type": "string", "description": "the program"}},
                    "required": ["code"]},
        function=run,
    )
