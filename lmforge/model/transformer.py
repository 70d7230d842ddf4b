"""One configurable Transformer (M1-M5, M8, M9): decoders, and BERT-style encoders.

Read top to bottom: `Transformer` embeds tokens (M1), adds learned positions or rotates
q/k with RoPE (M3), runs `n_layer` pre-norm `Block`s of attention (M2, grouped-query when
n_kv_head < n_head) and a feed-forward network (M4), normalizes (M5) and projects back to
the vocabulary. Attention runs through PyTorch's fused `scaled_dot_product_attention`,
which uses a FlashAttention-style tiled kernel where the platform has one (M8). With a
`KVCache` (M9) the same forward does prefill (many tokens) and decode (one token).

Encoders are the same pieces configured differently (`ModelConfig.causal=False`, BERT):
attention sees the whole sequence except padding, token-type embeddings join the token
and position embeddings, a norm follows the embeddings, `PostNormBlock`s normalize after
each residual add, and `encode` returns the hidden states [B, T, D] (no vocabulary head).
`encode_packed` is the same computation on sequences packed end to end without padding
(see `Packing`): every per-token operation (projections, feed-forward, norms) runs on real
tokens only, and only attention sees a padded view. In CPU float32 inference its post-norm
blocks multiply by oneDNN's packed weights with the bias, GELU and residual add done as the
products write (`PostNormBlock.forward_packed`, lmforge/model/onednn.py).

Mixture of experts (M7): with `ModelConfig.num_experts > 0` each block's feed-forward is
a `MoE` (lmforge/model/moe.py): a router picks `experts_per_token` SwiGLU experts per token.
The rest of the model, the KV cache and every decode path are the same; `router_losses()`
and `expert_load()` expose the routers' auxiliary losses and token counts.

Fused projections: q, k and v come from one matrix (`attn.qkv`), and SwiGLU's gate and
up projections from one matrix (`mlp.fc`). One large matrix-vector product per step is
faster than three small ones, and checkpoint loaders split/concatenate at the boundary.

Training: in train mode with autograd on, the projections run through
`lmforge.model.onednn.linear` (oneDNN's float32 kernels, faster than MKL's for these
shapes on the CPUs we measured); everything else calls the `nn.Linear` modules as they
are. Losses read `hidden_states` and apply the vocabulary head themselves
(lmforge/train/loss.py), which lets them avoid keeping the full logits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .moe import MoE, load_balancing_loss, router_z_loss
from . import cpu_ops, fused_ops, onednn
from .onednn import project
from .rope import RotaryTable, apply_rotary


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` whose training forward (a backward will follow) is lmforge/model/fused_ops.py's
    one-function version, and whose float32 CPU forward of a decode step's rows, or in generation
    of a prompt's, is one compiled call (lmforge/model/cpu_ops.py; PyTorch's runs several passes
    over the rows: 0.17 against 0.06 ms for a 512-token prompt of the default model on a 2-core
    Xeon); everything else runs PyTorch's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_ops.wants_grad(x, self.weight):
            return fused_ops.rms_norm(x, self.weight, self.eps)
        if self.weight is not None and self.eps is not None:
            y = None
            if x.numel() <= cpu_ops.RMS_NORM_MAX_ROWS * x.shape[-1]:
                y = cpu_ops.rms_norm(x, self.weight, self.eps)  # a decode step's rows: one compiled call
            elif onednn.generation_products_on():
                # A prompt's rows in generation: one call over the threads. Scoring keeps PyTorch's
                # norm, whose values equal the training forward's bit for bit (a DPO reference
                # must score exactly as the policy it starts as).
                y = cpu_ops.rms_norm_rows(x, self.weight, self.eps)
            if y is not None:
                return y
        return super().forward(x)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


def small_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v written out, for a batched decode step on CPU.

    q [B, H, G, d] (G queries per key head), k/v [B, H, T, d], mask broadcastable to
    [B, H, G, T] (True = may attend). With so few queries PyTorch's tiled CPU kernel
    spends more time setting up than computing (~460 us a layer at B=16 against ~190 us
    for these three plain operations), and the full [B, H, G, T] score matrix is tiny.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v)


@dataclass
class Packing:
    """Where the tokens of sequences of different lengths sit when packed end to end.

    The packed stream is [N, F] with N = sum(lengths); the padded view is [B, T, F] with
    B = len(lengths) and T = max(lengths). `index` holds, for each packed token, its row in
    the flattened padded view, so packing and unpacking are one index copy each.

    Consecutive sequences of equal length form `runs`; each run is already a rectangle in
    the packed stream ([count, length, F], no copy), so attention can also run run by run
    with no padding and no mask. Sorted by length, a batch has few runs.
    """

    lengths: list[int]
    index: torch.Tensor  # [N] row of each token in the [B * T] padded layout
    positions: torch.Tensor  # [N] position of each token inside its sequence
    key_mask: torch.Tensor | None  # [B, 1, 1, T] True = a real key; None when nothing is padded
    runs: list[tuple[int, int, int]]  # (first packed token, sequences, length) of equal-length neighbours

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device | str = "cpu") -> "Packing":
        if not lengths or min(lengths) < 1:
            raise ValueError("every packed sequence needs at least one token")
        width = max(lengths)
        lens = torch.tensor(lengths, device=device)
        starts = torch.arange(len(lengths), device=device) * width
        offsets = torch.cumsum(lens, 0) - lens  # first packed token of each sequence
        row = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens)
        positions = torch.arange(int(lens.sum()), device=device) - offsets[row]
        key_mask = None
        if min(lengths) != width:
            key_mask = (torch.arange(width, device=device) < lens[:, None]).view(len(lengths), 1, 1, width)
        runs: list[tuple[int, int, int]] = []
        token = 0
        for n in lengths:
            if runs and runs[-1][2] == n:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1, n)
            else:
                runs.append((token, 1, n))
            token += n
        return cls(list(lengths), starts[row] + positions, positions, key_mask, runs)

    @property
    def width(self) -> int:
        return max(self.lengths)

    @functools.cached_property
    def offsets(self) -> torch.Tensor:
        """[B + 1] int64 on CPU: sequence b is packed rows offsets[b]:offsets[b + 1]."""
        return cpu_ops.offsets_of(self.lengths)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[N, F] -> [B, T, F], zeros at padded positions."""
        batch, width = len(self.lengths), self.width
        if self.key_mask is None:
            return x.view(batch, width, x.shape[-1])
        out = x.new_zeros(batch * width, x.shape[-1])
        return out.index_copy_(0, self.index, x).view(batch, width, x.shape[-1])

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """[B, T, F] -> [N, F], the real tokens in packed order."""
        flat = y.reshape(-1, y.shape[-1])
        return flat if self.key_mask is None else flat.index_select(0, self.index)


