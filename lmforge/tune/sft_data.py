"""Chat data for supervised fine-tuning (F1, D7): read, render, mask, truncate, pack.

A record is ``{"messages": [{"role": ..., "content": ...}, ...]}`` (chat / ShareGPT style
after role names are normalised) or ``{"prompt": ..., "completion": ...}`` (one user turn
and one assistant turn; an optional ``system`` field becomes a system message). Any other
keys ride along (``answer`` is what a task metric compares against).

Rendering uses the model's own chat template, so the fine-tuned model sees at training
time exactly the text it will see when served. The loss is taken on the assistant turns
only: the assistant's content and the end-of-turn token that closes it (so the model learns
to stop), never the system or user text, the template's scaffolding (``<|im_start|>user``,
the assistant header) or padding.

Where the assistant spans are, without knowing the template: for assistant message i the
conversation up to message i-1 is rendered *with* the generation prompt (the text the model
is given before it answers), and up to message i *without* it. Both must be prefixes of the
whole rendering (every mainstream template is prefix-stable; one that is not is refused with
a clear message). The span starts where the first prefix ends and runs to the end of the
first end-of-turn token (the tokenizer's ``eos_token``) after the content, or to the end of
the second prefix if the template writes none. The text is then encoded piece by piece at
those boundaries, which is also how generation sees it (the prompt is encoded alone and the
answer's tokens follow); `encode_chat` reports whether that equals encoding the whole text
at once (it does for the default model's template).

Packing puts several conversations into one row of ``seq_len`` tokens (first fit, longest
first); the training loop then runs every conversation with attention confined to itself
and positions restarting at 0 (`lmforge.train.loop.Batch.lengths`, `Transformer.encode_packed`),
so a packed row's loss is exactly the sum of its conversations' losses. Without packing,
each row is one conversation, right-padded, and rows of similar length are batched together.

Interface (reused by lmforge/align/ for preference data):

    messages_of(record) -> list[dict]               the normalised conversation
    encode_chat(tokenizer, messages, max_len=None) -> EncodedChat (ids, labels; -100 = no loss)
    prompt_ids(tokenizer, messages) -> list[int]    the prompt before the last assistant turn
    read_jsonl(path) -> list[dict]                  records, with one clear error per bad line
    encode_dataset(tokenizer, records, max_len) -> (encoded list, stats)
    pack_rows(lengths, seq_len) -> list[list[int]]  example indices per packed row
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from lmforge.errors import LmforgeError

IGNORE_INDEX = -100
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant",
                "user": "user", "assistant": "assistant", "system": "system", "tool": "tool"}


@dataclass
class EncodedChat:
    """One conversation as token ids and labels (the id where the loss is taken, else -100)."""

    ids: list[int]
    labels: list[int]
    truncated: bool = False
    whole_text_encoding: bool = True  # the pieces' tokens equal encoding the whole text at once
    spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) token ranges of the loss

    @property
    def loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def messages_of(record: Mapping[str, Any], where: str = "record") -> list[dict[str, str]]:
    """The conversation of a ``messages`` or ``prompt``/``completion`` record, roles normalised."""
    if not isinstance(record, Mapping):
        raise LmforgeError(f"{where}: expected a JSON object with 'messages' or 'prompt'/'completion'")
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise LmforgeError(f"{where}: 'messages' must be a non-empty list")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, Mapping) or "content" not in m or ("role" not in m and "from" not in m):
                raise LmforgeError(f"{where}: message {i} needs 'role' and 'content'")
            role = ROLE_ALIASES.get(str(m.get("role", m.get("from"))).lower())
            if role is None:
                raise LmforgeError(f"{where}: message {i} has an unknown role {m.get('role', m.get('from'))!r}")
            if not isinstance(m["content"], str):
                raise LmforgeError(f"{where}: message {i} content must be text")
            messages.append({"role": role, "content": m["content"]})
        return messages
    if "prompt" in record and "completion" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise LmforgeError(f"{where}: 'prompt' and 'completion' must be text")
        system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        return system + [{"role": "user", "content": record["prompt"]},
                         {"role": "assistant", "content": record["completion"]}]
    raise LmforgeError(f"{where}: expected 'messages' or 'prompt'/'completion' (keys: {', '.join(record) or 'none'})")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file (blank lines skipped); errors name the line."""
    from lmforge.io.text_files import read_jsonl as read_numbered

    file = Path(path)
    records = [record for _, record in read_numbered(file, "data")]
    if not records:
        raise LmforgeError(f"{file} holds no records")
    return records


def _template(tokenizer, chat_template: str | None) -> str:
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise LmforgeError("the tokenizer has no chat template: fine-tune a chat/instruct model, or set "
                           "data.chat_template to a Jinja template")
    return template


def _render(tokenizer, messages, template: str, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, chat_template=template)


