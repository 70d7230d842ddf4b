"""Training data for the loop: build the packed directory if needed, then a resumable row stream.

The stream is an endless sequence of training rows: epoch e visits every row once in an
order drawn from ``seed + e``. Row k of the stream is therefore a pure function of k, and
the loop's only data state is how many rows it has consumed (the *data position*). A
resumed run continues at that position; a run on N processes takes, at each micro-step,
the next ``N x batch_size`` rows of the same stream and gives process r the r-th slice.
With the same global batch, 1 process and N processes see exactly the same rows.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.pack import PackedDataset, pack_text_splits
from lmforge.errors import LmforgeError


class RowStream:
    """Rows of one split in a seeded, epoch-by-epoch shuffled order (`rows(position, n)`)."""

    def __init__(self, dataset: PackedDataset, seed: int, shuffle: bool = True) -> None:
        if len(dataset) == 0:
            raise LmforgeError(f"{dataset.directory} has no rows to train on")
        self.dataset, self.seed, self.shuffle = dataset, seed, shuffle
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.dataset)
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                            else np.arange(n)}
        return self._orders[epoch]

    def rows(self, position: int, count: int) -> torch.Tensor:
        """Stream rows position .. position+count-1 as an int64 tensor [count, seq_len]."""
        n = len(self.dataset)
        out = []
        for k in range(position, position + count):
            out.append(self.dataset[int(self._order(k // n)[k % n])])
        return torch.from_numpy(np.stack(out).astype(np.int64))


def ensure_dataset(section: Any, log=print) -> Path:
    """The packed directory of ``section.path``; built from ``section.sources`` when missing.

    Building: ``data prepare`` (clean, dedup, PII, split) without packing, then a byte-level
    BPE (or, with ``tokenizer_algorithm: wordpiece``, a BERT WordPiece) tokenizer trained on
    the cleaned training text (unless ``section.tokenizer`` names one), then packing. The directory appears under its name only when complete.
    """
    path = Path(section.path)
    if (path / "index.json").is_file():
        return path
    if path.exists() and any(path.iterdir()):
        raise LmforgeError(f"{path} exists but is not a packed dataset (no index.json)")
    if not section.sources:
        raise LmforgeError(f"no packed dataset at {path}: run `lmforge data prepare --out {path} ...` "
                           "or give data.sources to build it")
    from lmforge.data.pipeline import PrepareConfig, run_prepare
    from lmforge.model.loading import resolve_tokenizer

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        log(f"building {path} from {', '.join(section.sources)}")
        text_out = staging / "prepared"
        run_prepare(PrepareConfig(sources=list(section.sources), out=str(text_out), pack=False,
                                  val_fraction=section.val_fraction, max_docs=section.max_docs, progress=False))
        if section.tokenizer is None:
            from lmforge.tokenizer.train import read_training_texts, train_tokenizer

            algorithm = getattr(section, "tokenizer_algorithm", "bpe")
            log(f"training a {section.tokenizer_vocab_size}-token "
                f"{'byte-level BPE' if algorithm == 'bpe' else 'WordPiece'} tokenizer on the cleaned text")
            texts = read_training_texts([text_out / "text" / "train.jsonl"])
            if algorithm == "wordpiece":
                tokenizer = bert_wordpiece(texts, section.tokenizer_vocab_size)
            else:
                tokenizer = train_tokenizer(texts, "bpe", section.tokenizer_vocab_size)
            tokenizer.save(staging)
            tokenizer_name = "tokenizer.json"
        else:
            tokenizer = resolve_tokenizer(section.tokenizer)
            tokenizer_name = section.tokenizer
        eos_id = tokenizer.eos_id
        if eos_id is None:
            raise LmforgeError("the tokenizer has no end-of-sequence token to separate documents")
        log(f"packing into rows of {section.seq_len} tokens")
        pack_text_splits(text_out / "text", tokenizer, staging, section.seq_len, eos_id, tokenizer_name)
        for name in ("scorecard.json", "scorecard.md"):
            shutil.move(str(text_out / name), staging / name)
        shutil.move(str(text_out / "text"), staging / "text")
        shutil.rmtree(text_out)
        if path.exists():
            path.rmdir()
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def bert_wordpiece(texts, vocab_size: int):
    """A lowercased WordPiece tokenizer with BERT's special tokens whose ``encode`` wraps a text
    as [CLS] text [SEP] (packing encodes without them and separates documents with [SEP])."""
    from lmforge.tokenizer.processors import template_processing
    from lmforge.tokenizer.train import train_tokenizer

    tokenizer = train_tokenizer(texts, "wordpiece", vocab_size, lowercase=True)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = template_processing(("[CLS]", cls), ("[SEP]", sep))
    return tokenizer


def dataset_tokenizer(path: Path, index: dict[str, Any], override: str | None):
    """The tokenizer the rows were made with: ``override``, else the one the index names."""
    from lmforge.model.loading import resolve_tokenizer

    spec = override or index.get("tokenizer")
    if spec is None:
        raise LmforgeError(f"{path}/index.json names no tokenizer; set data.tokenizer")
    if spec == "default model":
        spec = None
    elif (path / spec).exists():
        spec = str(path / spec)
    tokenizer = resolve_tokenizer(spec)
    if "vocab_size" in index and tokenizer.vocab_size != index["vocab_size"]:
        raise LmforgeError(f"the tokenizer has {tokenizer.vocab_size} ids but {path} was packed with "
                           f"{index['vocab_size']}; set data.tokenizer to the one used for packing")
    return tokenizer


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (special tokens: 0), for bits per byte."""
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        if i in tokenizer.special_ids:
            continue
        raw = tokenizer.token_bytes(i)
        lengths[i] = len(raw) if raw is not None else len(tokenizer.decode([i]).encode("utf-8"))
    return lengths