@dataclass
class Segment:
    """One batch of rows inside a `Transformer.forward_segments` call: its rows' rotary
    table, mask, cache rows and positions (`start` an int shared by the rows, or per-row
    positions for one-token rows), as `Attention.attend` takes them."""

    batch: int
    length: int
    rope: tuple[torch.Tensor, torch.Tensor] | None
    mask: torch.Tensor | None
    cache: KVCache
    start: int | torch.Tensor
    end: int


class Attention(nn.Module):
    # Prompts of at least this many tokens attend in bf16 inside `onednn.generation_products`
    # (set by lmforge.infer.bf16_prefill.use_bf16_prefill; None: always float32).
    bf16_min_length: int | None = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.causal = config.causal
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.sliding_window = config.sliding_window
        self.qkv = nn.Linear(config.n_embd, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.out = nn.Linear(self.q_size, config.n_embd, bias=config.out_bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
        start: int | torch.Tensor,
        end: int,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = project(self.qkv, x)
        if rope is not None and cache is None and fused_ops.wants_grad(qkv):
            # Training: one function from the projection's output to rotated q, k and v.
            q, k, v = fused_ops.rotary_qkv(qkv, *rope, self.n_head, self.n_kv_head, self.head_dim)
            causal = self.causal and mask is None and length > 1
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=self.n_head != self.n_kv_head)
            return project(self.out, y.transpose(1, 2).reshape(batch, length, self.q_size))
        y = self.attend(qkv, rope, mask, cache, layer, start, end, widen=not getattr(self.out, "reads_bf16", False))
        return self.out(y) if length == 1 else project(self.out, y)

    def attend(self, qkv: torch.Tensor, rope, mask: torch.Tensor | None, cache: KVCache | None,
               layer: int, start: int | torch.Tensor, end: int, widen: bool = True) -> torch.Tensor:
        """Attention of one batch of rows from their projected q/k/v [B, L, qkv] to [B, L, q_size],
        before the output projection; new keys/values go into `cache` (when given) first.

        In a bf16 prefill (`bf16_min_length`) q/k/v may come as the bf16 result of their product,
        and with ``widen=False`` the result stays bf16 for an output product that reads it."""
        batch, length, _ = qkv.shape
        if (batch == 1 and length == 1 and mask is None and isinstance(start, int) and end == start + 1
                and isinstance(cache, KVCache) and cache.k.dim() == 5):
            # Batch-1 decode step: rotation, cache write and attention in one compiled call
            # (lmforge/model/cpu_ops.py); None where it does not apply.
            y = cpu_ops.decode_attention(qkv, rope, cache.k[layer, 0], cache.v[layer, 0], start,
                                         self.n_head, self.n_kv_head, self.head_dim)
            if y is not None:
                return y.view(1, 1, self.q_size)
        if (batch > 1 and length == 1 and self.sliding_window is None and isinstance(cache, KVCache)
                and cache.k.dim() == 5):
            # Batched decode step, rows at their own positions: one compiled call for all rows,
            # their (row, key head, part of the keys) tasks over the threads. Without a window
            # the step's mask is the per-row causal one (keys 0..position), which is what the
            # kernel computes.
            y = cpu_ops.decode_attention_rows(qkv, rope, cache.k[layer], cache.v[layer], start,
                                              self.n_head, self.n_kv_head, self.head_dim)
            if y is not None:
                return y.view(batch, 1, self.q_size)
        bf16 = (self.bf16_min_length is not None and length >= self.bf16_min_length
                and qkv.dtype in (torch.float32, torch.bfloat16) and qkv.device.type == "cpu"
                and onednn.generation_products_on())
        if (bf16 and isinstance(start, int) and start == 0 and end == length
                and (cache is None or isinstance(cache, KVCache) and cache.k.dim() == 5)):
            # A long prompt's attention in generation, on a model prepared for bf16 prefill, where
            # the new keys are all the keys there are: rotation, cache writes and the bf16 copies
            # in one compiled pass (cpu_ops.prefill_prepare; None where it does not apply).
            prepared = cpu_ops.prefill_prepare(qkv, rope, None if cache is None else cache.k[layer],
                                               None if cache is None else cache.v[layer], 0, self.n_head,
                                               self.n_kv_head, self.head_dim)
            if prepared is not None:
                return self._bf16_attention(*prepared, mask, self.causal and mask is None, widen)
        if qkv.dtype == torch.bfloat16 and getattr(self.qkv, "bf16_output", False):
            qkv = qkv.float()  # a float32 model's bf16 prefill product: the cache and these paths are float32
        heads = qkv.view(batch, length, self.n_head + 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
        qk, v = heads.split((self.n_head + self.n_kv_head, self.n_kv_head), dim=1)
        if rope is not None:
            qk = apply_rotary(qk, *rope)  # q and k heads rotated in one pass
        q, k = qk.split((self.n_head, self.n_kv_head), dim=1)
        if cache is not None:
            k, v = cache.update(layer, k, v, start, end)
        group = self.n_head // self.n_kv_head
        if length == 1:
            # Decode step: the `group` query heads sharing a KV head become `group` queries
            # of that head, so keys/values are read in place, never repeated.
            q = q.view(batch, self.n_kv_head, group, self.head_dim)
            if batch > 1 and q.dtype == torch.float32 and q.device.type == "cpu":
                y = small_query_attention(q, k, v, mask)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return y.reshape(batch, 1, self.q_size)
        # A causal mask is needed only when several queries see a prefix of the keys.
        causal = self.causal and mask is None and length > 1
        if bf16:
            return self._bf16_attention(q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16), mask, causal,
                                        widen)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=group > 1)
        return y.transpose(1, 2).reshape(batch, length, self.q_size)

    def _bf16_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        causal: bool, widen: bool = True) -> torch.Tensor:
        """Attention of bf16 q [B, H, L, d] to bf16 k/v [B, Hkv, T, d] (PyTorch's flash kernel, float32
        softmax sums) as [B, L, q_size]: widened back to float32, or bf16 without `widen`."""
        batch, _, length, _ = q.shape
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(torch.bfloat16)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_head > self.n_kv_head)
        dtype = torch.float32 if widen else torch.bfloat16
        out = y.new_empty((batch, length, y.shape[1], y.shape[3]), dtype=dtype)
        return out.copy_(y.transpose(1, 2)).view(batch, length, self.q_size)  # (widened) as it is laid out

    def forward_segments(self, x: torch.Tensor, segments: list["Segment"], layer: int) -> torch.Tensor:
        """`forward` for several batches whose rows are concatenated in x [1, N, D] (see
        `Transformer.forward_segments`): one q/k/v product and one output product for all
        of them, attention segment by segment, each with its own cache rows and positions."""
        qkv = project(self.qkv, x)[0]
        outputs, row = [], 0
        for seg in segments:
            rows = seg.batch * seg.length
            part = qkv[row: row + rows].view(seg.batch, seg.length, -1)
            y = self.attend(part, seg.rope, seg.mask, seg.cache, layer, seg.start, seg.end)
            outputs.append(y.reshape(rows, self.q_size))
            row += rows
        return project(self.out, torch.cat(outputs).unsqueeze(0))

    def attend_packed(self, x: torch.Tensor, packing: Packing, rope: tuple[torch.Tensor, torch.Tensor] | None,
                      mask: torch.Tensor | None, qkv: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of packed tokens x [N, D], before the output projection: [N, q_size].

        q, k and v come from one product over the real tokens (or are given as `qkv`); only
        the attention itself runs on the padded view, with `mask` hiding padded keys (and,
        for a causal model, later ones).
        """
        if qkv is None:
            qkv = self.qkv(x)
        if rope is None and (mask is None or mask.dim() == 4 and mask.shape[2] == 1):
            # Learned positions, no grad: one compiled call over every (sequence, head) pair,
            # reading q/k/v from the rows of the product (lmforge/model/cpu_ops.py).
            y = cpu_ops.varlen_attention(qkv, packing.offsets, self.n_head, self.n_kv_head, self.head_dim,
                                         causal=self.causal)
            if y is not None:
                return y
        if len(packing.runs) <= self.max_attention_runs and (mask is None or mask.dim() == 4 and mask.shape[2] == 1):
            # Run by run: each run of equal-length sequences is a rectangle already; only
            # the causal structure (not padding) needs masking there.
            if len(packing.runs) == 1:
                return self._attend(qkv, packing.runs[0][1], packing.runs[0][2], rope, None)
            out = qkv.new_empty(qkv.shape[0], self.q_size)
            for start, count, length in packing.runs:
                stop = start + count * length
                self._attend(qkv[start:stop], count, length, rope, None, out=out[start:stop])
            return out
        return packing.unpad(self._attend(packing.pad(qkv), len(packing.lengths), packing.width, rope, mask))

    # Above this many runs of equal lengths in a packed batch, one padded attention call is
    # cheaper than a call per run.
    max_attention_runs = 8

    def _attend(self, qkv: torch.Tensor, batch: int, width: int, rope, mask: torch.Tensor | None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over `batch` rows of `width` tokens whose q/k/v are rows of `qkv`: [batch * width, q_size]
        (written into `out` when given, saving a copy)."""
        heads = qkv.view(batch, width, self.n_head + 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
        qk, v = heads.split((self.n_head + self.n_kv_head, self.n_kv_head), dim=1)
        if rope is not None:
            qk = apply_rotary(qk, rope[0][:, :, :width], rope[1][:, :, :width])
        q, k = qk.split((self.n_head, self.n_kv_head), dim=1)
        causal = self.causal and mask is None and width > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_head != self.n_kv_head)
        if out is not None:
            return out.view(batch, width, self.n_head, self.head_dim).copy_(y.transpose(1, 2)).view(out.shape)
        return y.transpose(1, 2).reshape(batch * width, self.q_size)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        width = 2 * config.intermediate_size if self.swiglu else config.intermediate_size
        self.fc = nn.Linear(config.n_embd, width, bias=config.mlp_bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.mlp_bias)
        self.gelu_approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = project(self.fc, x)
        if self.swiglu and fused_ops.wants_grad(h):
            h = fused_ops.swiglu(h)  # training: one function, no chunk/cat in the backward
        elif self.swiglu:
            fused = cpu_ops.silu_mul_bf16(h) if h.dtype == torch.bfloat16 else None  # bf16 prefill: one pass
            if fused is not None:
                h = fused
            else:
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.gelu_approximate)
        if h.dtype != x.dtype and not getattr(self.proj, "reads_bf16", False):
            h = h.to(x.dtype)  # a bf16 first product (bf16 prefill) before a layer that wants x's dtype
        return project(self.proj, h)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = MoE(config) if config.num_experts else MLP(config)

    def forward(self, x, rope, mask, cache, layer, start, end):
        x = x + self.attn(self.attn_norm(x), rope, mask, cache, layer, start, end)
        return x + self.mlp(self.mlp_norm(x))

    def forward_segments(self, x: torch.Tensor, segments: list[Segment], layer: int) -> torch.Tensor:
        """`forward` on the rows of several segments concatenated in x [1, N, D]."""
        x = x + self.attn.forward_segments(self.attn_norm(x), segments, layer)
        return x + self.mlp(self.mlp_norm(x))

    def forward_packed(self, x: torch.Tensor, packing: Packing, rope, mask) -> torch.Tensor:
        """`forward` on packed tokens x [N, D] (see `Packing`)."""
        x = x + self.attn.out(self.attn.attend_packed(self.attn_norm(x), packing, rope, mask))
        return x + self.mlp(self.mlp_norm(x))


