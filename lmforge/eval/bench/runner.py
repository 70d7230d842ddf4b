"""Run a task against a model and score it (E3, E10).

Three ways to score, chosen by the task's kind:

- multiple_choice: log-likelihood of each choice's continuation after the prompt
  (`LoglikelihoodScorer`); `acc` takes the choice with the highest summed log-prob,
  `acc_norm` divides each sum by the continuation's length in UTF-8 bytes first (long
  choices are not penalized for having more tokens). Needs the model's log-probabilities:
  a local model, or a `RemoteScorer` (an endpoint plus the served model's tokenizer).
- generation: the model writes an answer (greedy by default, with the task's stop
  strings); the answer is extracted and compared with the gold one. With `samples > 1`
  it samples that many answers and takes the majority vote (self-consistency).
- code: the model completes a function; the task's program (prompt + completion +
  tests) runs in the sandbox; pass@k from n samples per problem.

The model is anything `lmforge.load()` returns (a `LoadedModel`); generation and code
tasks also accept any object with `complete(prompts, **sampling)` (the remote backend);
multiple-choice tasks any object with `tokenizer` and `score(requests)` (`RemoteScorer`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from ...errors import LmforgeError
from .extract import answers_match, extract_answer, extract_code_block, majority_vote
from .options import BenchOptions
from .task import (Task, build_prompt, choice_continuations, gold_answer, gold_index, pick_exemplars,
                   record_id, render)

Progress = Callable[[int, int], None]


@dataclass
class BenchResult:
    task: str
    kind: str
    model: str
    n: int
    shots: int
    cot: bool
    variant: str | None
    samples: int
    temperature: float
    metrics: dict[str, float]
    groups: dict[str, dict[str, float]]
    items: list[dict[str, Any]]
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, items: bool = True) -> dict[str, Any]:
        data = asdict(self)
        if not items:
            data.pop("items")
        return data

    def _label(self) -> str:
        extra = ", chain of thought" if self.cot else (f", {self.variant} variant" if self.variant else "")
        return f"{self.kind}, {self.shots}-shot{extra}"

    def summary(self) -> str:
        main = ", ".join(f"{k} {v:.4f}" for k, v in self.metrics.items() if isinstance(v, float))
        return (f"{self.task} ({self._label()}"
                f"{f', {self.samples} samples' if self.samples > 1 else ''}) on {self.model}: {main} "
                f"over {self.n} items in {self.seconds:.1f}s")

    def markdown(self) -> str:
        from ..report import markdown_table

        lines = [f"# {self.task} on {self.model}", "",
                 f"{self._label()}, {self.samples} sample(s) at temperature {self.temperature}, {self.n} items, "
                 f"{self.seconds:.1f} s.", ""]
        lines.append(markdown_table(["metric", "value"], [[k, v] for k, v in self.metrics.items()]))
        if self.groups:
            names = [k for k in next(iter(self.groups.values())) if k != "n"]
            rows = [[g, v["n"], *[v.get(k) for k in names]] for g, v in sorted(self.groups.items())]
            lines += ["## Per group", "", markdown_table(["group", "n", *names], rows)]
        return "\n".join(lines)


def evaluate(lm, task: Task, options: BenchOptions | None = None, progress: Progress | None = None) -> BenchResult:
    """Score `lm` on `task`; `progress(done, total)` is called as items finish."""
    options = options or BenchOptions()
    if options.variant:
        task = task.with_spec(task.spec.variant(options.variant))
    task = task.limited(options.limit)
    shots = task.spec.fewshot if options.shots is None else options.shots
    started = time.perf_counter()
    kind = task.spec.kind
    if kind == "multiple_choice":
        if options.samples != 1:
            raise LmforgeError("multiple-choice tasks are scored by log-likelihood: --samples applies to "
                               "generation and code tasks (try --cot)")
        items, temperature = _multiple_choice(lm, task, shots, options, progress), 0.0
    elif kind == "generation":
        items, temperature = _generation(lm, task, shots, options, progress)
    else:
        items, temperature = _code(lm, task, shots, options, progress)
    metrics, groups = _aggregate(task, items, options)
    used = [it["shots"] for it in items]
    return BenchResult(
        task=task.name, kind=kind, model=str(getattr(lm, "name", "model")), n=len(items),
        shots=min(used) if used else shots, cot=options.cot, variant=options.variant, samples=options.samples,
        temperature=temperature,
        metrics=metrics, groups=groups, items=items, seconds=round(time.perf_counter() - started, 3),
        settings={k: v for k, v in asdict(options).items() if k not in ("workers",)} | {"requested_shots": shots},
    )


# -- multiple choice -------------------------------------------------------------------------

def _multiple_choice(lm, task: Task, shots: int, options: BenchOptions, progress: Progress | None) -> list[dict]:
    from .loglik import LoglikelihoodScorer, split_continuation

    model = getattr(lm, "model", None)
    if model is not None:
        scorer = LoglikelihoodScorer(model, batch_tokens=options.batch_tokens,
                                     pad_id=getattr(lm.tokenizer, "eos_id", None) or 0)
    elif callable(getattr(lm, "score", None)) and getattr(lm, "tokenizer", None) is not None:
        scorer = lm  # log-probs from elsewhere (an endpoint), token ids from the same tokenizer
    else:
        raise LmforgeError("multiple-choice scoring needs the model's log-probabilities: use a local model, "
                           "an endpoint that returns prompt log-probs, or the task's --cot variant")
    spec = task.spec
    requests, layout, items = [], [], []
    for index, record in enumerate(task.records):
        prompt = build_prompt(task, record, shots)
        conts = choice_continuations(spec, record)
        layout.append((len(requests), conts))
        requests += [split_continuation(lm.tokenizer, prompt, c) for c in conts]
        items.append({"id": record_id(record, index), "group": record.get(spec.group_by) if spec.group_by else None,
                      "gold": gold_index(spec, record), "shots": len(pick_exemplars(task, record, shots)),
                      "prompt_tokens": len(requests[-1][0])})
    per_choice = max(1, len(requests) // max(1, len(items)))
    report = (lambda done, total: progress(done // per_choice, len(items))) if progress else None
    scores = scorer.score(requests, progress=report)
    for item, (start, conts) in zip(items, layout):
        lps = [scores[start + j].logprob for j in range(len(conts))]
        norm = [lp / max(1, len(c.encode("utf-8"))) for lp, c in zip(lps, conts)]
        item["pred"] = _argmax(lps)
        item["pred_norm"] = _argmax(norm)
        item["correct"] = item["pred"] == item["gold"]
        item["correct_norm"] = item["pred_norm"] == item["gold"]
        item["logprobs"] = [round(lp, 6) for lp in lps]
    return items


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


# -- generation ------------------------------------------------------------------------------

def _sampling(task: Task, options: BenchOptions, default_temperature: float) -> tuple[float, dict[str, Any]]:
    temperature = options.temperature
    if temperature is None:
        temperature = 0.0 if options.samples == 1 else default_temperature
    if options.samples > 1 and temperature == 0:
        raise LmforgeError("several samples at temperature 0 would all be the same; set --temperature > 0")
    base = dict(max_tokens=options.max_tokens or task.spec.max_tokens, temperature=temperature,
                top_p=options.top_p if temperature > 0 else 1.0, stop=list(task.spec.stop))
    return temperature, base


def generate_texts(lm, prompts: Sequence[str], sampling: Sequence[dict[str, Any]], batch_size: int,
                   progress: Progress | None = None, chat: bool = False) -> list[str]:
    """Completions of `prompts`, `batch_size` at a time, through the engine (or a remote backend).

    With `chat`, each prompt is one user message rendered by the model's chat template
    (a remote backend gets it through its chat endpoint) and the reply is the text.
    """
    generator = getattr(lm, "generator", None)
    texts: list[str] = []
    for at in range(0, len(prompts), batch_size):
        chunk, params = prompts[at : at + batch_size], sampling[at : at + batch_size]
        if generator is not None:
            from ...infer import SamplingParams

            inputs = [lm.chat_prompt(p) for p in chunk] if chat else list(chunk)
            done = generator.generate(inputs, [SamplingParams(**p) for p in params])
            texts += [c.text for c in done]
        elif chat:
            texts += [lm.chat(p, **s) for p, s in zip(chunk, params)]
        else:
            texts += [lm.complete(p, **s)[0].text for p, s in zip(chunk, params)]
        if progress is not None:
            progress(len(texts), len(prompts))
    return texts


def _sample_texts(lm, task: Task, shots: int, options: BenchOptions, progress: Progress | None,
                  default_temperature: float) -> tuple[float, list[str], list[int]]:
    """(temperature, texts, owners): `options.samples` texts per record, each sample with its own seed.

    `owners[i]` is the index of the record `texts[i]` answers; progress counts records.
    """
    temperature, base = _sampling(task, options, default_temperature)
    prompts, params, owners = [], [], []
    for index, record in enumerate(task.records):
        prompt = build_prompt(task, record, shots)
        for j in range(options.samples):
            prompts.append(prompt)
            seed = None if base["temperature"] == 0 else options.seed + 7919 * index + j
            params.append(dict(base, seed=seed))
            owners.append(index)
    per_record = None if progress is None else (
        lambda done, total: progress(done // options.samples, len(task.records)))
    texts = generate_texts(lm, prompts, params, options.batch_size, per_record, chat=task.spec.chat)
    return temperature, texts, owners


def _generation(lm, task: Task, shots: int, options: BenchOptions, progress: Progress | None):
    spec = task.spec
    temperature, texts, owners = _sample_texts(lm, task, shots, options, progress, 0.7)
    items = []
    for index, record in enumerate(task.records):
        outputs = [t for t, o in zip(texts, owners) if o == index]
        answers = [extract_answer(t, spec.extract) for t in outputs]
        gold = gold_answer(spec, record)
        voted, votes = majority_vote(answers, spec.extract)
        item = {"id": record_id(record, index), "group": record.get(spec.group_by) if spec.group_by else None,
                "gold": gold, "shots": len(pick_exemplars(task, record, shots)), "pred": voted,
                "correct": answers_match(voted, gold, spec.extract), "outputs": outputs, "answers": answers}
        if options.samples > 1:
            item["votes"] = votes
            item["sample_accuracy"] = sum(answers_match(a, gold, spec.extract) for a in answers) / len(answers)
        items.append(item)
    return items, temperature


# -- code ----------------------------------------------------------------------------------------

def _code(lm, task: Task, shots: int, options: BenchOptions, progress: Progress | None):
    from ..sandbox import SandboxLimits, require_isolation
    from .code import run_programs

    isolation = require_isolation(options.unsafe_no_sandbox)  # refuse before the slow generation
    spec = task.spec
    temperature, texts, owners = _sample_texts(lm, task, shots, options, progress, 0.8)
    replies = texts
    if spec.extract == "code_block":
        texts = [extract_code_block(t) for t in texts]
    programs = [render(spec.program, task.records[o], completion=t) for t, o in zip(texts, owners)]
    limits = SandboxLimits(timeout=options.timeout or spec.timeout, memory_mb=options.memory_mb)
    results = run_programs(programs, limits, options.workers, isolation=isolation)
    items = []
    for index, record in enumerate(task.records):
        mine = [(t, r) for t, r, o in zip(texts, results, owners) if o == index]
        passed = sum(r.passed for _, r in mine)
        first_failure = next((r for _, r in mine if not r.passed), None)
        items.append({
            "id": record_id(record, index), "group": record.get(spec.group_by) if spec.group_by else None,
            "shots": len(pick_exemplars(task, record, shots)), "n": len(mine), "passed": passed,
            "correct": passed == len(mine), "statuses": [r.status for _, r in mine],
            "completions": [t for t, _ in mine],
            **({"replies": [t for t, o in zip(replies, owners) if o == index]} if replies is not texts else {}),
            "error": (first_failure.stderr.strip().splitlines() or [first_failure.status])[-1][:300]
            if first_failure else None,
        })
    return items, temperature


# -- aggregation -------------------------------------------------------------------------------

def _metrics(task: Task, items: list[dict], options: BenchOptions) -> dict[str, float]:
    n = len(items)
    if not n:
        return {}
    kind = task.spec.kind
    if kind == "code":
        from .code import mean_pass_at_k

        ks = options.ks or tuple(k for k in (1, 10, 100) if k <= options.samples)
        counts = [(it["n"], it["passed"]) for it in items]
        out = {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks}
        statuses = [s for it in items for s in it["statuses"]]
        for status in ("ok", "error", "timeout", "memory", "output"):
            if status in statuses:
                out[f"programs_{status}"] = statuses.count(status)
        return out
    acc = sum(it["correct"] for it in items) / n
    out = {"acc": acc, "acc_stderr": math.sqrt(acc * (1 - acc) / n)}
    if kind == "multiple_choice":
        out["acc_norm"] = sum(it["correct_norm"] for it in items) / n
    else:
        out["answered"] = sum(it["pred"] is not None for it in items) / n
        if options.samples > 1:
            out["sample_acc"] = sum(it["sample_accuracy"] for it in items) / n
    return out


def _aggregate(task: Task, items: list[dict], options: BenchOptions):
    metrics = _metrics(task, items, options)
    groups: dict[str, dict[str, float]] = {}
    if task.spec.group_by:
        names: dict[str, list[dict]] = {}
        for it in items:
            names.setdefault(str(it["group"]), []).append(it)
        for name, members in names.items():
            sub = _metrics(task, members, options)
            groups[name] = {"n": len(members), **{k: v for k, v in sub.items() if not k.endswith("stderr")}}
    return metrics, groups
