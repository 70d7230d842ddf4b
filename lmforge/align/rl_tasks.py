"""Prompts and rewards for RL runs (F7): verifiable checkers and reward models.

A run draws its prompts from a *task*:

    addition     "What is 3 + 5?" with both operands in 0..max_operand (easy enough that a small
                 model gets some right, so a group's rewards differ and there is a signal)
    <generator>  any generated task of lmforge/tune/datasets.py (arithmetic, word-problems,
                 units, dates, json-extraction, format), with its computed answer

and scores every sampled response with a *reward source*:

    checker      1.0 when the response's answer equals the computed one, else 0.0. For a number
                 answer, the numbers of the response that are not in the question must all
                 equal it ("3 + 5 = 8" and "The sum is 8." are right; "8 or 9" is wrong, so
                 hedging earns nothing; a response cut off before its answer is wrong); when
                 every number echoes the question ("5 + 0 = 5") the last one counts. Any other
                 answer is the first line
                 compared without case, spaces and a final full stop (format answers keep case)
    model        a reward model directory (lmforge/align/reward.py, a sequence classifier with one
                 label) scoring the prompt + response rendered through the chat template

With a reward model the checker still runs, and its rate is logged as ``correct``: the
gap between a rising model score and a flat checked rate is reward hacking made visible.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def addition(rng: random.Random, max_operand: int = 9) -> tuple[str, str]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    return f"What is {a} + {b}?", str(a + b)


def task_names() -> tuple[str, ...]:
    from lmforge.tune.datasets import GENERATORS

    return ("addition", *GENERATORS)


@dataclass
class Prompt:
    text: str
    answer: str
    task: str


def draw_prompts(task: str, count: int, seed: int, max_operand: int = 9) -> list[Prompt]:
    """``count`` prompts of ``task`` drawn by a generator seeded with ``seed`` (repeats allowed)."""
    from lmforge.tune.datasets import GENERATORS

    if task not in task_names():
        raise LmforgeError(f"unknown RL task {task!r}; choose one of {', '.join(task_names())}")
    rng = random.Random(f"{seed}:{task}")
    out = []
    for _ in range(count):
        text, answer = addition(rng, max_operand) if task == "addition" else GENERATORS[task](rng)
        out.append(Prompt(text, answer, task))
    return out


def _normalise(text: str, keep_case: bool) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = re.sub(r"\s+", "", line).rstrip(".")
    return line if keep_case else line.lower()


def is_correct(response: str, answer: str, task: str = "", question: str = "") -> bool:
    """The checker: the response's answer equals the computed ``answer`` (see the module docstring)."""
    if _NUMBER.fullmatch(answer):
        found = [float(n) for n in _NUMBER.findall(response.replace(",", ""))]
        given = {float(n) for n in _NUMBER.findall(question.replace(",", ""))}
        new = [n for n in found if n not in given]
        if new:
            return all(n == float(answer) for n in new)
        return bool(found) and found[-1] == float(answer)
    return _normalise(response, keep_case=task == "format") == _normalise(answer, keep_case=task == "format")


def prompt_ids(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """The prompt as the model sees it at inference: one user turn and the assistant header."""
    from lmforge.align.batching import render

    head, _ = render(tokenizer, prompt, "", system)
    return tokenizer.encode(head, add_special_tokens=False)


class RewardScorer:
    """Scores (prompt, response) pairs: the checker, or a reward model (checker kept as ``correct``)."""

    def __init__(self, source: str, tokenizer, reward_model: str | None = None, system: str | None = None,
                 max_length: int = 128, device: str | torch.device = "cpu") -> None:
        if source not in ("checker", "model"):
            raise LmforgeError(f"unknown reward source {source!r}; choose checker or model")
        self.source, self.tokenizer, self.system, self.max_length = source, tokenizer, system, max_length
        self.model = None
        if source == "model":
            if not reward_model:
                raise LmforgeError("reward 'model' needs --reward-model DIR (a reward model from `lmforge align reward`)")
            from pathlib import Path

            from lmforge.align.reward import load_reward_model

            if not Path(reward_model).is_dir():
                raise LmforgeError(f"no such reward model directory: {reward_model}")
            self.model = load_reward_model(reward_model, device=device)

    def __call__(self, prompts: list[Prompt], responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards [N], correct [N] in {0, 1}) of N responses to their prompts."""
        correct = torch.tensor([float(is_correct(r, p.answer, p.task, p.text)) for p, r in zip(prompts, responses)])
        if self.model is None:
            return correct.clone(), correct
        from lmforge.align.reward import encode_for_reward, score_rows

        rows = [encode_for_reward(self.tokenizer, p.text, r, self.max_length, self.system)
                for p, r in zip(prompts, responses)]
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else (self.tokenizer.eos_id or 0)
        return score_rows(self.model, rows, pad).float().cpu(), correct

