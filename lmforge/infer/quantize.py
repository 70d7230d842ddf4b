"""Weight quantization onto GGUF's block grids (I4): round to nearest, GPTQ and AWQ.

Every method ends on exactly the grid the file stores, so the GGUF file holds the weights
the method chose, not a second rounding of them:

    Q4_0  blocks of 32 weights along a row, one float16 scale d: w = d * (q - 8), q in 0..15
    Q8_0  blocks of 32 weights along a row, one float16 scale d: w = d * q,       q in -127..127

- **rtn** rounds each weight to the nearest grid point, with the block scale llama.cpp's
  quantizer picks (Q4_0: the block's value of largest magnitude maps to q = 0; Q8_0:
  max|w| / 127). It gives the same bytes as ``lmforge export gguf --type q4_0|q8_0``.
- **gptq** (lmforge/infer/gptq.py) rounds one input column at a time and moves each
  rounding error onto the columns not yet rounded, weighted by the inverse Hessian of the
  layer's squared output error on calibration activations.
- **awq** (lmforge/infer/awq.py) scales the input channels that carry large activations up
  before rounding (and their inputs down, folded into the preceding norm or linear layer),
  then rounds to nearest.

GPTQ and AWQ see calibration activations block by block: the blocks already quantized feed
the next one, so each block corrects for the errors made before it. The vocabulary head (or
the tied embedding) is rounded to Q8_0 as `write_gguf` stores it in a 4-bit file; every
other matrix whose rows split into blocks of 32 is quantized, the rest stays float16.
`QuantizedModel.model` holds the dequantized weights: what lmforge (or llama.cpp's
dequantizer) reads back from the file, bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import LmforgeError
from .options import QuantizeOptions

BLOCK = 32
LINEARS = ("attn.qkv", "attn.out", "mlp.fc", "mlp.proj")  # a block's quantized layers, in the order data meets them


# --------------------------------------------------------------------------------- grids
@dataclasses.dataclass(frozen=True)
class Grid:
    """One GGUF block type: its codes and how a block's scale is chosen."""

    name: str  # "q4_0" or "q8_0"
    low: int  # smallest code
    high: int  # largest code
    offset: int  # value = d * (code - offset)

    def scale(self, blocks: torch.Tensor) -> torch.Tensor:
        """The block scale llama.cpp's quantizer picks for blocks [..., 32], in float32 (not yet float16)."""
        if self.name == "q4_0":
            pick = blocks.abs().argmax(dim=-1, keepdim=True)
            return blocks.gather(-1, pick).squeeze(-1) / -8.0
        return blocks.abs().amax(dim=-1) / 127.0

    def rtn(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(float16 scales [rows, n/32], int8 codes [rows, n]) rounded as gguf_write rounds them.

        The codes come from the float32 scale (as in llama.cpp), the stored scale is its
        float16 rounding; `quantize_q4_0` / `quantize_q8_0` give the same bytes.
        """
        rows, cols = weight.shape
        blocks = weight.detach().float().reshape(rows, cols // BLOCK, BLOCK)
        d = self.scale(blocks)
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d).unsqueeze(-1)
        if self.name == "q4_0":
            q = torch.clamp(torch.floor(blocks * inv + 8.5), max=15)
        else:
            x = blocks * inv
            q = torch.sign(x) * torch.floor(x.abs() + 0.5)
        return d.to(torch.float16), q.to(torch.int8).reshape(rows, cols)

    def codes(self, w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Nearest codes of values `w` for the (already float16-rounded) scales `d`, same shape."""
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        x = w * inv
        q = torch.sign(x) * torch.floor(x.abs() + 0.5) + self.offset  # C's roundf, as llama.cpp rounds
        return torch.clamp(q, self.low, self.high)

    def values(self, codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Dequantized weights [rows, n] from codes [rows, n] and float16 scales [rows, n/32]."""
        rows, cols = codes.shape
        scale = d.float().unsqueeze(-1)
        return (scale * (codes.float().reshape(rows, cols // BLOCK, BLOCK) - self.offset)).reshape(rows, cols)

    def pack(self, d: torch.Tensor, codes: torch.Tensor):
        """GGUF bytes [rows, n/32 * block bytes] of float16 scales and codes."""
        import numpy as np

        rows, cols = codes.shape
        scale_bytes = d.contiguous().numpy().view(np.uint8).reshape(rows, cols // BLOCK, 2)
        q = codes.numpy().reshape(rows, cols // BLOCK, BLOCK)
        if self.name == "q4_0":
            q = q.astype(np.uint8)
            body = q[..., :16] | (q[..., 16:] << 4)
        else:
            body = q.astype(np.int8).view(np.uint8)
        return np.concatenate([scale_bytes, body], axis=-1).reshape(rows, -1)

    @property
    def ggml_type(self) -> int:
        import gguf

        return int(gguf.GGMLQuantizationType.Q4_0 if self.name == "q4_0" else gguf.GGMLQuantizationType.Q8_0)


GRIDS = {4: Grid("q4_0", 0, 15, 8), 8: Grid("q8_0", -127, 127, 0)}


@dataclasses.dataclass
class QuantizedTensor:
    scales: torch.Tensor  # float16 [rows, n / 32]
    codes: torch.Tensor  # int8 [rows, n]
    grid: Grid

    def dequantize(self) -> torch.Tensor:
        return self.grid.values(self.codes, self.scales)


def rtn(weight: torch.Tensor, grid: Grid) -> QuantizedTensor:
    d, q = grid.rtn(weight)
    return QuantizedTensor(d, q, grid)


# ---------------------------------------------------------------------- the model's layers
def quantizable(model) -> None:
    """Raise the one message that says why `model` cannot become a GGUF block-quantized file."""
    from ..model.gguf_write import gguf_architecture
    from ..model.transformer import Block

    gguf_architecture(model.config)  # encoders, mixtures of experts, unsupported layouts
    for i, block in enumerate(model.layers):
        if type(block) is not Block:
            raise LmforgeError(f"layers.{i} is not a pre-norm decoder block; quantize works on decoder models")
        for name in LINEARS:
            if not isinstance(block.get_submodule(name), nn.Linear):
                raise LmforgeError(f"layers.{i}.{name} is not a plain linear layer (a model laid out for "
                                   "inference?); load the model with plain weights")


def block_linears(block) -> dict[str, nn.Linear]:
    """The block's linears whose rows split into blocks of 32 (the others stay float16 in the file)."""
    return {name: block.get_submodule(name) for name in LINEARS
            if block.get_submodule(name).in_features % BLOCK == 0}


class _Stop(Exception):
    """Raised by a hook once it has what it came for: the rest of the forward is not needed."""


@torch.no_grad()
def first_block_inputs(model, rows: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple]]:
    """The residual stream entering layers.0 for each calibration row [1, L], and the other
    arguments the model passes its blocks for that row (rotary table, mask, positions)."""
    captured: list[tuple] = []

    def catch(_module, args):
        captured.append(args)
        raise _Stop

    handle = model.layers[0].register_forward_pre_hook(catch)
    try:
        for ids in rows:
            try:
                model(ids.view(1, -1))
            except _Stop:
                pass
    finally:
        handle.remove()
    if not captured:
        raise LmforgeError("no calibration text: gptq and awq need some")
    return [args[0] for args in captured], [args[1:] for args in captured]


@torch.no_grad()
def layer_inputs(block, name: str, xs: list[torch.Tensor], extra: list[tuple]) -> list[torch.Tensor]:
    """What layer `name` of `block` receives for each calibration row (the block's forward
    stops there)."""
    seen: list[torch.Tensor] = []

    def catch(_module, args):
        seen.append(args[0])
        raise _Stop

    handle = block.get_submodule(name).register_forward_pre_hook(catch)
    try:
        _forward_rows(block, xs, extra)
    finally:
        handle.remove()
    return seen


def _forward_rows(block, xs: list[torch.Tensor], extra: list[tuple]) -> None:
    """Run `block` on each row for its hooks' sake; a hook that has what it came for stops the row."""
    for x, args in zip(xs, extra):
        try:
            block(x, *args)
        except _Stop:
            pass


@torch.no_grad()
def input_stats(block, names: Iterable[str], xs: list[torch.Tensor], extra: list[tuple], stop: bool = False,
                mean_abs: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, int]]:
    """For each layer `block.<name>`: X^T X of the inputs reaching it over all rows (float64
    sums, float32 result), the per-channel mean |x| when asked, and the token count, from one
    forward of the block per row. With `stop`, each row's forward ends at the first of them."""
    names = list(names)
    grams, absums, seen, handles = {}, {}, dict.fromkeys(names, 0), []

    def hook(name):
        def record(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name].addmm_(x.T, x)
            if mean_abs:
                absums[name].add_(x.abs().sum(0))
            seen[name] += x.shape[0]
            if stop:
                raise _Stop
        return record

    try:
        for name in names:
            layer = block.get_submodule(name)
            grams[name] = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64)
            absums[name] = torch.zeros(layer.in_features, dtype=torch.float64)
            handles.append(layer.register_forward_pre_hook(hook(name)))
        _forward_rows(block, xs, extra)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (grams[name].float(), (absums[name] / max(1, seen[name])).float() if mean_abs else None,
                   seen[name]) for name in names}