class PostNormBlock(Block):
    """Post-norm residual block (BERT, the original Transformer): norm(x + attn(x)), then
    norm(x + mlp(x)). Same parameters as `Block`; only the order differs. Every sublayer's
    output passes through a norm, so the stream needs no final norm."""

    def forward(self, x, rope, mask, cache, layer, start, end):
        x = self.attn_norm(x + self.attn(x, rope, mask, cache, layer, start, end))
        return self.mlp_norm(x + self.mlp(x))

    def forward_segments(self, x: torch.Tensor, segments: list[Segment], layer: int) -> torch.Tensor:
        x = self.attn_norm(x + self.attn.forward_segments(x, segments, layer))
        return self.mlp_norm(x + self.mlp(x))

    def forward_packed(self, x: torch.Tensor, packing: Packing, rope, mask) -> torch.Tensor:
        """`forward` on packed tokens x [N, D] (see `Packing`).

        CPU float32 inference takes the fused path: each product reads its weight from
        oneDNN's packed copy and applies its bias, the GELU or the residual add while
        writing its results (`onednn.packed_*`), so the only passes over the activations
        outside the products are attention and the two norms.
        """
        attn, mlp = self.attn, self.mlp
        if isinstance(mlp, MLP) and not mlp.swiglu and onednn.packed_usable(x, attn.qkv, attn.out, mlp.fc, mlp.proj):
            qkv = onednn.packed_linear(attn.qkv, x)
            y = attn.attend_packed(x, packing, rope, mask, qkv=qkv)
            x = self.attn_norm(onednn.packed_linear_add(attn.out, y, x))
            h = onednn.packed_linear_gelu(mlp.fc, x, mlp.gelu_approximate)
            return self.mlp_norm(onednn.packed_linear_add(mlp.proj, h, x))
        x = self.attn_norm(x + self.attn.out(self.attn.attend_packed(x, packing, rope, mask)))
        return self.mlp_norm(x + self.mlp(x))


