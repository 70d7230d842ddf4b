"""Sentence embeddings: texts -> unit vectors whose dot products measure similarity of meaning.

An encoder (BERT-style, see lmforge/model/transformer.py) reads a whole text at once, each
token attending to every other, and produces one hidden vector per token. Pooling turns
those into one vector per text: the mean over the text's tokens (all-MiniLM-L6-v2), the
[CLS] token's vector, or the element-wise maximum. Scaled to unit length, two vectors'
dot product is their cosine similarity, which is what retrieval ranks by.

The model directory is a sentence-transformers one: `modules.json` lists the stages
(Transformer, Pooling, Normalize), `1_Pooling/config.json` names the pooling, and
`sentence_bert_config.json` the longest input (`max_seq_length`). A plain Hugging Face
BERT directory works too (mean pooling, no normalization, as sentence-transformers does).

Speed: texts are tokenized first, sorted by token count and batched in that order, so a
batch holds texts of nearly equal length; the encoder then runs on the batch packed end to
end without padding (`Transformer.encode_packed`), and pooling reads the packed tokens. On
CPU in float32 each of the encoder's products reads a packed copy of its weight and applies
its bias, GELU or residual add as it writes (lmforge/model/onednn.py, `packed_*`).

    >>> from lmforge.rag.embedder import load_embedder
    >>> embedder = load_embedder()          # all-MiniLM-L6-v2, offline
    >>> vectors = embedder.encode(["A cat sits.", "A kitten is sitting."])   # [2, 384], unit length
    >>> float(vectors[0] @ vectors[1])      # cosine similarity
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.io.text_files import parse_json, read_text
from lmforge.model.loading import load_model, pick_device, pick_dtype
from lmforge.model.registry import DEFAULT_EMBEDDING_MODEL, ModelSpec, resolve
from lmforge.tokenizer import Tokenizer

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len")  # sentence-transformers' concatenation order
_POOLING_FLAGS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
                  "mean": "pooling_mode_mean_tokens", "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens"}
_ST_PREFIX = "sentence_transformers.models."


@dataclass(frozen=True)
class EncoderLayout:
    """What a sentence-transformers directory says about its stages."""

    transformer_dir: Path  # the Hugging Face model directory (config.json, weights, tokenizer)
    pooling: tuple[str, ...] = ("mean",)  # several: vectors concatenated in POOLING_MODES order
    normalize: bool = False
    max_seq_length: int | None = None  # the longest input in tokens, special tokens included
    lowercase: bool = False  # sentence_bert_config's do_lower_case: lowercase texts first


def _read_json(path: Path) -> Any:
    return parse_json(read_text(path, "model file"), path)


def _pooling_modes(config: dict[str, Any], path: Path) -> tuple[str, ...]:
    named = config.get("pooling_mode")
    if named is not None:  # newer files name the mode(s) directly
        names = [named] if isinstance(named, str) else list(named)
        names = ["mean_sqrt_len" if n in ("mean_sqrt_len_tokens", "mean_sqrt_len") else n.removesuffix("_token")
                 for n in names]
    else:
        names = [mode for mode, flag in _POOLING_FLAGS.items() if config.get(flag)]
        for flag in ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken"):
            if config.get(flag):
                names.append(flag.removeprefix("pooling_mode_"))
    unknown = [n for n in names if n not in POOLING_MODES]
    if unknown or not names:
        raise LmforgeError(f"{path}: unsupported pooling {unknown or 'none'} (lmforge pools with "
                           f"{', '.join(POOLING_MODES)})")
    return tuple(m for m in POOLING_MODES if m in names)


def read_layout(directory: Path) -> EncoderLayout:
    """The stages of a sentence-transformers directory (or the defaults for a plain HF one)."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return EncoderLayout(directory, max_seq_length=_max_seq_length(directory))
    modules = _read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise LmforgeError(f"{modules_file}: expected a list of modules with a type each")
    transformer_dir, pooling, normalize = None, ("mean",), False
    for module in modules:
        kind = str(module["type"]).removeprefix(_ST_PREFIX).rsplit(".", 1)[-1]
        where = directory / str(module.get("path") or "")
        if kind == "Transformer":
            transformer_dir = where
        elif kind == "Pooling":
            pooling = _pooling_modes(_read_json(where / "config.json"), where / "config.json")
        elif kind == "Normalize":
            normalize = True
        else:
            raise LmforgeError(f"{modules_file}: unsupported sentence-transformers module {module['type']!r} "
                               "(lmforge runs Transformer, Pooling and Normalize)")
    if transformer_dir is None:
        raise LmforgeError(f"{modules_file} lists no Transformer module")
    settings_file = transformer_dir / "sentence_bert_config.json"
    settings = _read_json(settings_file) if settings_file.is_file() else {}
    return EncoderLayout(transformer_dir, pooling, normalize, settings.get("max_seq_length") or
                         _max_seq_length(transformer_dir), bool(settings.get("do_lower_case", False)))


