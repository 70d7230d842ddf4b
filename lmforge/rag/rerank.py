"""A cross-encoder: one BERT reads two texts together and a small head scores the pair.

A bi-encoder (the embedder) turns the question and each passage into vectors separately
and compares them with one dot product, so nothing of the question can influence how a
passage is read. A cross-encoder reads the pair as one input,

    [CLS] question [SEP] passage [SEP]      (token type 0 up to the first [SEP], 1 after)

so every layer's attention relates each word of one text to every word of the other: it
notices that the passage says "a quarter" where the sentence says "half", or that the
question's rare term is the passage's subject. The price is one full model pass per pair,
which is why it reranks a short list (the fused top ~20) instead of searching a corpus.

The head is Hugging Face's `BertForSequenceClassification`: the final [CLS] vector goes
through a dense layer with tanh (BERT's pooler) and a linear layer with one output per
label. lmforge's model has two labels, each its own logit (a multi-label head):

* ``relevant``: the passage (second text) answers the query (first text); reranking sorts
  by it, and its best value over the candidates says whether anything answers at all;
* ``supported``: the passage states what the sentence (first text) says; the support
  checker of grounded answers (`groundedness.CrossEncoderSupportChecker`) reads it.

Only the [CLS] row of the last layer reaches the head, so the last layer computes keys and
values for every token but queries, feed-forward and norms for [CLS] alone
(`_cls_block`): the logits are exactly those of the full layer, for ~1/6 of its work.

The model is saved as a Hugging Face directory (config.json naming
`BertForSequenceClassification` with `id2label`, model.safetensors, tokenizer.json), so
transformers and sentence-transformers' `CrossEncoder` load it too. How it is trained:
`rerank_train.py`; where its training data comes from: `rerank_data.py`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LmforgeError
from ..io.atomic import atomic_directory
from .types import Chunk, Hit

LABELS = ("relevant", "supported")
DEFAULT_MAX_LENGTH = 256
DEFAULT_DEPTH = 20  # fused hits a reranker reads
DEFAULT_NAME = "reranker-all-minilm-l6-v2"  # the trained model's directory in the cache
CONFIG_KEY = "lmforge_cross_encoder"  # config.json section describing the head and its training


def default_reranker_dir() -> Path:
    """Where `lmforge rag train-reranker` writes its model by default (the user's cache, never the repo)."""
    from .handbook import cache_dir

    return cache_dir() / DEFAULT_NAME


def resolve_reranker(spec: str | os.PathLike[str] | None) -> Path | None:
    """The model directory a ``--rerank`` value names: None/"none" (off), "auto" (the trained
    default in the cache) or a directory. A missing one is a clear error."""
    if spec is None or str(spec) in ("", "none"):
        return None
    if str(spec) == "auto":
        path = default_reranker_dir()
        if not (path / "config.json").is_file():
            raise LmforgeError(f"no trained reranker in {path}; train one with `lmforge rag train-reranker` "
                               "(a few minutes on a CPU) or name a directory with --rerank DIR")
        return path
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise LmforgeError(f"--rerank {spec}: not a model directory (no config.json there)")
    return path


def truncate_pair(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths kept of two token lists so that together they fit `budget` (tokens come off the ends).

    The rule of Hugging Face tokenizers' default pair truncation ("longest first"): the
    shorter text keeps up to half the budget, the longer one the rest (on equal lengths the
    first text is the "shorter"). A short question is kept whole and a long passage loses
    its tail; two long texts share the budget about equally.
    """
    if len_a + len_b <= budget:
        return len_a, len_b
    if len_a > len_b:
        keep_b = min(len_b, budget // 2)
        return min(len_a, budget - keep_b), keep_b
    keep_a = min(len_a, budget // 2)
    return keep_a, min(len_b, budget - keep_a)


@dataclass
class PairBatch:
    """Pairs packed end to end (no padding): ids and token types [N], one length per pair."""

    ids: torch.Tensor
    types: torch.Tensor
    lengths: list[int]

    @property
    def starts(self) -> torch.Tensor:
        """The packed position of each pair's [CLS]."""
        lens = torch.tensor(self.lengths, device=self.ids.device)
        return torch.cumsum(lens, 0) - lens


class CrossEncoder(nn.Module):
    """A BERT `Transformer` (lmforge/model) with BERT's pooler and a linear head; see the module docstring.

    `forward(ids, mask, types)` gives logits [B, labels] of right-padded batches (what
    transformers' `BertForSequenceClassification` computes); `score(pairs)` is the
    inference path for text pairs (packed, the last layer on [CLS] only).
    """

    def __init__(self, encoder: nn.Module, tokenizer, labels: Sequence[str] = LABELS,
                 max_length: int = DEFAULT_MAX_LENGTH, info: dict[str, Any] | None = None) -> None:
        super().__init__()
        config = encoder.config
        if config.causal or config.family != "bert":
            raise LmforgeError("a cross-encoder needs a BERT-style encoder model")
        prefix, suffix = tokenizer.post_processor.prefix, tokenizer.post_processor.suffix
        if len(prefix) != 1 or len(suffix) != 1:
            raise LmforgeError("the tokenizer must wrap a text as [CLS] text [SEP] (a BERT post-processor)")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.cls_id, self.sep_id = prefix[0], suffix[0]
        self.labels = tuple(labels)
        limit = config.max_position_embeddings
        self.max_length = min(int(max_length), limit)
        if self.max_length < 8:
            raise LmforgeError(f"max_length {max_length} leaves no room for a pair")
        self.info = dict(info or {})  # config.json's lmforge section: thresholds, training record
        self._readable: dict[str, bool] = {}
        width = config.n_embd
        self.pooler = nn.Linear(width, width)
        self.classifier = nn.Linear(width, len(self.labels))

    def readable(self, text: str) -> bool:
        """Whether the tokenizer reads `text` mostly as known tokens (at most half [UNK])."""
        known = self._readable.get(text)
        if known is None:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            unk = self.tokenizer.unk_id
            known = not ids or sum(i == unk for i in ids) <= len(ids) / 2
            self._readable[text] = known
        return known

    def passage_text(self, chunk: Chunk) -> str:
        """What the cross-encoder reads of a chunk: `Chunk.search_text()` (title, Chinese title,
        key terms, heading path, text) less the titles and terms its vocabulary cannot read.

        all-MiniLM-L6-v2's vocabulary maps most Traditional Chinese characters to [UNK]:
        there the Chinese title and terms would cost ~80 of the 256 positions and say
        nothing, so they are left out (a multilingual encoder keeps them).
        """
        meta = chunk.metadata
        head = [chunk.title]
        if meta.get("zh_title") and self.readable(str(meta["zh_title"])):
            head.append(str(meta["zh_title"]))
        terms = [str(t) for t in list(meta.get("terms") or []) + list(meta.get("zh_terms") or [])]
        terms = [t for t in terms if self.readable(t)]
        if terms:
            head.append(", ".join(terms))
        path = " > ".join(h for h in chunk.headings[1:] if h)
        return "\n".join(part for part in (" | ".join(head), path, chunk.text) if part)

    @property
    def device(self) -> torch.device:
        return self.classifier.weight.device

    def head_index(self, head: str) -> int:
        if head not in self.labels:
            raise LmforgeError(f"this cross-encoder has no {head!r} output (it has {', '.join(self.labels)})")
        return self.labels.index(head)

    # -- the computation ----------------------------------------------------------------

    def head(self, cls: torch.Tensor) -> torch.Tensor:
        """Logits from final [CLS] vectors [B, D]: classifier(tanh(pooler(cls)))."""
        return self.classifier(torch.tanh(self.pooler(cls)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, labels] for right-padded pairs [B, L] (as BertForSequenceClassification)."""
        hidden = self.encoder.encode(input_ids, attention_mask, token_type_ids)
        return self.head(hidden[:, 0])

    def embed_packed(self, batch: PairBatch) -> torch.Tensor:
        """Token + position + token-type embeddings, normalized: [N, D] (the encoder's first step)."""
        enc = self.encoder
        lens = torch.tensor(batch.lengths, device=batch.ids.device)
        starts = torch.cumsum(lens, 0) - lens
        row = torch.repeat_interleave(torch.arange(len(batch.lengths), device=batch.ids.device), lens)
        positions = torch.arange(batch.ids.numel(), device=batch.ids.device) - starts[row]
        x = enc.embed(batch.ids) + enc.pos_embed(positions) + enc.type_embed(batch.types)
        return enc.embed_norm(x)

    def run_layers(self, x: torch.Tensor, lengths: list[int], first: int, last: int) -> torch.Tensor:
        """Packed hidden states through layers first..last-1 (all tokens)."""
        from lmforge.model.transformer import Packing

        packing = Packing.from_lengths(lengths, x.device)
        for block in self.encoder.layers[first:last]:
            x = block.forward_packed(x, packing, None, packing.key_mask)
        return x

    def logits_from(self, x: torch.Tensor, lengths: list[int], first: int) -> torch.Tensor:
        """Logits [B, labels] from packed hidden states entering layer `first`: the layers
        up to the last run on every token, the last one on [CLS] only."""
        n_layer = len(self.encoder.layers)
        if first < n_layer - 1:
            x = self.run_layers(x, lengths, first, n_layer - 1)
        lens = torch.tensor(lengths, device=x.device)
        starts = torch.cumsum(lens, 0) - lens
        cls = _cls_block(self.encoder.layers[n_layer - 1], x, lengths, starts) if first < n_layer else x[starts]
        return self.head(cls)

    def logits_packed(self, batch: PairBatch) -> torch.Tensor:
        return self.logits_from(self.embed_packed(batch), batch.lengths, 0)

    # -- text in, scores out ------------------------------------------------------------

    def encode_pair(self, first: str, second: str) -> tuple[list[int], list[int]]:
        """(ids, token types) of ``[CLS] first [SEP] second [SEP]``, cut to `max_length` (longest first)."""
        for name, text in (("first", first), ("second", second)):
            if not isinstance(text, str):
                raise LmforgeError(f"the {name} text of a pair is a {type(text).__name__}, not a string")
        a = self.tokenizer.encode(first, add_special_tokens=False)
        b = self.tokenizer.encode(second, add_special_tokens=False)
        keep_a, keep_b = truncate_pair(len(a), len(b), self.max_length - 3)
        ids = [self.cls_id, *a[:keep_a], self.sep_id, *b[:keep_b], self.sep_id]
        return ids, [0] * (keep_a + 2) + [1] * (keep_b + 1)

    def pack(self, encoded: Sequence[tuple[list[int], list[int]]]) -> PairBatch:
        ids = torch.tensor([t for pair, _ in encoded for t in pair], dtype=torch.long, device=self.device)
        types = torch.tensor([t for _, kinds in encoded for t in kinds], dtype=torch.long, device=self.device)
        return PairBatch(ids, types, [len(pair) for pair, _ in encoded])

    def logits(self, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """All logits [len(pairs), labels] (float32) for (first, second) text pairs."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise LmforgeError(f"batch_size must be a positive integer, not {batch_size!r}")
        encoded = [self.encode_pair(a, b) for a, b in pairs]
        out = np.zeros((len(encoded), len(self.labels)), dtype=np.float32)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # similar lengths share a batch
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), batch_size):
                    chosen = order[start:start + batch_size]
                    batch = self.pack([encoded[i] for i in chosen])
                    out[chosen] = self.logits_packed(batch).float().cpu().numpy()
                    if progress is not None:
                        progress(min(start + batch_size, len(order)), len(order))
        finally:
            self.train(was_training)
        return out

    def score(self, pairs: Sequence[tuple[str, str]], head: str = "relevant", batch_size: int = 16,
              progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """One logit per (first, second) pair from output `head` (higher: more relevant / supported).

        A logit, not a probability: `1 / (1 + exp(-score))` is the model's probability, and
        0 is where it is undecided.
        """
        index = self.head_index(head)
        return self.logits(pairs, batch_size, progress)[:, index]

    # -- files ----------------------------------------------------------------------------

    @classmethod
    def from_encoder(cls, directory: str | os.PathLike[str], labels: Sequence[str] = LABELS,
                     max_length: int = DEFAULT_MAX_LENGTH, seed: int = 0) -> "CrossEncoder":
        """A new cross-encoder on a BERT checkpoint (a sentence-transformers or plain BERT
        directory): its encoder and, when the checkpoint has one, its pooler; a fresh head."""
        from .embedder import read_layout

        layout = read_layout(Path(directory))
        state, config, tokenizer = _read_bert(layout.transformer_dir)
        model = cls(_build_encoder(config, state), tokenizer, labels, min(max_length, layout.max_seq_length or
                                                                         max_length))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            if "pooler.dense.weight" in state:
                model.pooler.weight.copy_(state["pooler.dense.weight"])
                model.pooler.bias.copy_(state["pooler.dense.bias"])
            else:
                model.pooler.weight.normal_(0.0, 0.02, generator=generator)
                model.pooler.bias.zero_()
            model.classifier.weight.normal_(0.0, 0.02, generator=generator)
            model.classifier.bias.zero_()
        return model

    @classmethod
    def load(cls, directory: str | os.PathLike[str], device: str | torch.device | None = None) -> "CrossEncoder":
        """A saved cross-encoder: a Hugging Face `BertForSequenceClassification` directory."""
        from lmforge.model.loading import pick_device

        directory = Path(directory).expanduser()
        if not (directory / "config.json").is_file():
            raise LmforgeError(f"{directory} is not a model directory (no config.json)")
        state, config, tokenizer = _read_bert(directory)
        hf = _read_config(directory)
        if "classifier.weight" not in state:
            raise LmforgeError(f"{directory} holds no classification head (classifier.weight): "
                               "not a cross-encoder")
        n_labels = state["classifier.weight"].shape[0]
        id2label = hf.get("id2label") or {}
        labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n_labels)]
        info = hf.get(CONFIG_KEY) or {}
        model = cls(_build_encoder(config, state), tokenizer, labels,
                    int(info.get("max_length", config.max_position_embeddings)), info)
        with torch.no_grad():
            for name, module in (("pooler.dense", model.pooler), ("classifier", model.classifier)):
                if f"{name}.weight" not in state:
                    raise LmforgeError(f"{directory} lacks {name}.weight")
                module.weight.copy_(state[f"{name}.weight"])
                module.bias.copy_(state[f"{name}.bias"])
        dev = pick_device(device)
        return model.to(dev).eval()

    def save(self, directory: str | os.PathLike[str], overwrite: bool = True) -> Path:
        """Write config.json, model.safetensors and the tokenizer files into `directory`, atomically
        (a staging directory renamed into place)."""
        from safetensors.torch import save_file

        from lmforge.model.families import hf_config_from, lmforge_to_hf

        target = Path(directory).expanduser()
        if target.exists() and not overwrite:
            raise LmforgeError(f"{target} already exists")
        target.parent.mkdir(parents=True, exist_ok=True)
        config = self.encoder.config
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.encoder.state_dict().items()}
        tensors = {f"bert.{k}": v.contiguous() for k, v in lmforge_to_hf(config, state).items()}
        for name, module in (("bert.pooler.dense", self.pooler), ("classifier", self.classifier)):
            tensors[f"{name}.weight"] = module.weight.detach().float().cpu().contiguous()
            tensors[f"{name}.bias"] = module.bias.detach().float().cpu().contiguous()
        hf = hf_config_from(config)
        hf["architectures"] = ["BertForSequenceClassification"]
        hf["id2label"] = {str(i): label for i, label in enumerate(self.labels)}
        hf["label2id"] = {label: i for i, label in enumerate(self.labels)}
        hf["problem_type"] = "multi_label_classification"  # each label its own logit (sigmoid, not softmax)
        hf[CONFIG_KEY] = {
            "max_length": self.max_length,
            "input": "[CLS] first [SEP] second [SEP]; token type 0 up to the first [SEP], 1 after",
            "head": "logits = classifier(tanh(pooler.dense(final [CLS] vector))), one per label",
            "labels": {"relevant": "the second text (a passage) answers the first (a query)",
                       "supported": "the second text (a passage) states what the first (a sentence) says"},
            **{k: v for k, v in self.info.items() if k not in ("max_length", "input", "head", "labels")},
        }
        with atomic_directory(target) as staging:
            save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
            (staging / "config.json").write_text(json.dumps(hf, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
            self.tokenizer.save(staging)
            # Hugging Face's generic fast tokenizer returns token types only when told to; without
            # them a pair's second text would be read as segment 0 by transformers and
            # sentence-transformers.
            config_path = staging / "tokenizer_config.json"
            tok_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
            tok_config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
            tok_config.setdefault("model_max_length", self.max_length)
            for key, token in (("cls_token", self.tokenizer.id_to_token(self.cls_id)),
                               ("sep_token", self.tokenizer.id_to_token(self.sep_id)),
                               ("pad_token", "[PAD]" if self.tokenizer.token_to_id("[PAD]") is not None else None)):
                if token is not None:
                    tok_config.setdefault(key, token)
            config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return target


def _cls_block(block: nn.Module, x: torch.Tensor, lengths: list[int], starts: torch.Tensor) -> torch.Tensor:
    """A post-norm block's output at each sequence's first token only: [B, D] from packed x [N, D].

    Keys and values need every token; the query, the output projection, both norms and the
    feed-forward network only the [CLS] row, so the result equals the full block's row 0.
    """
    attn = block.attn
    heads, head_dim = attn.n_head, attn.head_dim
    batch, width = len(lengths), max(lengths)
    size = attn.q_size
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(x[starts], weight[:size], None if bias is None else bias[:size])  # [B, D]
    kv = F.linear(x, weight[size:], None if bias is None else bias[size:])  # [N, 2D]
    lens = torch.tensor(lengths, device=x.device)
    row = torch.repeat_interleave(torch.arange(batch, device=x.device), lens)
    col = torch.arange(x.shape[0], device=x.device) - starts[row]
    padded = kv.new_zeros(batch, width, kv.shape[-1])
    padded[row, col] = kv
    k, v = padded.view(batch, width, 2, heads, head_dim).permute(2, 0, 3, 1, 4)  # each [B, H, T, d]
    mask = (torch.arange(width, device=x.device) < lens[:, None]).view(batch, 1, 1, width)
    y = F.scaled_dot_product_attention(q.view(batch, heads, 1, head_dim), k, v, attn_mask=mask)
    h = block.attn_norm(attn.out(y.reshape(batch, size)) + x[starts])
    mlp = block.mlp
    return block.mlp_norm(mlp.proj(F.gelu(mlp.fc(h), approximate=mlp.gelu_approximate)) + h)


def _read_config(directory: Path) -> dict[str, Any]:
    from lmforge.io.text_files import parse_json, read_text

    path = directory / "config.json"
    data = parse_json(read_text(path, "model file"), path)
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: expected a JSON object")
    return data


def _read_bert(directory: Path):
    """(HF state dict, ModelConfig, Tokenizer) of a BERT directory."""
    from lmforge.model.checkpoint import read_hf_config, read_safetensors
    from lmforge.tokenizer import Tokenizer

    config = read_hf_config(directory)
    if config.family != "bert":
        raise LmforgeError(f"{directory} holds a {config.family} model; a cross-encoder needs a BERT encoder")
    if not (directory / "tokenizer.json").is_file():
        raise LmforgeError(f"{directory} has no tokenizer.json; lmforge needs it to turn text into tokens")
    state = read_safetensors(directory)
    state = {(k[5:] if k.startswith("bert.") else k): v for k, v in state.items()}
    return state, config, Tokenizer.from_pretrained_dir(directory)


def _build_encoder(config, state: dict[str, torch.Tensor]):
    from lmforge.model.checkpoint import build_model
    from lmforge.model.families import hf_to_lmforge

    return build_model(config, hf_to_lmforge(config, state), torch.float32, "cpu")


def load_reranker(spec: str | os.PathLike[str] | None, device: str | torch.device | None = None) -> CrossEncoder | None:
    """The cross-encoder a ``--rerank`` value names (see `resolve_reranker`), or None when off."""
    path = resolve_reranker(spec)
    return None if path is None else CrossEncoder.load(path, device)


def rerank_hits(hits: Sequence[Hit], query: str, model: CrossEncoder, k: int | None = None,
                fusion_k: float | None = 60.0, batch_size: int = 16) -> tuple[list[Hit], np.ndarray]:
    """`rerank`, and the cross-encoder's relevance logit of every incoming hit (in their order)."""
    hits = list(hits)
    if not hits:
        return [], np.zeros(0, dtype=np.float32)
    logits = model.score([(query, model.passage_text(h.chunk)) for h in hits], "relevant", batch_size)
    by_model = sorted(range(len(hits)), key=lambda i: (-float(logits[i]), i))
    model_rank = {i: r for r, i in enumerate(by_model, 1)}
    if fusion_k is None:
        score = {i: float(logits[i]) for i in range(len(hits))}
    else:
        score = {i: 1.0 / (fusion_k + i + 1) + 1.0 / (fusion_k + model_rank[i]) for i in range(len(hits))}
    order = sorted(range(len(hits)), key=lambda i: (-score[i], i))
    out = []
    for place, i in enumerate(order[: len(hits) if k is None else k], 1):
        ranks = {**hits[i].ranks, "fused": i + 1, "cross_encoder": model_rank[i], "rerank": place}
        out.append(Hit(hits[i].chunk, score[i], ranks))
    return out, logits


def rerank(hits: Sequence[Hit], query: str, model: CrossEncoder, k: int | None = None,
           fusion_k: float | None = 60.0, batch_size: int = 16) -> list[Hit]:
    """`hits` (best first) reordered with the cross-encoder's relevance for `query`; the top `k`.

    Each passage is read as `CrossEncoder.passage_text` (titles, key terms, heading path,
    text: what keyword search indexed, less what the model's vocabulary cannot read).

    With `fusion_k` (default 60, the retriever's RRF constant) the new order is the
    reciprocal rank fusion of the incoming order and the cross-encoder's order,
    ``1/(fusion_k + rank_before) + 1/(fusion_k + rank_by_model)``, and that is each hit's
    new score: on the labelled handbook questions the model trained here ranks worse than
    hybrid retrieval on English questions and better on Chinese ones, and the fusion keeps
    the English figures while gaining on the Chinese ones (docs/benchmarks.md). With ``fusion_k=None`` the order is the model's
    alone and the score its logit. Ties keep the incoming order, so the result is
    deterministic. Ranks keep the lists that found a hit and add ``fused`` (its place
    before), ``cross_encoder`` (its place by the model alone) and ``rerank`` (its place now).
    """
    return rerank_hits(hits, query, model, k, fusion_k, batch_size)[0]