@torch.no_grad()
def run_block(block, xs: list[torch.Tensor], extra: list[tuple]) -> list[torch.Tensor]:
    return [block(x, *args) for x, args in zip(xs, extra)]


# --------------------------------------------------------------------------- the driver
@dataclasses.dataclass
class QuantizedModel:
    """A model whose weights lie on a GGUF grid, with the codes that put them there."""

    model: nn.Module  # dequantized weights: what reading the file back gives
    method: str
    bits: int
    tensors: dict[str, QuantizedTensor]  # lmforge weight name -> scales and codes
    seconds: float
    details: dict[str, object] = dataclasses.field(default_factory=dict)  # per-method figures (AWQ's alphas ...)

    @property
    def qtype(self) -> str:
        return GRIDS[self.bits].name


@torch.no_grad()
def quantize_model(model, options: QuantizeOptions, calibration: Iterable[torch.Tensor] | None = None,
                   progress: Callable[..., None] | None = None) -> QuantizedModel:
    """Quantize `model` (an lmforge `Transformer` in float32, changed in place) as `options` say.

    `calibration`: token-id rows [L] or [1, L] for gptq and awq. `progress(done, total)` is
    called once per block.
    """
    start = time.perf_counter()
    quantizable(model)
    model.eval()
    grid = GRIDS[options.bits]
    tensors: dict[str, QuantizedTensor] = {}
    details: dict[str, object] = {}
    n_layer = len(model.layers)
    if options.needs_calibration:
        if calibration is None:
            raise LmforgeError(f"{options.method} needs calibration text")
        xs, extra = first_block_inputs(model, calibration)
        details["calibration_tokens"] = sum(x.shape[0] * x.shape[1] for x in xs)
        if options.method == "gptq":
            from .gptq import gptq_block

            step = gptq_block
        else:
            from .awq import awq_block

            step = awq_block
        for i, block in enumerate(model.layers):
            found = step(block, xs, extra, grid, options, model.config)
            for name, qt in found.pop("tensors").items():
                tensors[f"layers.{i}.{name}.weight"] = qt
            for key, value in found.items():
                details.setdefault(key, []).append(value)
            if i + 1 < n_layer:
                xs = run_block(block, xs, extra)  # the quantized block feeds the next one
            if progress is not None:
                progress(i + 1, n_layer)
    else:
        for i, block in enumerate(model.layers):
            for name, layer in block_linears(block).items():
                qt = rtn(layer.weight, grid)
                layer.weight.copy_(qt.dequantize())
                tensors[f"layers.{i}.{name}.weight"] = qt
            if progress is not None:
                progress(i + 1, n_layer)
    round_like_writer(model, grid, set(tensors))
    return QuantizedModel(model, options.method, options.bits, tensors, time.perf_counter() - start, details)


