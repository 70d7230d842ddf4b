"""Benchmarks (E3, E10): tasks as data, log-likelihood multiple choice, generation with answer
extraction and self-consistency, code execution with pass@k.

    >>> import lmforge
    >>> from lmforge.eval.bench import BenchOptions, evaluate, load_task
    >>> result = evaluate(lmforge.load(), load_task("mmlu-cot-281"), BenchOptions(limit=20))
    >>> result.metrics["acc"], result.groups["anatomy"]
"""

import importlib

# Names load with their module on first use: the command line builds `eval bench`'s flags
# from `options.BenchOptions` without loading the runner, templates or sandbox.
_HOME = {
    "mean_pass_at_k": "code", "pass_at_k": "code",
    "answers_match": "extract", "extract_answer": "extract", "majority_vote": "extract",
    "LoglikelihoodScorer": "loglik", "LoglikResult": "loglik", "split_continuation": "loglik",
    "BenchOptions": "options",
    "BenchResult": "runner", "evaluate": "runner", "generate_texts": "runner",
    "BUILTIN_TASKS": "sources", "load_task": "sources",
    "Task": "task", "TaskSpec": "task", "build_prompt": "task", "load_task_file": "task", "make_task": "task",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