def _max_seq_length(directory: Path) -> int | None:
    """Without sentence_bert_config.json: tokenizer.json's truncation length, if any."""
    path = directory / "tokenizer.json"
    if path.is_file():
        truncation = (_read_json(path) or {}).get("truncation") or {}
        if truncation.get("max_length"):
            return int(truncation["max_length"])
    return None


def fingerprint(directory: Path, layout: EncoderLayout) -> str:
    """A short hash that changes whenever the vectors would: configs, tokenizer and weights.

    Hashing every weight byte of a large model takes seconds; the safetensors header (names,
    shapes, dtypes, offsets), the file size and 16 blocks of 64 KiB spread over the file
    take milliseconds and still change with any training or conversion, which rewrites
    every block.
    """
    digest = hashlib.blake2b(digest_size=8)
    roots = sorted({directory, layout.transformer_dir})
    names = ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json", "config.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json")
    for root in roots:
        for name in names:
            path = root / name
            if path.is_file():
                digest.update(name.encode() + b"\0" + path.read_bytes())
    digest.update(repr((layout.pooling, layout.normalize, layout.max_seq_length, layout.lowercase)).encode())
    for path in sorted(layout.transformer_dir.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_len, 1 << 24)))
            block = 1 << 16
            for k in range(16):
                f.seek(max(0, (size - block) * k // 15))
                digest.update(f.read(block))
    return digest.hexdigest()


class Embedder:
    """Texts -> float32 vectors [N, dim] with one encoder model; see the module docstring.

    `name` is what the user called the model; `model_id` adds a fingerprint of its files,
    so an index built with one model refuses vectors from another. `max_tokens` is the
    most tokens of a text the model reads (its `max_seq_length` less the special tokens it
    adds); `count_tokens(text)` counts a text's own tokens, so a text is read whole when
    `count_tokens(text) <= max_tokens` and its end is cut otherwise.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, layout: EncoderLayout, name: str,
                 model_id: str) -> None:
        self.model, self.tokenizer, self.layout = model, tokenizer, layout
        self.name, self.model_id = name, model_id
        self.normalize = layout.normalize
        positions = model.config.max_position_embeddings if model.config.position == "learned" else None
        limit = layout.max_seq_length or positions or 512
        self.max_seq_length = min(limit, positions) if positions else limit
        self.special_tokens = tokenizer.post_processor.added_count()
        if self.max_seq_length <= self.special_tokens:
            raise LmforgeError(f"max_seq_length {self.max_seq_length} leaves no room for text")
        self.device = next(model.parameters()).device

    @property
    def dim(self) -> int:
        return self.model.config.n_embd * len(self.layout.pooling)

    @property
    def max_tokens(self) -> int:
        return self.max_seq_length - self.special_tokens

    def _text(self, text: Any, index: int) -> str:
        if not isinstance(text, str):
            raise LmforgeError(f"text {index} is a {type(text).__name__}, not a string")
        return text.lower() if self.layout.lowercase else text

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` itself (special tokens excluded), before any truncation."""
        return len(self.tokenizer.encode(self._text(text, 0), add_special_tokens=False))

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids the model reads for each text: truncated to `max_seq_length`, special tokens added."""
        return [self.tokenizer.encode(self._text(t, i), max_length=self.max_seq_length) for i, t in enumerate(texts)]

    def encode(self, texts: Sequence[str] | str, batch_size: int = 32, normalize: bool | None = None,
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Vectors [len(texts), dim], float32, in the order of `texts` (a str counts as one text).

        `normalize` (None: what the model's directory says) scales each vector to unit
        length. Longer texts are cut at `max_tokens`. `progress(done, total)` is called
        after each batch.
        """
        if isinstance(texts, str):
            texts = [texts]
        return self.encode_ids(self.tokenize(texts), batch_size, normalize, progress, special_tokens_added=True)

    def encode_ids(self, sequences: Sequence[Sequence[int]], batch_size: int = 32, normalize: bool | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   special_tokens_added: bool = False) -> np.ndarray:
        """Vectors for texts given as token ids (each text's own tokens; the special tokens
        are added here unless `special_tokens_added`). Longer sequences are an error."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise LmforgeError(f"batch_size must be a positive integer, not {batch_size!r}")
        vocab = self.model.config.vocab_size
        rows = []
        for i, seq in enumerate(sequences):
            ids = list(seq) if special_tokens_added else self.tokenizer.post_processor.apply(list(seq))
            if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise LmforgeError(f"input {i} holds token ids outside the vocabulary (0..{vocab - 1})")
            if len(ids) > self.max_seq_length:
                raise LmforgeError(f"input {i} has {len(ids)} tokens with the special tokens; "
                                   f"the model reads at most {self.max_seq_length}")
            if not ids:
                raise LmforgeError(f"input {i} is empty")
            rows.append(ids)
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        normalize = self.normalize if normalize is None else normalize
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # longest first: memory peaks early
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chosen = order[start:start + batch_size]
                vectors = self._embed_batch([rows[i] for i in chosen], normalize)
                out[chosen] = vectors
                if progress is not None:
                    progress(min(start + batch_size, len(order)), len(order))
        return out

    def _embed_batch(self, rows: list[list[int]], normalize: bool) -> np.ndarray:
        lengths = [len(r) for r in rows]
        ids = torch.tensor([t for r in rows for t in r], dtype=torch.long, device=self.device)
        hidden = self.model.encode_packed(ids, lengths)  # [N, D], packed
        pooled = pool(hidden, lengths, self.layout.pooling)
        if normalize:
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return pooled.float().cpu().numpy()

    def __repr__(self) -> str:
        return (f"Embedder({self.model_id}, dim={self.dim}, max_tokens={self.max_tokens}, "
                f"pooling={'+'.join(self.layout.pooling)}, normalize={self.normalize})")


def pool(hidden: torch.Tensor, lengths: list[int], modes: Sequence[str]) -> torch.Tensor:
    """One vector per sequence from packed token vectors [N, D]; several modes are concatenated."""
    lens = torch.tensor(lengths, device=hidden.device)
    starts = torch.cumsum(lens, 0) - lens
    row = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lens)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[starts])
        elif mode == "max":
            width = max(lengths)
            padded = hidden.new_full((len(lengths) * width, hidden.shape[-1]), float("-inf"))
            index = row * width + (torch.arange(hidden.shape[0], device=hidden.device) - starts[row])
            out.append(padded.index_copy_(0, index, hidden).view(len(lengths), width, -1).amax(1))
        else:
            sums = hidden.new_zeros(len(lengths), hidden.shape[-1]).index_add_(0, row, hidden)
            scale = lens.to(hidden.dtype) if mode == "mean" else lens.to(hidden.dtype).sqrt()
            out.append(sums / scale[:, None])
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


def load_embedder(name_or_path: str | Path | None = None, device: str | None = None,
                  dtype: str | torch.dtype | None = None) -> Embedder:
    """An `Embedder` for a registered name, a sentence-transformers or BERT directory
    (default: all-minilm-l6-v2). `device`/`dtype` as everywhere in lmforge (None: auto)."""
    spec = resolve(name_or_path if name_or_path is not None else DEFAULT_EMBEDDING_MODEL)
    if spec.format != "hf":
        raise LmforgeError(f"{spec.name} is a {spec.format} file; embeddings need an encoder model directory "
                           "(sentence-transformers or Hugging Face BERT)")
    directory = Path(spec.path)
    layout = read_layout(directory)
    dev = pick_device(device)
    model = load_model(ModelSpec(spec.name, "hf", layout.transformer_dir), pick_dtype(dtype, dev), dev,
                       need_lm_head=False)
    if not (layout.transformer_dir / "tokenizer.json").is_file():
        raise LmforgeError(f"{layout.transformer_dir} has no tokenizer.json; lmforge needs it to turn text into tokens")
    tokenizer = Tokenizer.from_pretrained_dir(layout.transformer_dir)
    name = spec.name if not Path(str(spec.name)).expanduser().exists() else directory.name
    return Embedder(model.eval(), tokenizer, layout, name, f"{name}@{fingerprint(directory, layout)}")