@torch.no_grad()
def round_like_writer(model, grid: Grid, done: set[str]) -> None:
    """Round the other matrices as `write_gguf` stores them (the head in Q8_0, rows that do not
    split into blocks in float16), so the model in memory is the model in the file."""
    head = "embed.weight" if model.config.tie_word_embeddings else "lm_head.weight"
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if name in done or param.dim() < 2 or id(param) in seen:
            continue
        seen.add(id(param))
        if param.shape[-1] % BLOCK:
            param.copy_(param.to(torch.float16).float())
        else:
            target = GRIDS[8] if name == head else grid
            param.copy_(rtn(param.reshape(-1, param.shape[-1]), target).dequantize().view_as(param))


def gguf_blocks(result: QuantizedModel) -> dict[str, tuple[object, int]]:
    """The quantized tensors as GGUF tensors (bytes, type) under llama.cpp's names.

    `gguf_tensors` splits fused matrices and permutes q/k rows; both move whole rows, and a
    row's blocks move with it, so the codes and the scales go through the same mapping.
    """
    from ..model.gguf_write import gguf_architecture, gguf_tensors

    config = result.model.config
    arch = gguf_architecture(config)
    state = {k: v for k, v in result.model.state_dict().items()}
    codes = gguf_tensors(config, {**state, **{k: t.codes.float() for k, t in result.tensors.items()}}, arch)
    scales = gguf_tensors(config, {**state, **{k: t.scales.float() for k, t in result.tensors.items()}}, arch)
    sources = {"attn_q": "attn.qkv", "attn_k": "attn.qkv", "attn_v": "attn.qkv", "attn_qkv": "attn.qkv",
               "attn_output": "attn.out", "ffn_gate": "mlp.fc", "ffn_up": "mlp.fc", "ffn_down": "mlp.proj"}
    grid = GRIDS[result.bits]
    out = {}
    for name in codes:
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight" or parts[2] not in sources:
            continue
        if f"layers.{parts[1]}.{sources[parts[2]]}.weight" not in result.tensors:
            continue
        out[name] = (grid.pack(scales[name].to(torch.float16), codes[name].to(torch.int8)), grid.ggml_type)
    return out


