"""Benchmark tasks as data: records (one dict per item) plus a `TaskSpec` saying how to score them.

A spec is a handful of Jinja templates and settings; it maps 1:1 onto a YAML file:

    name: arithmetic
    kind: generation                 # multiple_choice | generation | code
    data: arithmetic.jsonl           # one JSON object per line, relative to this file
    prompt: "Question: {{ question }}\\nAnswer:"
    target: "{{ answer }}"
    extract: number                  # how to read the answer out of generated text
    stop: ["\\n"]

Templates see every field of the record, plus `letters` ("A", "B", ...). For multiple
choice, `choice_text` also sees `choice`, `index` and `letter`; for code, `program` also
sees `completion`. A spec can carry named `variants` (for example `cot`), each a dict of
fields that replace the base ones.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from ...errors import LmforgeError
from ...io import text_files

KINDS = ("multiple_choice", "generation", "code")
EXTRACTORS = ("exact", "number", "letter", "first_line", "code_block")  # and "regex:<pattern>"
LETTERS = list(string.ascii_uppercase)


@dataclass
class TaskSpec:
    """How to turn records into prompts and score what the model does with them."""

    name: str
    kind: str = "multiple_choice"
    # Rendered once, from the scored record, before the exemplars (e.g. a subject header).
    description: str = ""
    # The text the model continues, for the scored record and for every exemplar.
    prompt: str = "{{ question }}"
    # generation/code: send the prompt as a user message through the model's chat template
    # (for instruction-tuned models) instead of as raw text to continue.
    chat: bool = False
    # multiple_choice: the record field that holds the list of choice texts, and the
    # continuation scored for each choice.
    choices: str = "choices"
    choice_text: str = " {{ choice }}"
    # The gold answer. multiple_choice: an index, a letter or the text of the right choice;
    # generation: the reference answer; code: unused (the tests decide).
    target: str = "{{ answer }}"
    # How an exemplar renders; default: its prompt followed by its gold continuation.
    exemplar: str | None = None
    fewshot: int = 0
    fewshot_separator: str = "\n\n"
    # A record field: scores are also reported per group, and exemplars come from the same group.
    group_by: str | None = None
    # generation: how to read the answer out of the text (see `extract.py`); code: only
    # `code_block` applies (the completion becomes the fenced block of the reply).
    extract: str = "exact"
    stop: list[str] = field(default_factory=list)
    max_tokens: int = 256
    # code: the program run in the sandbox; it must fail (non-zero exit) when the completion is wrong.
    program: str = "{{ prompt }}{{ completion }}\n\n{{ test }}\n"
    timeout: float = 10.0
    # contamination: record fields holding the task's text (default: every string field).
    text_fields: list[str] | None = None
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LmforgeError(f"task {self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.extract not in EXTRACTORS and not self.extract.startswith("regex:"):
            raise LmforgeError(f"task {self.name}: extract must be one of {', '.join(EXTRACTORS)} or regex:<pattern>, "
                               f"got {self.extract!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.fewshot < 0 or self.max_tokens < 1 or self.timeout <= 0:
            raise LmforgeError(f"task {self.name}: fewshot must be >= 0, max_tokens >= 1 and timeout > 0")
        for template in (self.description, self.prompt, self.choice_text, self.target, self.exemplar or "", self.program):
            compile_template(template)

    def variant(self, name: str) -> "TaskSpec":
        """This spec with the fields of variant `name` replaced."""
        if name not in self.variants:
            known = ", ".join(self.variants) or "none"
            raise LmforgeError(f"task {self.name} has no {name!r} variant (variants: {known})")
        return spec_from_dict({**_spec_fields(self), "variants": {}, **self.variants[name]}, where=f"{self.name}:{name}")


@dataclass
class Task:
    """A spec and its records. `fewshot_pool` (default: the records) supplies exemplars."""

    spec: TaskSpec
    records: list[dict[str, Any]]
    fewshot_pool: list[dict[str, Any]] | None = None
    source: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def with_spec(self, spec: TaskSpec) -> "Task":
        return dataclasses.replace(self, spec=spec)

    def limited(self, limit: int | None) -> "Task":
        """The first `limit` records (exemplars still come from the full pool)."""
        if limit is None or limit >= len(self.records):
            return self
        if limit < 1:
            raise LmforgeError("--limit must be at least 1")
        return dataclasses.replace(self, records=self.records[:limit], fewshot_pool=self.pool)

    @property
    def pool(self) -> list[dict[str, Any]]:
        return self.fewshot_pool if self.fewshot_pool is not None else self.records


# -- templates ---------------------------------------------------------------------------

@lru_cache(maxsize=256)
def compile_template(template: str):
    """Task files are data from anywhere: render them in Jinja's immutable sandbox."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(keep_trailing_newline=True, undefined=jinja2.StrictUndefined,
                                        autoescape=False)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise LmforgeError(f"bad task template {template[:60]!r}: {exc.message} (line {exc.lineno})") from None


def render(template: str, record: dict[str, Any], **extra: Any) -> str:
    import jinja2

    try:
        return compile_template(template).render({"letters": LETTERS, **record, **extra})
    except jinja2.TemplateError as exc:
        ident = record.get("id", "?")
        raise LmforgeError(f"cannot render task template {template[:60]!r} for record {ident}: {exc}") from None


# -- prompts -------------------------------------------------------------------------------

def record_id(record: dict[str, Any], index: int) -> str:
    value = record.get("id", record.get("task_id", index))
    return str(value)


