"""Preallocated key/value cache (M9).

During generation every new token attends to the keys and values of all earlier tokens.
Recomputing them each step costs O(T^2); caching them makes each decode step O(T). The
cache is allocated once for the longest sequence the caller asks for, so decoding never
reallocates or copies: a step writes one position per row and reads a prefix.

Memory: 2 (k and v) x layers x batch x kv_heads x max_len x head_dim x bytes per value;
`KVCache.nbytes` reports it. Grouped-query attention shrinks it by n_head / n_kv_head.
On the CPU a large cache lies in 2 MiB pages where the OS gives them (lmforge/io/hugepages.py):
a long-context decode step streams every row's cache, and with fewer address translations it
streams faster (attention over 30 layers x 16 rows of ~700 keys: 27 -> 22 ms, AMD EPYC).
"""

from __future__ import annotations

import torch

from ..io import hugepages


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A zero-filled cache tensor: in huge pages on the CPU where it is large and they exist."""
    if torch.device(device).type == "cpu":
        tensor = hugepages.zeros(shape, dtype)
        if tensor is not None:
            return tensor
    return torch.zeros(shape, dtype=dtype, device=device)


class KVCache:
    """Keys and values for `batch` rows of up to `max_len` positions, for every layer."""

    def __init__(
        self,
        n_layer: int,
        batch: int,
        max_len: int,
        n_kv_head: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = zeros(shape, dtype, device)
        self.v = zeros(shape, dtype, device)

    @classmethod
    def for_model(cls, config, batch: int, max_len: int, dtype: torch.dtype, device) -> "KVCache":
        return cls(config.n_layer, batch, max_len, config.n_kv_head, config.head_dim, dtype, device)

    @classmethod
    def _view(cls, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        view = cls.__new__(cls)
        view.k, view.v = k, v
        return view

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def fits(self, config, batch: int, max_len: int, dtype: torch.dtype, device) -> bool:
        """Whether this cache can serve `batch` rows of `max_len` positions of a model with `config`."""
        n_layer, rows, heads, length, dim = self.k.shape
        return (n_layer == config.n_layer and heads == config.n_kv_head and dim == config.head_dim
                and rows >= batch and length >= max_len and self.k.dtype == dtype
                and self.k.device == torch.device(device))

    def clear(self, batch: int, max_len: int) -> None:
        """Zero the first `batch` rows' first `max_len` positions (a reused cache starts as a new one)."""
        self.k[:, :batch, :, :max_len].zero_()
        self.v[:, :batch, :, :max_len].zero_()

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of rows start..stop; writes through it land in this cache."""
        return KVCache._view(self.k[:, start:stop], self.v[:, start:stop])

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new k/v ([B, kv_heads, L, d]) and return all keys/values up to `end`.

        `start` is one position shared by every row (prefill, or rows in lockstep) or a
        tensor of per-row positions for a one-token decode step of rows of different
        lengths.
        """
        if isinstance(start, int):
            self.k[layer, :, :, start : start + k.shape[2]] = k
            self.v[layer, :, :, start : start + k.shape[2]] = v
        else:
            # One flat index per (row, head) slot, shared by every layer of this step, so
            # the write is a single index_copy_ instead of a broadcast advanced-index put.
            if start is not getattr(self, "_flat_for", None):
                batch, heads, length, _ = self.k[layer].shape
                base = torch.arange(batch, device=k.device)[:, None] * heads * length
                self._flat_index = (base + torch.arange(heads, device=k.device) * length + start[:, None]).reshape(-1)
                self._flat_for = start
            dim = k.shape[-1]
            self.k[layer].view(-1, dim).index_copy_(0, self._flat_index, k[:, :, 0].reshape(-1, dim))
            self.v[layer].view(-1, dim).index_copy_(0, self._flat_index, v[:, :, 0].reshape(-1, dim))
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