def writable_target(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """`path` checked before any work: new (or `overwrite`), in a directory lmforge may write."""
    path = Path(path)
    if path.suffix.lower() != ".gguf":
        raise LmforgeError(f"{path}: a GGUF file name ends in .gguf")
    if path.is_dir():
        raise LmforgeError(f"{path} is a directory; name the .gguf file to write")
    if path.exists() and not overwrite:
        raise LmforgeError(f"{path} already exists (choose another path or pass --overwrite)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LmforgeError(f"cannot write {path}: {parent} is not a directory")
    try:  # the one reliable test (permissions, read-only mounts, root): create a file there
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise LmforgeError(f"cannot write {path}: {parent} is not a writable directory ({exc.strerror})") from None
    return path


def write_quantized(result: QuantizedModel, path: str | os.PathLike[str], tokenizer=None, name: str | None = None,
                    overwrite: bool = False, progress=None):
    """Write `result` as one GGUF file (atomically); the `GGUFExport` summary of `write_gguf`."""
    from ..model.gguf_write import write_gguf

    path = writable_target(path, overwrite)
    try:
        return write_gguf(result.model, path, result.qtype, tokenizer=tokenizer, name=name, overwrite=overwrite,
                          progress=progress, encoded=gguf_blocks(result))
    except OSError as exc:
        raise LmforgeError(f"cannot write {path}: {exc.strerror or exc}") from None


def calibration_rows(tokenizer, texts: Iterable[str], rows: int, length: int) -> list[torch.Tensor]:
    """`rows` rows of `length` tokens from the texts (fewer when the text runs out), each [1, length]."""
    from .prune import calibration_batches

    batches = calibration_batches(tokenizer, texts, rows * length, window=length)
    full = [b for b in batches if b.shape[1] == length]
    return full or batches[:1]