def choice_list(spec: TaskSpec, record: dict[str, Any]) -> list[str]:
    choices = record.get(spec.choices)
    if not isinstance(choices, list) or len(choices) < 2:
        raise LmforgeError(f"task {spec.name}: record {record.get('id', '?')} needs a list of at least two "
                           f"choices in field {spec.choices!r}")
    return [str(c) for c in choices]


def choice_continuations(spec: TaskSpec, record: dict[str, Any]) -> list[str]:
    return [render(spec.choice_text, record, choice=c, index=i, letter=LETTERS[i])
            for i, c in enumerate(choice_list(spec, record))]


def gold_index(spec: TaskSpec, record: dict[str, Any]) -> int:
    """The right choice of a multiple-choice record: from an index, a letter or the choice text."""
    choices = choice_list(spec, record)
    gold = render(spec.target, record).strip()
    if gold.isdigit() and int(gold) < len(choices):
        return int(gold)
    if len(gold) == 1 and gold.upper() in LETTERS[: len(choices)]:
        return LETTERS.index(gold.upper())
    if gold in choices:
        return choices.index(gold)
    raise LmforgeError(f"task {spec.name}: record {record.get('id', '?')}: target {gold!r} is neither an index, "
                       f"a letter nor one of the choices")


def gold_answer(spec: TaskSpec, record: dict[str, Any]) -> str:
    return render(spec.target, record).strip()


def render_exemplar(spec: TaskSpec, record: dict[str, Any]) -> str:
    if spec.exemplar is not None:
        return render(spec.exemplar, record)
    prompt = render(spec.prompt, record)
    if spec.kind == "multiple_choice":
        return prompt + choice_continuations(spec, record)[gold_index(spec, record)]
    if spec.kind == "code":
        return prompt + str(record.get("canonical_solution", ""))
    return prompt + " " + gold_answer(spec, record)


def pick_exemplars(task: Task, record: dict[str, Any], shots: int) -> list[dict[str, Any]]:
    """The first `shots` pool records (same group first when the spec groups), never the record itself.

    A fixed choice, not a random one, so that every run of a task sees the same prompts.
    """
    if shots <= 0:
        return []
    spec = task.spec
    key = record.get("id", record.get("task_id"))
    others = [r for r in task.pool
              if r is not record and (key is None or r.get("id", r.get("task_id")) != key)]
    if spec.group_by:
        group = record.get(spec.group_by)
        others = [r for r in others if r.get(spec.group_by) == group] + \
                 [r for r in others if r.get(spec.group_by) != group]
    return others[:shots]


def build_prompt(task: Task, record: dict[str, Any], shots: int | None = None) -> str:
    """description + exemplars + the record's prompt, joined by the spec's separator."""
    spec = task.spec
    shots = spec.fewshot if shots is None else shots
    parts = [render_exemplar(spec, ex) for ex in pick_exemplars(task, record, shots)]
    parts.append(render(spec.prompt, record))
    return render(spec.description, record) + spec.fewshot_separator.join(parts)


def record_text(spec: TaskSpec, record: dict[str, Any]) -> str:
    """The task's own text in a record (what a contamination check looks for)."""
    fields = spec.text_fields or [k for k, v in record.items() if isinstance(v, (str, list)) and k != "id"]
    parts: list[str] = []
    for name in fields:
        value = record.get(name)
        if isinstance(value, list):
            parts.extend(str(v) for v in value)
        elif value is not None:
            parts.append(str(value))
    return "\n".join(parts)


# -- files -------------------------------------------------------------------------------------

def _spec_fields(spec: TaskSpec) -> dict[str, Any]:
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


def spec_from_dict(data: dict[str, Any], where: str = "task") -> TaskSpec:
    known = {f.name for f in dataclasses.fields(TaskSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LmforgeError(f"{where}: unknown task field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if "name" not in data:
        raise LmforgeError(f"{where}: a task needs a name")
    try:
        return TaskSpec(**data)
    except TypeError as exc:
        raise LmforgeError(f"{where}: {exc}") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, record in text_files.read_jsonl(path, "data"):
        if not isinstance(record, dict):
            raise LmforgeError(f"{path}:{number}: expected a JSON object")
        records.append(record)
    return records


def load_task_file(path: str | Path) -> Task:
    """A task from a YAML (or JSON) spec whose `data` (and optional `fewshot_data`) name JSONL files."""
    path = Path(path)
    text = text_files.read_text(path, "task")
    if path.suffix == ".json":
        data = text_files.parse_json(text, path)
    else:
        try:
            import yaml
        except ImportError:
            raise LmforgeError("YAML task files need PyYAML: pip install 'lmforge[eval]'") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise LmforgeError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: a task file is a mapping of spec fields")
    data = dict(data)
    data.setdefault("name", path.stem)
    data_file = data.pop("data", None)
    fewshot_file = data.pop("fewshot_data", None)
    if not data_file:
        raise LmforgeError(f"{path}: the task needs `data: FILE.jsonl`")
    spec = spec_from_dict(data, where=str(path))
    records = read_jsonl(path.parent / data_file)
    if not records:
        raise LmforgeError(f"{path.parent / data_file}: no records")
    pool = read_jsonl(path.parent / fewshot_file) if fewshot_file else None
    return Task(spec, records, pool, source=str(path))


def make_task(spec: TaskSpec | dict[str, Any], records: Sequence[dict[str, Any]],
              fewshot_pool: Sequence[dict[str, Any]] | None = None) -> Task:
    """A task from Python objects (what the YAML loader builds)."""
    if isinstance(spec, dict):
        spec = spec_from_dict(spec)
    return Task(spec, list(records), list(fewshot_pool) if fewshot_pool is not None else None, source="python")
