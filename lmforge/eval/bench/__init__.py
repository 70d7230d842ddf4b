"""Benchmarks (E3, E10): tasks as data, log-likelihood multiple choice, generation with answer
extraction and self-consistency, code execution with pass@k.

    >>> import lmforge
    >>> from lmforge.eval.bench import BenchOptions, evaluate, load_task
    >>> result = evaluate(lmforge.load(), load_task("mmlu-cot-281"), BenchOptions(limit=20))
    >>> result.metrics["acc"], result.groups["anatomy"]
"""

from .code import mean_pass_at_k, pass_at_k
from .extract import answers_match, extract_answer, majority_vote
from .loglik import LoglikelihoodScorer, LoglikResult, split_continuation
from .runner import BenchOptions, BenchResult, evaluate, generate_texts
from .sources import BUILTIN_TASKS, load_task
from .task import Task, TaskSpec, build_prompt, load_task_file, make_task

__all__ = [
    "BUILTIN_TASKS", "BenchOptions", "BenchResult", "LoglikResult", "LoglikelihoodScorer", "Task", "TaskSpec",
    "answers_match", "build_prompt", "evaluate", "extract_answer", "generate_texts", "load_task", "load_task_file",
    "majority_vote", "make_task", "mean_pass_at_k", "pass_at_k", "split_continuation",
]
