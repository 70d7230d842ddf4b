"""Serving several LoRA adapters on one base model, in one batch (S7).

A LoRA adapter changes a linear layer from W x to W x + s B A x, with A [r, in], B [out, r]
and s = alpha / r (alpha / sqrt(r) for rsLoRA). Merging s B A into W would give each
adapter its own copy of the model. Keeping the adapters apart instead lets one copy of
the base serve every adapter at once: rows of one decode batch may each use a different
adapter (or none), and the expensive part, the base product W x, runs once for the
whole batch.

`AdapterBank.install(model, adapters)` replaces each targeted `nn.Linear` of the model
by a `MultiLoraLinear` that holds the base layer (its class, and so its CPU kernels, are
unchanged) and every adapter's (A, B, s) for that layer. Before each forward the
scheduler tells the bank which adapter every batch row uses (`bank.rows(...)`), and each
`MultiLoraLinear` computes

    y = base(x)                                   # all rows, one product
    for each adapter a present in the batch:       # grouped by adapter
        y[rows of a] += s_a * (x[rows of a] A_a^T) B_a^T

This is the segmented form of Punica's and S-LoRA's kernels (one pair of small products
per adapter group, rows gathered by index) rather than the batched-gather form (each row
gathers its own A and B and one batched product runs over all rows): on a CPU the products
cost what they cost, and the grouped form moves no weights, while the gathered form copies
r x (in + out) floats per row and layer. When every row uses the same adapter, nothing is
gathered. A batch of base rows only pays one Python check per wrapped layer.

The weights arrive already read: this module knows nothing of file formats. The server
(lmforge/serve/adapters.py) reads PEFT's adapter_config.json + adapter_model.safetensors
with lmforge.tune.peft's reader, checks them against the served model, and hands each
adapter down as a `LoraWeights`: for every wrapped layer, A of all targeted parts stacked
([n r, in]) and B laid out block-diagonally in the rows of its parts ([out, n r]), so that
q, k and v slices of the fused q/k/v projection cost two products together, not six.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import LmforgeError


@dataclass
class LoraWeights:
    """One adapter ready to serve: per lmforge module name ("layers.3.attn.qkv"), (A [k, in], B [out, k])."""

    name: str
    scale: float
    rank: int
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    source: str = ""  # where it was read from, for listings


class MultiLoraLinear(nn.Module):
    """A frozen linear layer plus the LoRA deltas of every served adapter that targets it."""

    def __init__(self, base: nn.Module, bank: "AdapterBank") -> None:
        super().__init__()
        self.base = base
        self.bank = bank
        self.in_features, self.out_features = base.in_features, base.out_features
        # adapter index (1..) -> (A^T [in, k], B^T [k, out], scale); stored transposed and
        # contiguous so that both products read their weight row by row.
        self.loras: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        groups = self.bank.groups
        if not groups:
            return y
        for index, rows in groups:
            lora = self.loras.get(index)
            if lora is None:
                continue
            a_t, b_t, scale = lora
            if rows is None:  # every row of the batch uses this adapter
                y.add_(torch.matmul(torch.matmul(x, a_t), b_t), alpha=scale)
            else:
                delta = torch.matmul(torch.matmul(x.index_select(0, rows), a_t), b_t)
                y.index_add_(0, rows, delta, alpha=scale)
        return y

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.loras)}"


class AdapterBank:
    """The adapters served on one model: names, indices (0 is the base) and the per-row selection."""

    def __init__(self) -> None:
        self.adapters: list[LoraWeights] = []  # index i + 1
        self.groups: list[tuple[int, torch.Tensor | None]] = []  # set by `rows` for the current forward
        self._layers: dict[str, MultiLoraLinear] = {}

    @classmethod
    def install(cls, model: nn.Module, adapters: Sequence[LoraWeights]) -> "AdapterBank":
        """Wrap the layers that any adapter targets; returns the bank the scheduler is given."""
        bank = cls()
        if getattr(model, "adapter_bank", None) is not None:
            raise LmforgeError("this model already serves adapters")
        names = [a.name for a in adapters]
        if len(set(names)) != len(names):
            raise LmforgeError(f"adapter names must be unique, got {names}")
        for adapter in adapters:
            bank._add(model, adapter)
        model.adapter_bank = bank
        return bank

    def _add(self, model: nn.Module, adapter: LoraWeights) -> None:
        index = len(self.adapters) + 1
        for name, (a, b) in adapter.layers.items():
            layer = self._layers.get(name)
            if layer is None:
                try:
                    base = model.get_submodule(name)
                except AttributeError:
                    raise LmforgeError(f"adapter {adapter.name!r} targets {name}, which this model does not have") from None
                if not isinstance(base, nn.Linear):
                    raise LmforgeError(f"adapter {adapter.name!r} targets {name}, which is not a linear layer")
                layer = MultiLoraLinear(base, self)
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, layer)
                self._layers[name] = layer
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features or a.shape[0] != b.shape[1]:
                raise LmforgeError(f"adapter {adapter.name!r}: {name} needs A [k, {layer.in_features}] and "
                                   f"B [{layer.out_features}, k], got {tuple(a.shape)} and {tuple(b.shape)}")
            ref = layer.base.weight
            layer.loras[index] = (a.to(ref.device, ref.dtype).t().contiguous(),
                                  b.to(ref.device, ref.dtype).t().contiguous(), float(adapter.scale))
        self.adapters.append(adapter)

    def uninstall(self, model: nn.Module) -> None:
        """Put the base layers back: `model` is again the plain model (benchmarks compare the two)."""
        for name, layer in self._layers.items():
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, layer.base)
        self._layers.clear()
        model.adapter_bank = None

    def __len__(self) -> int:
        return len(self.adapters)

    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def index(self, name: str) -> int | None:
        """1-based index of the adapter called `name`, None if there is none."""
        for i, adapter in enumerate(self.adapters):
            if adapter.name == name:
                return i + 1
        return None

    def check(self, index: int) -> None:
        if not 0 <= index <= len(self.adapters):
            raise LmforgeError(f"no adapter {index} (this model serves {len(self.adapters)})")

    @contextlib.contextmanager
    def rows(self, per_row: Sequence[int], device: torch.device | str = "cpu") -> Iterator[None]:
        """Within the block, batch row i of every forward uses adapter `per_row[i]` (0: the base)."""
        present = sorted(set(per_row) - {0})
        if len(present) == 1 and all(i == present[0] for i in per_row):
            groups: list[tuple[int, torch.Tensor | None]] = [(present[0], None)]
        else:
            groups = [(a, torch.tensor([r for r, i in enumerate(per_row) if i == a], dtype=torch.long, device=device))
                      for a in present]
        self.groups = groups
        try:
            yield
        finally:
            self.groups = []
