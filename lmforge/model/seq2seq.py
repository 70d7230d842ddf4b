"""Encoder-decoder Transformers (M6, M3): T5-style and Marian/BART-style seq2seq models.

An encoder reads the whole source with bidirectional attention; a decoder writes the
target one token at a time with causal self-attention plus *cross-attention*: its queries
come from the target stream, its keys and values from the encoder's output. The source is
encoded once per sequence, and each decoder layer projects that output to cross keys and
values once (`CrossCache`); only the decoder's self-attention cache grows while decoding.

The two families differ only in configuration (`Seq2SeqConfig`):

- T5 (`family="t5"`): no absolute positions; each attention layer adds a learned bias per
  head indexed by the *bucketed* key-query distance (`relative_position_bucket`), one table
  per stack, shared by its layers. RMSNorm without bias before each sublayer, one final norm
  per stack, linear layers without bias, no 1/sqrt(d) scaling of attention scores, ReLU or
  gated-GELU feed-forward, and (original T5) a tied output head applied to hidden * d**-0.5.
- Marian / BART (`family="marian"`): sinusoidal (Marian) or learned absolute positions,
  embeddings multiplied by sqrt(d) (``scale_embedding``), post-norm LayerNorm blocks with
  biases everywhere, scaled attention, and a ``final_logits_bias`` added to the logits.

Building blocks shared with the decoder-only model come from transformer.py (its RMSNorm)
and kv_cache.py (`KVCache` for the decoder's self-attention); checkpoint I/O in the Hugging
Face layout is in seq2seq_io.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import KVCache
from .transformer import RMSNorm, Transformer

FAMILIES = ("t5", "marian")
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")
POSITIONS = ("relative", "sinusoidal", "learned")


@dataclass
class Seq2SeqConfig:
    """Shape and behaviour of an encoder-decoder model. The defaults are a tiny Marian-style
    model (post-norm, sinusoidal positions), so `Seq2SeqConfig()` builds in milliseconds."""

    family: str = "marian"
    vocab_size: int = 256
    n_layer: int = 2  # encoder layers
    n_decoder_layer: int | None = None  # None: as many as the encoder
    n_embd: int = 64
    n_head: int = 4
    head_dim: int | None = None  # None: n_embd // n_head (T5 calls it d_kv and lets it differ)
    intermediate_size: int = 256
    max_position_embeddings: int = 512  # absolute positions only
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_position: str = "post"  # post: norm(x + f(x)); pre: x + f(norm(x)) and one final norm per stack
    activation: str = "silu"  # relu | gelu | gelu_new (tanh approximation) | silu (Marian's "swish")
    gated_mlp: bool = False  # T5 v1.1: act(x W0) * (x W1), then W_out
    position: str = "sinusoidal"  # relative (T5 buckets) | sinusoidal | learned
    relative_buckets: int = 32
    relative_max_distance: int = 128
    attention_scale: bool = True  # False: no 1/sqrt(d) on the scores (T5 folds it into its init)
    bias: bool = True  # biases on every linear layer (Marian, BART); T5 has none
    scale_embedding: bool = False  # multiply token embeddings by sqrt(n_embd)
    embedding_norm: bool = False  # a norm after the embeddings (BART's layernorm_embedding)
    tie_word_embeddings: bool = True  # the output head is the embedding matrix
    scale_decoder_outputs: bool = False  # T5 with a tied head: logits from hidden * n_embd**-0.5
    final_logits_bias: bool = False  # a learned bias on the logits (Marian)
    dropout: float = 0.0  # on each sublayer's output and the embeddings, in training only
    pad_token_id: int | None = 0
    eos_token_id: int | None = 1
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = 0  # the first decoder input (T5 and Marian use the pad id)
    extra: dict[str, Any] = field(default_factory=dict)  # unused HF keys, preserved on save

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        for name, value, allowed in (("norm", self.norm, ("layernorm", "rmsnorm")),
                                     ("norm_position", self.norm_position, ("pre", "post")),
                                     ("activation", self.activation, ACTIVATIONS),
                                     ("position", self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    # The names the decoder-only tooling reads (KV cache sizing, FLOPs estimates, reports).
    @property
    def n_kv_head(self) -> int:
        return self.n_head

    @property
    def q_size(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.q_size

    @property
    def is_encoder_decoder(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Seq2SeqConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown Seq2SeqConfig fields: {', '.join(unknown)}")
        return cls(**data)

    def num_parameters(self) -> int:
        """Parameters from the shapes alone (tied head counted once), = `Seq2SeqLM.num_parameters()`."""
        d, f, q = self.n_embd, self.intermediate_size, self.q_size
        b = 1 if self.bias else 0
        norm = d * (2 if self.norm == "layernorm" else 1)
        attn = 4 * d * q + b * (3 * q + d)
        mlp = d * f * (2 if self.gated_mlp else 1) + f * d + b * (f * (2 if self.gated_mlp else 1) + d)
        total = self.vocab_size * d
        total += self.n_layer * (attn + mlp + 2 * norm)
        total += self.n_decoder_layer * (2 * attn + mlp + 3 * norm)
        if self.norm_position == "pre":
            total += 2 * norm
        if self.embedding_norm:
            total += 2 * norm
        if self.position == "relative":
            total += 2 * self.relative_buckets * self.n_head
        elif self.position == "learned":
            total += 2 * self.max_position_embeddings * d
        if not self.tie_word_embeddings:
            total += self.vocab_size * d
        if self.final_logits_bias:
            total += self.vocab_size
        return total


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each key-minus-query distance.

    Half the buckets (per direction, when bidirectional) hold exact small distances; the
    rest cover distances up to `max_distance` on a log scale, and anything further shares
    the last bucket. A decoder only looks back, so it spends every bucket on the past.
    """
    out = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        out = out + (relative > 0).long() * buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = buckets // 2
    is_small = distance < exact
    # log(0) for the small distances is discarded by the where() below
    far = exact + (torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                   * (buckets - exact)).long()
    far = far.clamp(max=buckets - 1)
    return out + torch.where(is_small, distance, far)