def assistant_char_spans(tokenizer, messages: Sequence[Mapping[str, str]],
                         chat_template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendering and the [start, end) character spans that carry loss (see the module docstring)."""
    template = _template(tokenizer, chat_template)
    full = _render(tokenizer, messages, template, False)
    eos = tokenizer.eos_token
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise LmforgeError("a conversation cannot start with an assistant turn (nothing prompts it)")
        before = _render(tokenizer, messages[:i], template, True)
        through = _render(tokenizer, messages[:i + 1], template, False)
        if not (full.startswith(before) and through.startswith(before) and full.startswith(through)):
            raise LmforgeError("the chat template does not render conversations prefix by prefix, so the "
                               "assistant turns cannot be located; use another template (data.chat_template)")
        start = len(before)
        content_at = through.find(message["content"], start)
        after_content = content_at + len(message["content"]) if content_at >= 0 else start
        end = len(through)
        if eos:
            closing = through.find(eos, after_content)
            if closing >= 0:
                end = closing + len(eos)
        if end > start:
            spans.append((start, end))
    return full, spans


def encode_chat(tokenizer, messages: Sequence[Mapping[str, str]], max_len: int | None = None,
                chat_template: str | None = None) -> EncodedChat:
    """Token ids and labels of one conversation; loss on the assistant spans only.

    ``max_len`` truncates from the end (the start of a conversation is what the rest
    depends on); the caller decides what to do with a conversation left without loss.
    """
    if not messages:
        raise LmforgeError("empty conversation")
    full, spans = assistant_char_spans(tokenizer, messages, chat_template)
    ids: list[int] = []
    labels: list[int] = []
    token_spans = []
    cursor = 0
    for start, end in spans:
        if start > cursor:
            piece = tokenizer.encode(full[cursor:start], add_special_tokens=False)
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
        piece = tokenizer.encode(full[start:end], add_special_tokens=False)
        token_spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
        labels += piece
        cursor = end
    if cursor < len(full):
        piece = tokenizer.encode(full[cursor:], add_special_tokens=False)
        ids += piece
        labels += [IGNORE_INDEX] * len(piece)
    whole = tokenizer.encode(full, add_special_tokens=False) == ids
    truncated = max_len is not None and len(ids) > max_len
    if truncated:
        ids, labels = ids[:max_len], labels[:max_len]
        token_spans = [(a, min(b, max_len)) for a, b in token_spans if a < max_len]
    return EncodedChat(ids, labels, truncated, whole, token_spans)


def prompt_messages(messages: Sequence[Mapping[str, str]]) -> tuple[list[dict[str, str]], str]:
    """The conversation before its last assistant turn, and that turn's content (the reference)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise LmforgeError("the conversation has no assistant turn to answer")
    return [dict(m) for m in messages[:last]], messages[last]["content"]


def prompt_ids(tokenizer, messages: Sequence[Mapping[str, str]], chat_template: str | None = None) -> list[int]:
    """Token ids of the prompt before the last assistant turn, with the generation prompt."""
    context, _ = prompt_messages(messages)
    text = _render(tokenizer, context, _template(tokenizer, chat_template), True)
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class DatasetStats:
    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_no_assistant: int = 0
    dropped_truncated: int = 0  # nothing left to learn after truncation
    tokens: int = 0
    loss_tokens: int = 0
    split_encodings: int = 0  # conversations whose piecewise encoding differs from the whole text's

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def encode_dataset(tokenizer, records: Iterable[Mapping[str, Any]], max_len: int | None,
                   chat_template: str | None = None, where: str = "data") -> tuple[list[EncodedChat], DatasetStats]:
    """Encode every record; drop (and count) those that leave nothing to learn."""
    _template(tokenizer, chat_template)  # a missing template is one error, not one per record
    stats = DatasetStats()
    out = []
    for number, record in enumerate(records, 1):
        stats.records += 1
        messages = messages_of(record, f"{where} record {number}")
        if not any(m["role"] == "assistant" and m["content"] for m in messages):
            stats.dropped_no_assistant += 1
            continue
        encoded = encode_chat(tokenizer, messages, max_len, chat_template)
        stats.truncated += encoded.truncated
        if encoded.loss_tokens == 0:
            stats.dropped_truncated += 1
            continue
        stats.split_encodings += not encoded.whole_text_encoding
        stats.kept += 1
        stats.tokens += len(encoded.ids)
        stats.loss_tokens += encoded.loss_tokens
        out.append(encoded)
    if stats.records == 0:
        raise LmforgeError(f"{where}: the dataset is empty")
    if not out:
        reason = ("no record has an assistant turn to learn from" if stats.dropped_no_assistant == stats.records
                  else "no record keeps an assistant token after truncation (raise data.max_len)")
        raise LmforgeError(f"{where}: {reason}")
    return out, stats


def pack_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Example indices per row, each row's lengths summing to at most ``seq_len`` (first fit
    decreasing: longest first, each into the first row with room). Deterministic."""
    if any(n > seq_len for n in lengths):
        raise LmforgeError(f"an example of {max(lengths)} tokens does not fit rows of {seq_len}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(seq_len - lengths[i])
    return rows
