"""Dataset record formats for fine-tuning and alignment, with validation (D7).

Four shapes cover supervised fine-tuning, preference tuning and classification:

* ``alpaca``: ``{"instruction": ..., "input": optional context, "output": ...}``;
* ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``
  (OpenAI style) or ShareGPT's ``{"conversations": [{"from": "human"|"gpt"|"system",
  "value": ...}]}``; both become ``messages``;
* ``preference``: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` where the prompt is
  text or a list of messages and each answer is text or an assistant message list;
* ``classification``: ``{"text": ..., "label": ...}``.

:func:`normalize_record` checks one record and returns its canonical form (SFT records
become ``{"messages": [...]}``); :func:`load_records` reads a JSON/JSONL file, detects the
format from the first record unless told, and reports every bad record with its line
number in one error. Chat rules: roles must be known, an optional system message comes
first, user and assistant turns alternate starting with the user, and an SFT
conversation ends with an assistant turn (there must be something to learn).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.io import text_files

FORMATS = ("alpaca", "chat", "sharegpt", "preference", "classification")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
MAX_ERRORS_SHOWN = 10


class RecordError(ValueError):
    """One record does not fit its format (message says why)."""


def detect_format(record: Any) -> str:
    if not isinstance(record, dict):
        raise RecordError("a record must be a JSON object")
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if {"chosen", "rejected"} <= record.keys():
        return "preference"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record and "label" in record:
        return "classification"
    raise RecordError(f"cannot tell the format from the fields {sorted(record)}; expected one of {', '.join(FORMATS)}")


def _text(record: dict[str, Any], key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RecordError(f"field {key!r} is empty")
    return value


def validate_messages(messages: Any, require_final_assistant: bool = True) -> list[dict[str, str]]:
    """Check a conversation and return it as a clean list of {role, content} dicts."""
    if not isinstance(messages, list) or not messages:
        raise RecordError("messages must be a non-empty list")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RecordError(f"message {i} must be an object")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise RecordError(f"message {i} has unknown role {role!r} (system, user or assistant)")
        if not isinstance(content, str) or not content.strip():
            raise RecordError(f"message {i} ({role}) has empty or non-string content")
        out.append({"role": role, "content": content})
    turns = out[1:] if out[0]["role"] == "system" else out
    if any(m["role"] == "system" for m in turns):
        raise RecordError("a system message may only come first")
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RecordError(f"turn {i} is {m['role']!r} but {expected!r} was expected (turns alternate, user first)")
    if not turns:
        raise RecordError("the conversation has no user turn")
    if require_final_assistant and turns[-1]["role"] != "assistant":
        raise RecordError("the conversation must end with an assistant turn")
    return out


def alpaca_to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    instruction = _text(record, "instruction")
    context = _text(record, "input", required=False)
    output = _text(record, "output")
    user = f"{instruction}\n\n{context}" if context.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def sharegpt_to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise RecordError("conversations must be a list")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in _SHAREGPT_ROLES:
            raise RecordError(f"conversation turn {i} needs 'from' in {sorted(_SHAREGPT_ROLES)}")
        messages.append({"role": _SHAREGPT_ROLES[t["from"]], "content": t.get("value")})
    return messages


def _answer(value: Any, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(f"field {key!r} is empty")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list):
        msgs = [m for m in value if isinstance(m, dict)]
        if not msgs or any(m.get("role") != "assistant" or not isinstance(m.get("content"), str) for m in msgs):
            raise RecordError(f"field {key!r} must be text or a list of assistant messages")
        return [{"role": "assistant", "content": m["content"]} for m in msgs]
    raise RecordError(f"field {key!r} must be text or a list of messages")


def normalize_record(record: Any, fmt: str | None = None) -> dict[str, Any]:
    """The canonical form of one record (raises RecordError when it is malformed)."""
    fmt = fmt or detect_format(record)
    if fmt not in FORMATS:
        raise RecordError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not isinstance(record, dict):
        raise RecordError("a record must be a JSON object")
    if fmt == "alpaca":
        return {"messages": validate_messages(alpaca_to_messages(record))}
    if fmt == "chat":
        return {"messages": validate_messages(record.get("messages"))}
    if fmt == "sharegpt":
        return {"messages": validate_messages(sharegpt_to_messages(record))}
    if fmt == "preference":
        prompt = record.get("prompt")
        if isinstance(prompt, str):
            if not prompt.strip():
                raise RecordError("field 'prompt' is empty")
            prompt_msgs = [{"role": "user", "content": prompt}]
        else:
            prompt_msgs = validate_messages(prompt, require_final_assistant=False)
            if prompt_msgs[-1]["role"] != "user":
                raise RecordError("a preference prompt must end with a user turn")
        chosen, rejected = _answer(record.get("chosen"), "chosen"), _answer(record.get("rejected"), "rejected")
        if chosen == rejected:
            raise RecordError("chosen and rejected are identical: the pair teaches nothing")
        return {"prompt": prompt_msgs, "chosen": chosen, "rejected": rejected}
    text = _text(record, "text")
    label = record.get("label")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or (isinstance(label, str) and not label.strip()):
        raise RecordError("field 'label' must be a non-empty string or an integer")
    return {"text": text, "label": label}


def _read_raw(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed value) for every record of a JSONL file or a JSON array."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmforgeError(f"dataset file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"cannot read {path}: {exc}") from None
    if path.suffix.lower() == ".json":
        data = text_files.parse_json(raw, path)
        if not isinstance(data, list):
            raise LmforgeError(f"{path}: expected a JSON array of records")
        return [(i + 1, r) for i, r in enumerate(data)]
    out = []
    for n, line in enumerate(raw.split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            out.append((n, RecordError(f"not valid JSON ({exc.msg})")))
    return out


def load_records(path: str | Path, fmt: str | None = None, strict: bool = True) -> tuple[str, list[dict[str, Any]], list[str]]:
    """(format, canonical records, error messages) of a JSON/JSONL dataset file.

    With ``strict`` (the default) any bad record raises one LmforgeError that lists the
    first few problems with their line numbers; otherwise bad records are skipped and
    their errors returned.
    """
    path = Path(path)
    raw = _read_raw(path)
    if not raw:
        raise LmforgeError(f"{path} has no records")
    if fmt is None:
        first = next((r for _, r in raw if not isinstance(r, RecordError)), None)
        try:
            fmt = detect_format(first)
        except RecordError as exc:
            raise LmforgeError(f"{path}: {exc}") from None
    records, errors = [], []
    for n, value in raw:
        try:
            if isinstance(value, RecordError):
                raise value
            records.append(normalize_record(value, fmt))
        except RecordError as exc:
            errors.append(f"{path.name}:{n}: {exc}")
    if errors and strict:
        shown = "; ".join(errors[:MAX_ERRORS_SHOWN])
        more = f" (and {len(errors) - MAX_ERRORS_SHOWN} more)" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise LmforgeError(f"{len(errors)} of {len(raw)} records are not valid {fmt}: {shown}{more}")
    return fmt, records, errors


def summarize(fmt: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts worth a glance: records, turns, label balance."""
    summary: dict[str, Any] = {"format": fmt, "records": len(records)}
    if fmt == "classification":
        labels = Counter(str(r["label"]) for r in records)
        summary["labels"] = dict(labels.most_common())
        if labels:
            summary["imbalance_ratio"] = round(max(labels.values()) / min(labels.values()), 2)
    elif fmt == "preference":
        summary["mean_prompt_turns"] = round(sum(len(r["prompt"]) for r in records) / max(1, len(records)), 2)
    else:
        summary["mean_turns"] = round(sum(len(r["messages"]) for r in records) / max(1, len(records)), 2)
    return summary