def sinusoidal_table(positions: int, dim: int) -> torch.Tensor:
    """[positions, dim]: sin(p w_i) in the first half of each row, cos(p w_i) in the second,
    w_i = 10000^(-2i/dim) (Marian's layout; the original Transformer interleaves them)."""
    half = (dim + 1) // 2
    freqs = torch.pow(10000.0, -2.0 * torch.arange(half, dtype=torch.float64) / dim)
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * freqs[None, :]
    table = torch.empty(positions, dim, dtype=torch.float64)
    table[:, :half] = angles.sin()
    table[:, half:] = angles[:, :dim - half].cos()
    return table.float()


def _make_norm(config: Seq2SeqConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


def _activate(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return F.relu(x)
    if name == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if name == "gelu_new" else "none")


@dataclass
class CrossCache:
    """The encoder output projected to each decoder layer's cross-attention keys and values
    ([layers, B, H, S, d] each), computed once per source; `key_mask` [B, 1, 1, S] is True at
    real source tokens (None: no padding)."""

    k: torch.Tensor
    v: torch.Tensor
    key_mask: torch.Tensor | None

    def select(self, index: torch.Tensor) -> "CrossCache":
        """Rows `index` (e.g. each source repeated once per beam)."""
        mask = None if self.key_mask is None else self.key_mask.index_select(0, index)
        return CrossCache(self.k.index_select(1, index), self.v.index_select(1, index), mask)


class Seq2SeqAttention(nn.Module):
    """Multi-head attention whose queries and keys may come from different streams.

    Self-attention projects q, k and v with one fused matrix (`qkv`); cross-attention
    projects q from the decoder (`q`) and k, v from the encoder output (`kv`, once).
    `bias` is an additive float tensor broadcastable to [B, H, Lq, Lk] (relative position
    bias and masks, -inf where a key is hidden) or None.
    """

    def __init__(self, config: Seq2SeqConfig, cross: bool) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.q_size = config.n_head, config.head_dim, config.q_size
        self.scale = config.head_dim ** -0.5 if config.attention_scale else 1.0
        self.cross = cross
        if cross:
            self.q = nn.Linear(config.n_embd, self.q_size, bias=config.bias)
            self.kv = nn.Linear(config.n_embd, 2 * self.q_size, bias=config.bias)
        else:
            self.qkv = nn.Linear(config.n_embd, 3 * self.q_size, bias=config.bias)
        self.out = nn.Linear(self.q_size, config.n_embd, bias=config.bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, n, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross keys and values [B, H, S, d] of the encoder output `memory` [B, S, D]."""
        k, v = self._heads(self.kv(memory), 2)
        return k, v

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, cache: KVCache | None = None, layer: int = 0,
                start: int = 0, memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        if self.cross:
            q = self._heads(self.q(x), 1)[0]
            k, v = memory_kv
        else:
            q, k, v = self._heads(self.qkv(x), 3)
            if cache is not None:
                k, v = cache.update(layer, k, v, start, start + length)
        if bias is not None and bias.dtype != q.dtype:
            bias = bias.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.out(y.transpose(1, 2).reshape(batch, length, self.q_size))


class FeedForward(nn.Module):
    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.gated, self.activation = config.gated_mlp, config.activation
        width = config.intermediate_size * (2 if self.gated else 1)
        self.fc = nn.Linear(config.n_embd, width, bias=config.bias)  # gated: activation rows, then linear rows
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = _activate(gate, self.activation) * up
        else:
            h = _activate(h, self.activation)
        return self.proj(h)


class Seq2SeqLayer(nn.Module):
    """An encoder layer (self-attention, feed-forward) or a decoder layer (causal
    self-attention, cross-attention, feed-forward), pre- or post-norm."""

    def __init__(self, config: Seq2SeqConfig, decoder: bool) -> None:
        super().__init__()
        self.pre = config.norm_position == "pre"
        self.dropout = config.dropout
        self.self_attn = Seq2SeqAttention(config, cross=False)
        self.self_norm = _make_norm(config)
        self.cross_attn = Seq2SeqAttention(config, cross=True) if decoder else None
        self.cross_norm = _make_norm(config) if decoder else None
        self.mlp = FeedForward(config)
        self.mlp_norm = _make_norm(config)

    def _residual(self, x: torch.Tensor, norm: nn.Module, sublayer) -> torch.Tensor:
        if self.pre:
            return x + F.dropout(sublayer(norm(x)), self.dropout, self.training)
        return norm(x + F.dropout(sublayer(x), self.dropout, self.training))

    def forward(self, x: torch.Tensor, self_bias: torch.Tensor | None, cache: KVCache | None = None, layer: int = 0,
                start: int = 0, memory_kv=None, cross_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = self._residual(x, self.self_norm, lambda h: self.self_attn(h, self_bias, cache, layer, start))
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_norm, lambda h: self.cross_attn(h, cross_bias, memory_kv=memory_kv))
        return self._residual(x, self.mlp_norm, self.mlp)


class Seq2SeqStack(nn.Module):
    """The encoder or the decoder: layers, their position scheme and (pre-norm) final norm.
    The token embedding is the model's, shared by both stacks."""

    def __init__(self, config: Seq2SeqConfig, decoder: bool) -> None:
        super().__init__()
        self.config, self.decoder = config, decoder
        n = config.n_decoder_layer if decoder else config.n_layer
        self.layers = nn.ModuleList(Seq2SeqLayer(config, decoder) for _ in range(n))
        self.relative_bias = (nn.Embedding(config.relative_buckets, config.n_head)
                              if config.position == "relative" else None)
        self.pos_embed = (nn.Embedding(config.max_position_embeddings, config.n_embd)
                          if config.position == "learned" else None)
        self.embed_norm = _make_norm(config) if config.embedding_norm else None
        self.final_norm = _make_norm(config) if config.norm_position == "pre" else None

    def position_bias(self, query_start: int, length: int, n_keys: int, device) -> torch.Tensor:
        """[1, H, length, n_keys] learned bias of the bucketed key-query distances (T5)."""
        queries = torch.arange(query_start, query_start + length, device=device)[:, None]
        keys = torch.arange(n_keys, device=device)[None, :]
        buckets = relative_position_bucket(keys - queries, not self.decoder, self.config.relative_buckets,
                                           self.config.relative_max_distance)
        return self.relative_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def embed_positions(self, x: torch.Tensor, start: int, sinusoids: torch.Tensor | None) -> torch.Tensor:
        length = x.shape[1]
        if start + length > self.config.max_position_embeddings and self.config.position != "relative":
            raise ValueError(f"sequence of {start + length} tokens exceeds the "
                             f"{self.config.max_position_embeddings} positions of this model")
        if self.pos_embed is not None:
            x = x + self.pos_embed.weight[start:start + length]
        elif sinusoids is not None:
            x = x + sinusoids[start:start + length].to(x.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return F.dropout(x, self.config.dropout, self.training)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The stack's output: pre-norm stacks end in a norm (and T5's dropout); post-norm ones already did."""
        if self.final_norm is None:
            return x
        return F.dropout(self.final_norm(x), self.config.dropout, self.training)


def _padding_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """[B, 1, 1, S] additive bias: 0 at real tokens, -inf at padding (None: no padding)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    hidden = ~attention_mask.bool()
    return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(hidden, float("-inf"))[:, None, None]


class Seq2SeqLM(nn.Module):
    """Encoder-decoder language model: `forward(input_ids, decoder_input_ids)` -> logits
    [B, T, V]; for generation `encode` once, `cross_cache` once, then `decode` step by step."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.encoder = Seq2SeqStack(config, decoder=False)
        self.decoder = Seq2SeqStack(config, decoder=True)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.final_logits_bias = nn.Parameter(torch.zeros(config.vocab_size)) if config.final_logits_bias else None
        self.register_buffer("sinusoids", sinusoidal_table(config.max_position_embeddings, config.n_embd)
                             if config.position == "sinusoidal" else None, persistent=False)
        self.embed_scale = math.sqrt(config.n_embd) if config.scale_embedding else 1.0
        self.gradient_checkpointing = False  # read by the training loop; not used here
        if not self.embed.weight.is_meta:
            self.apply(self._init_weights)

    _init_weights = Transformer._init_weights  # the same initialization as the decoder-only model

    # -- encoder -------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output [B, S, D] of right-padded source ids [B, S] (mask: 1 = real token)."""
        stack = self.encoder
        x = stack.embed_positions(self.embed(input_ids) * self.embed_scale, 0, self.sinusoids)
        bias = _padding_bias(attention_mask, x.dtype)
        if stack.relative_bias is not None:
            rel = stack.position_bias(0, input_ids.shape[1], input_ids.shape[1], x.device).to(x.dtype)
            bias = rel if bias is None else rel + bias
        for layer in stack.layers:
            x = layer(x, bias)
        return stack.finish(x)

    def cross_cache(self, memory: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CrossCache:
        """Each decoder layer's cross keys/values of the encoder output, computed once."""
        ks, vs = zip(*(layer.cross_attn.project_kv(memory) for layer in self.decoder.layers))
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()[:, None, None]
        return CrossCache(torch.stack(ks), torch.stack(vs), mask)

    # -- decoder -------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        """An empty self-attention cache for the decoder."""
        weight = self.embed.weight
        c = self.config
        return KVCache(c.n_decoder_layer, batch, max_len, c.n_head, c.head_dim, dtype or weight.dtype,
                       device or weight.device)

    def decode(self, decoder_input_ids: torch.Tensor, cross: CrossCache, cache: KVCache | None = None,
               start: int = 0, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] for target ids at positions start..start+T-1.

        Without a cache the ids are the whole target prefix (start must be 0); with one, the
        new keys/values are written at those positions and the queries see everything before.
        """
        stack = self.decoder
        batch, length = decoder_input_ids.shape
        if cache is None and start:
            raise ValueError("decoding from a nonzero start needs the cache of the earlier positions")
        end = start + length
        if cache is not None and end > cache.max_len:
            raise ValueError(f"sequence of {end} tokens does not fit the cache of {cache.max_len}")
        x = stack.embed_positions(self.embed(decoder_input_ids) * self.embed_scale, start, self.sinusoids)
        keys = torch.arange(end, device=x.device)
        queries = torch.arange(start, end, device=x.device)[:, None]
        self_bias = torch.zeros(length, end, dtype=x.dtype, device=x.device)
        self_bias.masked_fill_(keys[None, :] > queries, float("-inf"))
        self_bias = self_bias[None, None]
        if stack.relative_bias is not None:
            self_bias = self_bias + stack.position_bias(start, length, end, x.device).to(x.dtype)
        cross_bias = None
        if cross.key_mask is not None:
            cross_bias = torch.zeros(cross.key_mask.shape, dtype=x.dtype, device=x.device)
            cross_bias.masked_fill_(~cross.key_mask, float("-inf"))
        for i, layer in enumerate(stack.layers):
            x = layer(x, self_bias, cache, i, start, (cross.k[i], cross.v[i]), cross_bias)
        x = stack.finish(x)
        if last_only:
            x = x[:, -1:]
        if self.config.scale_decoder_outputs:
            x = x * self.config.n_embd ** -0.5
        logits = self.lm_head(x)
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias
        return logits

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] of the targets given the sources."""
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, self.cross_cache(memory, attention_mask))

    def shift_right(self, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Decoder inputs for `labels` [B, T]: the start token, then labels[:, :-1] (ignored
        positions read as padding)."""
        start = self.config.decoder_start_token_id
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        out = labels.new_full(labels.shape, pad)
        out[:, 0] = start if start is not None else pad
        out[:, 1:] = labels[:, :-1]
        return out.masked_fill_(out == ignore_index, pad)

    def num_parameters(self) -> int:
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total
