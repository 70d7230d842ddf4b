"""Where low precision pays on a CPU: hardware detection and the `auto` precision policy.

A CPU multiplies bfloat16 matrices fast only with the instructions for it: AMX tiles
(Intel Sapphire Rapids and later: flags ``amx_bf16``, ``amx_tile``) or AVX512-BF16 dot
products (Cooper Lake, Zen 4/5: ``avx512_bf16``). On such a CPU oneDNN runs a large bf16
matrix product several times faster than float32 (2048^3 here: about 7x with AMX);
without them bf16 products are emulated by converting to float32 and are slower than
float32 itself. So the policy picks bf16 only where the flags are present, and only for
the work that is made of large matrix products:

* training (many rows per product): bf16 products under autocast, float32 master
  weights, optimizer state and loss (lmforge/train/loop.py, lmforge/model/onednn.py);
* prefill (a prompt's tokens go through every weight together): bf16 products with
  bf16 copies of the weights, float32 everything else (lmforge/infer/bf16_prefill.py);
* not decode: one row per product is bound by reading the weights from memory, and the
  float32 matrix-vector kernels were faster than the bf16 ones we measured, so decode
  keeps the float32 weights.

``LMFORGE_CPU_BF16`` overrides the detection: ``1`` claims fast bf16 (tests; a CPU whose
flags are hidden, e.g. by a hypervisor), ``0`` refuses it (to compare, or where bf16
misbehaves). Nothing here imports torch at import time.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

ENV = "LMFORGE_CPU_BF16"
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the first CPU listed in `path` (empty where there is no such file)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def _detected() -> tuple[str, ...]:
    return tuple(flag for flag in BF16_FLAGS if flag in cpu_flags())


def _override() -> bool | None:
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    if value:
        from lmforge.errors import LmforgeError

        raise LmforgeError(f"{ENV}={value!r}: use 1 (this CPU has fast bf16) or 0 (it has not)")
    return None


def cpu_bf16_units() -> tuple[str, ...]:
    """The bf16 matrix units this CPU reports (``amx_bf16``, ``avx512_bf16``), as detected."""
    return _detected()


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 matrix products are fast here: the override if set, else the CPU's flags."""
    override = _override()
    return bool(_detected()) if override is None else override


@dataclass(frozen=True)
class PrecisionPlan:
    """What `auto` runs on a device, phase by phase (float32 / bfloat16 / float16, by name)."""

    weights: str = "float32"  # the stored weights (and decode, which reads them)
    prefill: str = "float32"  # the matrix products of a prompt's forward
    train: str = "fp32"  # train.precision: fp32 | bf16 | fp16
    reason: str = ""


def auto_plan(device_type: str = "cpu", cuda_bf16: bool = False) -> PrecisionPlan:
    """The `auto` policy for a device type ("cpu", "cuda", "mps").

    GPUs with bf16 keep everything in bf16. A CPU with bf16 units keeps float32 weights
    (decode is faster reading them) and runs prefill and training products in bf16; any
    other CPU stays float32 throughout.
    """
    if device_type == "cuda":
        if cuda_bf16:
            return PrecisionPlan("bfloat16", "bfloat16", "bf16", "GPU with bf16")
        return PrecisionPlan(reason="GPU without bf16")
    if device_type != "cpu":
        return PrecisionPlan(reason=f"{device_type}: float32")
    override = _override()
    if override is False:
        return PrecisionPlan(reason=f"{ENV}=0")
    if override:
        return PrecisionPlan(prefill="bfloat16", train="bf16", reason=f"{ENV}=1")
    units = _detected()
    if units:
        return PrecisionPlan(prefill="bfloat16", train="bf16", reason="CPU has " + ", ".join(units))
    return PrecisionPlan(reason="CPU without amx_bf16/avx512_bf16")


# A product's bf16 gain must pay for casting its activations (a pass over rows x features
# each way): the layers of SmolLM2-135M (331k..1.8M weights) gained, a 64-wide test model's
# (4k..16k) would only pay the casts. The rule looks at the median linear layer.
MIN_BF16_WEIGHT = 1 << 17


def bf16_pays(model) -> bool:
    """Whether `model`'s linear layers are large enough for bf16 products to gain on a CPU."""
    from torch import nn

    sizes = sorted(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return bool(sizes) and sizes[len(sizes) // 2] >= MIN_BF16_WEIGHT
