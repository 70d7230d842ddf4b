"""int8 products for prefill: dynamic per-token activation quantization with smoothing (W8A8).

A prefill is arithmetic-bound (lmforge/infer/bf16_prefill.py says why), and CPUs with
integer dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX-INT8) multiply int8 matrices
with int32 sums several times faster than float32: on a 2-core AMD EPYC with AVX512-VNNI,
512 x 576 x 3072 ran at about 830 GFLOP/s in int8 against 180 in float32 and 415 in bf16.
This module gives the block linears of a model that path for products of many rows, and
leaves decode (a row or a few) to the float32 kernels, as the bf16 path does.

How a product is computed (`Int8PrefillLinear`):

- weights: W' = W diag(s), rounded per output row to int8 with scale max|W'_row| / 127,
  made once at calibration and kept beside the float32 weights;
- activations, per call: X' = X diag(1/s), each row (token) rounded to int8 with its own
  scale max|X'_row| / 127 ("dynamic": from the values at hand, nothing fixed in advance);
- Y = (X'_q W'_q^T) * row scales * column scales, the product summed exactly in int32;
  the rare tokens whose row maximum dwarfs the others' are multiplied in float32 instead
  (`Int8Weights.outlier_ratio`).

X' W'^T = X W^T for any positive s, but rounding is not neutral: one int8 scale per token
means a token whose features include a few very large ones (the outlier channels of LLM
activations) keeps only a few levels for all the others. The smoothing vector s moves
that range from the activations to the weights (Xiao et al. 2023, "SmoothQuant"):
s_j = max|X_j|^a / max|W_j|^(1-a) over calibration tokens, feature j, with a = 0.7 (`apply_int8`
says how that was chosen). The MLP's down projection stays on the float path: its inputs
have spikes on single tokens that no per-feature factor moves.

What it costs: the int8 weights and scales (a quarter of the float32 bytes, beside them),
a calibration forward over a little text at load, and precision: on the default model,
plain-text perplexity hardly moves, but the first reply token of a chat moves about 7x as
far from float32 as with bf16 products, and greedy replies part from float32's more often
(docs/benchmarks.md has the figures with the commands). Only generation takes the path, as
with bf16 (`generation_products`): likelihoods that lmforge reports (`echo`, `logprobs`,
`lmforge eval`) are float32.
"""

from __future__ import annotations

import functools
from typing import Iterable

import torch
from torch import nn

from lmforge.errors import LmforgeError

from lmforge.model.onednn import generation_products_on

from .bf16_prefill import Bf16PrefillLinear
from .layout import BlasLinear

ALPHA = 0.7  # smoothing strength (see `apply_int8` for how it was chosen)
# The block products that take int8 by default: the MLP's down projection stays on the float
# path (its inputs, SiLU(gate) x up, have token-specific spikes that smoothing cannot move;
# it carried about half of the perplexity cost on the default model, docs/benchmarks.md).
KINDS = ("attn.qkv", "attn.out", "mlp.fc")
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


def cpu_int8_units() -> tuple[str, ...]:
    """The integer dot-product units this CPU reports (``amx_int8``, ``avx512_vnni``, ``avx_vnni``)."""
    from lmforge.model.precision import cpu_flags

    flags = cpu_flags()
    return tuple(flag for flag in INT8_FLAGS if flag in flags)