class Transformer(nn.Module):
    """Language model (`forward`: token ids [B, L] -> logits [B, L, V]) or encoder
    (`encode`: ids, attention mask, token types -> hidden states [B, L, D])."""

    # A callable (model, ids [B, 1], cache, start) -> logits [B, 1, V] or None that may run a cached
    # one-token step of this model in its place (start: an int, or a tensor [B] of per-row
    # positions); inference code installs one for CPU decoding (lmforge/infer/decode_kernels.py).
    # None: every forward runs the modules.
    decode_step = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.type_embed = nn.Embedding(config.type_vocab_size, config.n_embd) if config.type_vocab_size else None
        self.embed_norm = make_norm(config) if config.embedding_norm else None
        if config.position == "learned":
            self.pos_embed = nn.Embedding(config.max_position_embeddings, config.n_embd)
            self.rope = None
        else:
            self.rope = RotaryTable(
                config.head_dim, config.rope_theta, config.rope_scaling, min(config.max_position_embeddings, 4096)
            )
        block = Block if config.norm_position == "pre" else PostNormBlock
        self.layers = nn.ModuleList(block(config) for _ in range(config.n_layer))
        # Post-norm blocks end in a norm already; Identity keeps the code paths the same.
        self.norm = make_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False) if config.lm_head else None
        # Activation (gradient) checkpointing: when True, training forwards keep only each
        # block's input and recompute the block during backward (less memory, ~1/3 more compute).
        self.gradient_checkpointing = False
        if config.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.embed.weight
        if not self.embed.weight.is_meta:  # checkpoint loaders build on "meta" and assign real weights
            self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
        last_only: bool = False,
        select: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for `input_ids` [B, L].

        Without a cache, positions are start..start+L-1 and attention is causal. With a
        cache, the new keys/values are written at those positions first and the queries
        attend to everything cached before them. `start` may be a tensor of per-row
        positions for a one-token decode step of rows of different lengths.
        `last_only` computes logits for the final position only (what sampling needs);
        `select` [B] instead picks one position per row, e.g. the last real token of each
        right-padded prompt in a batched prefill. Either way the result is [B, 1, V].
        `inputs_embeds` [B, L, n_embd] replaces the token embeddings (`input_ids` is then
        None): a vision-language model feeds projected image features as a prefix this way.
        """
        if self.lm_head is None:
            raise ValueError("this model has no vocabulary head (an encoder); use encode() for its hidden states")
        if (self.decode_step is not None and inputs_embeds is None and select is None and cache is not None
                and input_ids.dim() == 2 and input_ids.shape[1] == 1):
            logits = self.decode_step(self, input_ids, cache, start)  # [B, 1, V], or None: not this step
            if logits is not None:
                return logits
        x = self._residual_stream(input_ids, cache, start, inputs_embeds)
        if select is not None:
            x = x[torch.arange(x.shape[0], device=x.device), select].unsqueeze(1)
        elif last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    def hidden_states(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final normalized hidden states [B, L, n_embd]: what `lm_head` turns into logits.

        Training losses take these instead of logits so that they can run the vocabulary
        projection themselves, in chunks (see lmforge/train/fused_ce.py); `forward(ids)`
        equals `lm_head(hidden_states(ids))`. `inputs_embeds` as in `forward`.
        """
        return self.norm(self._residual_stream(input_ids, None, 0, inputs_embeds))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, L, n_embd] of right-padded `input_ids` [B, L].

        `attention_mask` [B, L] is 1 for real tokens and 0 for padding (None: no padding);
        padded keys are hidden from every query. `token_type_ids` [B, L] pick rows of the
        token-type table (None: all zeros, a single segment). An encoder's queries see the
        whole sequence; a decoder's see their prefix, so this also gives a causal model's
        hidden states for padded batches. Rows at padded positions hold values that mean
        nothing; poolers must mask them out.
        """
        batch, length = input_ids.shape
        config = self.config
        if length > config.max_position_embeddings and config.position == "learned":
            raise ValueError(f"sequence of {length} tokens exceeds the {config.max_position_embeddings} learned positions")
        x = self.embed(input_ids)
        rope = None
        if self.rope is None:
            x = x + self.pos_embed.weight[:length]
        else:
            rope = self.rope.slice(0, length, x.dtype)
        if self.type_embed is not None:
            x = x + (self.type_embed.weight[0] if token_type_ids is None else self.type_embed(token_type_ids))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool().view(batch, 1, 1, length)
        if config.causal and (mask is not None or config.sliding_window is not None):
            # (Without padding or a window, the attention's own causal flag is exact.)
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            if config.sliding_window is not None:
                causal &= torch.ones_like(causal).triu(1 - config.sliding_window)
            mask = causal if mask is None else mask & causal
        for i, block in enumerate(self.layers):
            x = block(x, rope, mask, None, i, 0, length)
        return self.norm(x)

    def encode_packed(self, input_ids: torch.Tensor, lengths: list[int],
                      token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`encode` for sequences packed end to end: ids [N] (N = sum(lengths)) -> [N, n_embd].

        Equal to `encode` on the right-padded batch at every real token, without computing
        anything for padding outside attention (see `Packing`).
        """
        config = self.config
        if int(input_ids.numel()) != sum(lengths):
            raise ValueError(f"{input_ids.numel()} packed ids for lengths summing to {sum(lengths)}")
        packing = Packing.from_lengths(lengths, input_ids.device)
        width = packing.width
        if width > config.max_position_embeddings and config.position == "learned":
            raise ValueError(f"sequence of {width} tokens exceeds the {config.max_position_embeddings} learned positions")
        x = self.embed(input_ids)
        rope = None
        if self.rope is None:
            x = x + self.pos_embed(packing.positions)
        else:
            rope = self.rope.slice(0, width, x.dtype)
        if self.type_embed is not None:
            x = x + (self.type_embed.weight[0] if token_type_ids is None else self.type_embed(token_type_ids))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        mask = packing.key_mask
        if config.causal and (mask is not None or config.sliding_window is not None):
            causal = torch.ones(width, width, dtype=torch.bool, device=x.device).tril()
            if config.sliding_window is not None:
                causal &= torch.ones_like(causal).triu(1 - config.sliding_window)
            mask = causal if mask is None else mask & causal
        for block in self.layers:
            x = block.forward_packed(x, packing, rope, mask)
        return self.norm(x)

    def _residual_stream(self, input_ids: torch.Tensor | None, cache: KVCache | None,
                         start: int | torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings (looked up, or `inputs_embeds` [B, L, D] given) through every block: the last
        residual stream, before the final norm."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        batch, length = input_ids.shape if inputs_embeds is None else inputs_embeds.shape[:2]
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        x, seg = self._segment(x, batch, length, cache, start)
        rope, mask, end = seg.rope, seg.mask, seg.end

        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, cache, i, start, end, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, i, start, end)
        return x

    def _segment(self, x: torch.Tensor, batch: int, length: int, cache: KVCache | None,
                 start: int | torch.Tensor) -> tuple[torch.Tensor, Segment]:
        """Checks positions, adds learned position embeddings to x [B, L, D], and returns the
        rows' rotary table, attention mask and end position as a `Segment`."""
        per_row = isinstance(start, torch.Tensor)
        if per_row and length != 1:
            raise ValueError("per-row start positions need exactly one new token per row")
        end = (int(start.max()) if per_row else start) + length
        if cache is not None and end > cache.max_len:
            raise ValueError(f"sequence of {end} tokens does not fit the cache of {cache.max_len}")
        if end > self.config.max_position_embeddings and self.config.position == "learned":
            raise ValueError(f"sequence of {end} tokens exceeds the {self.config.max_position_embeddings} learned positions")
        if per_row:
            positions = start.view(batch, 1)
        else:
            positions = torch.arange(start, end, device=x.device).unsqueeze(0)
        if self.rope is None:
            x = x + self.pos_embed(positions)
            rope = None
        elif per_row:
            rope = self.rope(positions, x.dtype)
        else:
            rope = self.rope.slice(start, length, x.dtype)
        cached = cache is not None
        mask = self._attention_mask(positions, cached, end if cached else length)
        return x, Segment(batch, length, rope, mask, cache, start, end)

    def forward_segments(self, segments: list[tuple[torch.Tensor, KVCache, int | torch.Tensor]]) -> list[torch.Tensor]:
        """One forward for several cached batches: logits [B_i, V] of each one's last position.

        Each segment is (ids [B_i, L_i], its cache rows, start) as `forward` takes them with a
        cache, e.g. the one-token rows of a decode step and the next chunk of a long prompt.
        Their rows are concatenated so that every weight is read once for all of them (a
        decode step at small batch is bound by reading the weights, so the chunk's products
        come almost free); only attention runs segment by segment, on each one's own cache
        rows. Equal to calling `forward(ids, cache, start, last_only=True)` on each segment
        in turn, up to the rounding of products over a different number of rows.
        """
        if self.lm_head is None:
            raise ValueError("this model has no vocabulary head (an encoder); use encode() for its hidden states")
        streams, segs = [], []
        for ids, cache, start in segments:
            batch, length = ids.shape
            x, seg = self._segment(self.embed(ids), batch, length, cache, start)
            streams.append(x.reshape(batch * length, -1))
            segs.append(seg)
        x = torch.cat(streams).unsqueeze(0)
        for i, block in enumerate(self.layers):
            x = block.forward_segments(x, segs, i)
        last, row = [], 0
        for seg in segs:  # the last position of every row of every segment
            last.append(torch.arange(seg.batch, device=x.device) * seg.length + (row + seg.length - 1))
            row += seg.batch * seg.length
        logits = self.lm_head(self.norm(x[0, torch.cat(last)]))
        return list(logits.split([seg.batch for seg in segs]))

    def _attention_mask(self, positions: torch.Tensor, cached: bool, n_keys: int) -> torch.Tensor | None:
        """Boolean [B|1, 1, L, n_keys] mask, or None where SDPA's causal flag (or no mask) is exact.

        Queries sit at `positions` [B|1, L]. Cached keys sit at 0..n_keys-1; without a
        cache the keys are the queries themselves.
        """
        window = self.config.sliding_window
        batch, length = positions.shape
        if window is None or n_keys <= window:
            if n_keys == length:
                return None  # keys are exactly the queries: is_causal
            if length == 1 and batch == 1:
                return None  # one query at the newest position sees every cached key
        key_pos = torch.arange(n_keys, device=positions.device) if cached else positions[0]
        query_pos = positions.unsqueeze(-1)  # [B, L, 1]
        allowed = key_pos <= query_pos
        if window is not None:
            allowed = allowed & (key_pos > query_pos - window)
        return allowed.unsqueeze(1)

    def moe_layers(self) -> list[MoE]:
        return [block.mlp for block in self.layers if isinstance(block.mlp, MoE)]

    def router_losses(self) -> dict[str, torch.Tensor]:
        """The routers' auxiliary losses over the last forward (empty for a dense model):
        "router_aux" (load balancing) and "router_z", unweighted, and "router_loss", their sum
        weighted by the config's coefficients (what training adds to the token loss)."""
        layers = self.moe_layers()
        logits = [m.router_logits for m in layers if m.router_logits is not None]
        if not logits:
            return {}
        aux = load_balancing_loss(logits, self.config.experts_per_token, self.config.router_aux_per_layer)
        z = router_z_loss(logits)
        total = self.config.router_aux_loss_coef * aux + self.config.router_z_loss_coef * z
        return {"router_aux": aux, "router_z": z, "router_loss": total}

    def expert_load(self, reset: bool = False) -> torch.Tensor:
        """Tokens routed to each expert [n_moe_layers, num_experts], summed over every forward
        since the last reset (`reset=True` clears the counts after reading them)."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, 0, dtype=torch.long)
        load = torch.stack([m.tokens_per_expert.clone() for m in layers])
        if reset:
            for m in layers:
                m.reset_statistics()
        return load

    def num_parameters(self) -> int:
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total
