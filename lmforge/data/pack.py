"""Packing token ids into fixed-length training shards (D7).

Pretraining consumes fixed-length rows of ``seq_len`` tokens. Padding each document to
that length would waste most of the compute on short texts, so documents are instead
*packed*: their ids are concatenated into one stream with an end-of-sequence token after
each document, and the stream is cut into rows. A row may hold the end of one document
and the start of the next; the EOS between them tells the model that the context before
it is unrelated. Rows are grouped into shards (``.npy`` files, ``uint16`` when every id
fits, else ``uint32``) that a training loop can memory-map, plus ``index.json`` that lists
them. The last partial row of each split is dropped and counted in the index.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.io.atomic import atomic_path, write_json_atomic  # noqa: F401 (write_json_atomic: re-exported)

INDEX_FORMAT = "lmforge-packed-tokens/1"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id (uint16 up to 65,536 ids)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def index_header(seq_len: int, tokenizer: Any = None, tokenizer_name: str | None = None,
                 eos_id: int | None = None) -> dict[str, Any]:
    """The start of an ``index.json``: format and row length, and with a tokenizer what the
    ids mean (its name, vocabulary size, EOS id and token, shard dtype). Splits are added
    as they are written."""
    index: dict[str, Any] = {"format": INDEX_FORMAT, "seq_len": seq_len, "splits": {}}
    if tokenizer is not None:
        index.update({"tokenizer": tokenizer_name, "vocab_size": tokenizer.vocab_size, "eos_id": eos_id,
                      "eos_token": tokenizer.id_to_token(eos_id), "dtype": str(token_dtype(tokenizer.vocab_size))})
    return index


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """np.save to a temporary file in the same directory, then rename it into place."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


@dataclass
class ShardWriter:
    """Accumulates documents' ids (+ EOS) and writes full shards of ``rows_per_shard`` rows."""

    directory: Path
    split: str
    seq_len: int
    eos_id: int
    vocab_size: int
    rows_per_shard: int = 1024
    shards: list[dict[str, Any]] = field(default_factory=list)
    documents: int = 0
    tokens: int = 0  # document tokens + EOS, before cutting into rows
    _buffer: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise LmforgeError("seq_len must be at least 2")
        if not 0 <= self.eos_id < self.vocab_size:
            raise LmforgeError(f"EOS id {self.eos_id} is outside the vocabulary (size {self.vocab_size})")
        self.dtype = token_dtype(self.vocab_size)

    def add(self, ids: Iterable[int]) -> None:
        before = len(self._buffer)
        self._buffer.extend(ids)
        self._buffer.append(self.eos_id)
        self.documents += 1
        self.tokens += len(self._buffer) - before
        while len(self._buffer) >= self.seq_len * self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, rows: int) -> None:
        n = rows * self.seq_len
        array = np.asarray(self._buffer[:n], dtype=self.dtype).reshape(rows, self.seq_len)
        del self._buffer[:n]
        name = f"{self.split}-{len(self.shards):05d}.npy"
        save_npy_atomic(self.directory / name, array)
        self.shards.append({"file": name, "rows": rows})

    def close(self) -> dict[str, Any]:
        """Write the remaining full rows; returns this split's entry of index.json."""
        rows = len(self._buffer) // self.seq_len
        if rows:
            self._flush(rows)
        dropped = len(self._buffer)
        self._buffer.clear()
        return {"shards": self.shards, "rows": sum(s["rows"] for s in self.shards),
                "documents": self.documents, "tokens": self.tokens, "dropped_tail_tokens": dropped}


class PackedDataset:
    """Rows of one split of a packed directory, memory-mapped (``ds[i]`` -> one row)."""

    def __init__(self, directory: str | os.PathLike[str], split: str = "train") -> None:
        self.directory = Path(directory)
        index_path = self.directory / "index.json"
        try:
            self.index = json.loads(index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LmforgeError(f"{self.directory} has no index.json; is it a packed dataset?") from None
        if self.index.get("format") != INDEX_FORMAT:
            raise LmforgeError(f"{index_path} is not a {INDEX_FORMAT} index")
        if split not in self.index["splits"]:
            raise LmforgeError(f"split {split!r} not in {self.directory} (has {', '.join(self.index['splits'])})")
        self.seq_len = int(self.index["seq_len"])
        self.shards = [np.load(self.directory / s["file"], mmap_mode="r") for s in self.index["splits"][split]["shards"]]
        self._offsets = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        shard = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return np.asarray(self.shards[shard][i - self._offsets[shard]])


def pack_text_splits(text_dir: str | os.PathLike[str], tokenizer: Any, out: str | os.PathLike[str], seq_len: int,
                     eos_id: int, tokenizer_name: str, rows_per_shard: int = 1024) -> dict[str, Any]:
    """Tokenize ``text_dir/{split}.jsonl`` (as written by ``data prepare``) into packed shards in ``out``.

    This is the second half of ``data prepare`` for the case where the tokenizer is trained
    on the cleaned text itself, so it can exist only after cleaning. Writes and returns
    ``out/index.json`` (last, so a directory without one is never taken for a dataset).
    """
    from lmforge.io.text_files import read_jsonl, text_of

    out = Path(out)
    index = index_header(seq_len, tokenizer, tokenizer_name, eos_id)
    for file in sorted(Path(text_dir).glob("*.jsonl")):
        writer = ShardWriter(out, file.stem, seq_len, eos_id, tokenizer.vocab_size, rows_per_shard)
        for line, record in read_jsonl(file):
            writer.add(tokenizer.encode(text_of(record, f"{file}:{line}"), add_special_tokens=False))
        entry = writer.close()
        if entry["rows"]:
            index["splits"][file.stem] = entry
    write_json_atomic(out / "index.json", index)
    return index