@functools.cache
def int8_mm_supported() -> bool:
    """Whether this PyTorch multiplies int8 matrices into int32 on the CPU (`torch._int_mm`)."""
    try:
        a = torch.ones(32, 32, dtype=torch.int8)
        return int(torch._int_mm(a, a)[0, 0]) == 32
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def quantize_rows(x: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of a [rows, n] float tensor, one scale per row: (codes, scales [rows, 1]).
    `inplace`: x is a scratch tensor the caller no longer needs (one pass fewer)."""
    # max |x| per row as max(max x, -min x): two fast reductions (abs().amax() makes a copy,
    # vector_norm(inf) and aminmax measured 20x slower on a 512 x 1536 tensor)
    scale = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_()).clamp_min_(1e-12).div_(127.0)
    scaled = x.div_(scale) if inplace else x / scale
    return scaled.round_().to(torch.int8), scale


def smoothing(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor | None:
    """SmoothQuant's per-input-feature factors s (None for alpha 0: no smoothing)."""
    if alpha == 0:
        return None
    w_max = weight.detach().float().abs().amax(dim=0).clamp_min(1e-5)
    s = act_max.float().clamp_min(1e-5).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp(1e-4, 1e4)


class Int8Weights:
    """One layer's int8 product: codes [in, out] (the layout `_int_mm` reads), float32 column
    scales [out], and 1/s [in] (None without smoothing).

    `outlier_ratio`: rows (tokens) whose largest smoothed value exceeds this many times the
    call's median row maximum are multiplied in float32 instead (`weight`, not copied).
    Those are the few tokens with massive activations (a sequence's first position, which
    attention leans on everywhere after it): with one int8 scale per token, such a token's
    single huge feature would leave its other features a few levels or none.
    """

    outlier_ratio: float | None = 4.0

    def __init__(self, weight: torch.Tensor, s: torch.Tensor | None, alpha: float):
        w = weight.detach().float()
        self.weight = w
        if s is not None:
            w = w * s
        codes, scale = quantize_rows(w)
        self.codes = codes.t().contiguous()
        self.scale = scale.view(-1)
        self.inv_s = None if s is None else (1.0 / s).contiguous()
        self.alpha = alpha

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """X W^T [rows, out] for float32 X [rows, in], in int8 with int32 sums."""
        if self.inv_s is not None:
            codes, row_scale = quantize_rows(x * self.inv_s, inplace=True)
        else:
            codes, row_scale = quantize_rows(x)
        # int32 sums to float32, times the row and the column scales in place (faster than one
        # multiplication of the int32 tensor by their outer product)
        y = torch._int_mm(codes, self.codes).float().mul_(row_scale).mul_(self.scale)
        if self.outlier_ratio is not None:
            peaks = row_scale.view(-1)
            loud = (peaks > self.outlier_ratio * peaks.median()).nonzero().view(-1)
            if loud.numel():
                y[loud] = x[loud] @ self.weight.t()
        return y

    @property
    def nbytes(self) -> int:
        """Bytes of the int8 copy (the float32 weight it points to is the model's own)."""
        return self.codes.numel() + 4 * (self.scale.numel() + (0 if self.inv_s is None else self.inv_s.numel()))


class Int8PrefillLinear(Bf16PrefillLinear):
    """A linear layer whose generation products of `min_rows` rows or more run in int8
    (W8A8, see the module's docstring) once calibrated; fewer rows, or outside generation,
    take the bf16/float32 paths of its parent classes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        int8 = self.__dict__.get("_int8")
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if (int8 is None or rows < self.min_rows or not generation_products_on()
                or x.device.type != "cpu" or x.dtype != torch.float32
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return super().forward(x)
        if int8[0] != (self.weight.data_ptr(), self.weight._version):
            raise LmforgeError("a weight changed after int8 prefill calibration; calibrate again "
                               "(calibrate_int8_prefill) or load the model without int8 prefill")
        y = int8[1].matmul(x.reshape(rows, x.shape[-1])).view(*x.shape[:-1], self.weight.shape[0])
        return y.add_(self.bias) if self.bias is not None else y

    @property
    def int8_weights(self) -> Int8Weights | None:
        state = self.__dict__.get("_int8")
        return None if state is None else state[1]

    def set_int8(self, weights: Int8Weights) -> None:
        self.__dict__["_int8"] = ((self.weight.data_ptr(), self.weight._version), weights)


def _block_linears(model: nn.Module, kinds: tuple[str, ...] = KINDS) -> dict[str, nn.Linear]:
    """The linears named `kinds` inside the model's blocks, as {"layers.i.kind": module} (the
    vocabulary head is not among them: at generation it sees one row)."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise LmforgeError("int8 prefill needs a decoder model with transformer blocks")
    found = {}
    for i, block in enumerate(layers):
        for kind in kinds:
            try:
                module = block.get_submodule(kind)
            except AttributeError:
                continue
            if isinstance(module, nn.Linear):
                found[f"layers.{i}.{kind}"] = module
    if not found:
        raise LmforgeError(f"no linear layer named {', '.join(kinds)} in the model's blocks: int8 prefill "
                           "does not know this layout")
    return found


def output_error(x: torch.Tensor, ref: torch.Tensor, weights: Int8Weights) -> float:
    """Mean over tokens of the int8 product's squared error relative to the float32 output `ref`
    of the same token: every token counts alike (a plain sum would be ruled by the few
    tokens with huge activations, such as a sequence's first position)."""
    err = (weights.matmul(x) - ref).pow(2).sum(dim=1) / ref.pow(2).sum(dim=1).clamp_min(1e-30)
    return float(err.mean())


@torch.no_grad()
def calibrate_int8_prefill(model: nn.Module, batches: Iterable[torch.Tensor], alphas=(ALPHA,),
                           kinds: tuple[str, ...] = KINDS, sample_rows: int = 512, progress=None) -> dict[str, dict]:
    """Make the block linears `kinds` of `model` `Int8PrefillLinear`s with their int8 weights.

    `batches`: token id tensors [1, L] of calibration text (`activation_stats`); the layers
    then get their int8 weights from `apply_int8` (see there for `alphas`). In place;
    parameters unchanged. Returns `apply_int8`'s report.
    """
    return apply_int8(model, activation_stats(model, batches, sample_rows, kinds), alphas, progress=progress)


@torch.no_grad()
def activation_stats(model: nn.Module, batches: Iterable[torch.Tensor], sample_rows: int = 512,
                     kinds: tuple[str, ...] = KINDS) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{block linear: (max |x_j| per input feature over every calibration token, a sample of
    up to `sample_rows` input rows)} from float32 forwards of `batches` ([1, L] token ids)."""
    if not int8_mm_supported():
        raise LmforgeError("this PyTorch build has no CPU int8 matrix product (torch._int_mm); "
                           "int8 prefill needs torch 2.4 or later")
    linears = _block_linears(model, kinds)
    maxima: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    kept = {name: 0 for name in linears}

    def hook(name):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            m = x.abs().amax(dim=0)
            maxima[name] = m if name not in maxima else torch.maximum(maxima[name], m)
            if kept[name] < sample_rows:  # a quarter of the sample from each of the first batches
                step = max(1, x.shape[0] // max(1, sample_rows // 4))
                take = x[::step][: min(sample_rows // 4, sample_rows - kept[name])]
                samples[name].append(take.clone())
                kept[name] += take.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.inference_mode():
            for ids in batches:
                model(ids if ids.dim() == 2 else ids.view(1, -1))
    finally:
        for h in handles:
            h.remove()
    if not maxima:
        raise LmforgeError("int8 prefill calibration saw no tokens: give it some text")
    return {name: (maxima[name], torch.cat(samples[name])) for name in maxima}


@torch.no_grad()
def apply_int8(model: nn.Module, stats: dict[str, tuple[torch.Tensor, torch.Tensor | None]], alphas=(ALPHA,),
               progress=None) -> dict[str, dict]:
    """Give each block linear in `stats` (`activation_stats`) its int8 weights.

    The smoothing strength is the one of `alphas` with the smallest int8 output error on the
    layer's sampled calibration rows (`output_error`); one alpha is that alpha everywhere.
    On the default model a single 0.7 measured better in held-out perplexity than any other
    single value tried (0.5, 0.6, 0.8) and than choosing per layer from 0 to 0.9 by that
    error, which lowers every layer's error and still raised perplexity (docs/benchmarks.md).
    Returns {layer: {"alpha", "error", "error_plain"}} (relative squared errors, with the
    chosen alpha and with none; None where a layer's stats carry no sample rows).
    """
    linears = {}
    for name in stats:
        block, _, kind = name.partition(".")[2].partition(".")
        linears[name] = model.layers[int(block)].get_submodule(kind)
    if len(alphas) > 1 and any(x is None for _, x in stats.values()):
        raise LmforgeError("choosing among several smoothing strengths needs sampled calibration rows")
    report = {}
    for done, (name, (maxima, x)) in enumerate(stats.items()):
        layer = linears[name]
        best, plain = None, None
        for alpha in alphas:
            w8 = Int8Weights(layer.weight, smoothing(maxima, layer.weight, alpha), alpha)
            if x is None:  # one strength and no sample (maxima from the cache): nothing to measure
                best = (None, w8)
                continue
            if plain is None:
                ref = x @ layer.weight.detach().float().t()
                plain = output_error(x, ref, Int8Weights(layer.weight, None, 0.0))
            err = plain if alpha == 0 else output_error(x, ref, w8)
            if best is None or err < best[0]:
                best = (err, w8)
        _as_int8_layer(layer)
        layer.set_int8(best[1])
        report[name] = {"alpha": best[1].alpha, "error": best[0], "error_plain": plain}
        if progress is not None:
            progress(done + 1, len(stats))
    return report


def _as_int8_layer(module: nn.Linear) -> None:
    if type(module) is nn.Linear:
        module.numpy_rows, module.onednn = False, False  # plain F.linear for the rows int8 leaves
    if type(module) in (nn.Linear, BlasLinear, Bf16PrefillLinear):
        module.__class__ = Int8PrefillLinear
    elif not isinstance(module, Int8PrefillLinear):
        raise LmforgeError(f"int8 prefill cannot take over a {type(module).__name__} layer")


def uses_int8_prefill(model: nn.Module) -> bool:
    return any(isinstance(m, Int8PrefillLinear) and m.int8_weights is not None for m in model.modules())


def int8_copy_bytes(model: nn.Module) -> int:
    return sum(m.int8_weights.nbytes for m in model.modules()
               if isinstance(m, Int8PrefillLinear) and m.int8_weights is not None)


def default_calibration_texts() -> list[str]:
    """Text that ships with lmforge (the handbook pages the RAG index is built from), so that
    calibration works offline with nothing else installed."""
    from importlib import resources

    root = resources.files("lmforge.rag") / "handbook"
    return [p.read_text(encoding="utf-8") for p in sorted(root.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".md")]


def calibration_rows(tokenizer, texts: Iterable[str], tokens: int = 2048, length: int = 256) -> list[torch.Tensor]:
    """Token rows [1, length] cut from `texts` (joined), `tokens` in all (fewer if the text runs out)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        if len(ids) >= tokens:
            break
    ids = ids[:tokens]
    if len(ids) < 32:
        raise LmforgeError("int8 prefill calibration needs at least 32 tokens of text")
    length = min(length, len(ids))
    return [torch.tensor(ids[i:i + length]).view(1, -1) for i in range(0, len(ids) - length + 1, length)]


CACHE_VERSION = 2


def weights_fingerprint(model: nn.Module, kinds: tuple[str, ...] = KINDS) -> str:
    """A hash of the layers int8 prefill takes: their names, shapes and a few sums of their
    weights (a merged adapter or another checkpoint changes it; reading is one pass)."""
    import hashlib

    h = hashlib.sha256()
    for name, layer in _block_linears(model, kinds).items():
        w = layer.weight.detach().float()
        h.update(f"{name}:{tuple(w.shape)}:{float(w.sum()):.9e}:{float(w[0].sum()):.9e}:"
                 f"{float(w.abs().sum()):.9e};".encode())
    return h.hexdigest()


def chat_rows(tokenizer, texts: Iterable[str], tokens: int, piece_chars: int = 800) -> list[torch.Tensor]:
    """Calibration rows [1, L] shaped like a chat server's prompts: pieces of `texts` as user
    messages rendered by the tokenizer's chat template (its system prompt and special tokens
    included), `tokens` in all; none where the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    rows, total = [], 0
    for text in texts:
        for i in range(0, len(text), piece_chars):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": text[i:i + piece_chars]}],
                                                   add_generation_prompt=True)
            ids = tokenizer.encode(prompt, add_special_tokens=False)
            rows.append(torch.tensor(ids).view(1, -1))
            total += len(ids)
            if total >= tokens:
                return rows
    return rows


def calibrate_for_generation(model: nn.Module, tokenizer, texts: list[str] | None = None, tokens: int = 2048,
                             length: int = 256, use_cache: bool = True) -> dict[str, dict]:
    """What `lmforge.load(prefill="int8")` runs: `calibrate_int8_prefill` with the default
    strength on `texts` (default: the packaged handbook), half of the tokens as plain text and
    half as chat prompts where the tokenizer has a chat template (`chat_rows`: a chat prompt's
    system text and special tokens drive activations plain text never shows; calibrated on
    plain text alone, the default model's first reply token moved 5-20x more), the activation
    maxima kept in the cache directory (lmforge/io/cache.py) under a hash of the weights and
    the text, so that the next load of the same model skips the calibration forwards."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from lmforge.io.atomic import atomic_path
    from lmforge.io.cache import cache_dir

    texts = default_calibration_texts() if texts is None else texts
    chat = bool(getattr(tokenizer, "chat_template", None))
    key = hashlib.sha256(f"v{CACHE_VERSION}:{weights_fingerprint(model)}:{tokens}:{length}:{ALPHA}:{chat}".encode())
    for text in texts:
        key.update(text.encode("utf-8", "replace"))
    path = cache_dir() / "int8-prefill" / f"{key.hexdigest()[:32]}.safetensors"
    if use_cache and path.is_file():
        try:
            maxima = load_file(str(path))
            return apply_int8(model, {name: (m, None) for name, m in maxima.items()})
        except Exception:  # an unreadable cache file is rebuilt, never trusted
            pass
    rows = chat_rows(tokenizer, texts, tokens // 2) if chat else []
    rows += calibration_rows(tokenizer, texts, tokens - sum(r.shape[1] for r in rows), length)
    stats = activation_stats(model, rows)
    report = apply_int8(model, stats)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file({name: m.contiguous() for name, (m, _) in stats.items()}, str(tmp))
        except OSError:
            pass  # a read-only home: calibrate again next time
    return report
