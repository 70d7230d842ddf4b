"""Prefix caching: reuse the keys and values of prompt prefixes seen before.

Chat requests to one server share long beginnings: the chat template's system prompt, a
RAG instruction block, a few-shot header, the earlier turns of a conversation. Keys and
values at position i depend only on tokens 0..i (attention is causal), so once a prefix
has been prefilled its K/V can be copied into a new request's cache row instead of being
recomputed. Prefill is the compute-bound phase on a CPU (every prompt token is a full
pass through the weights), so skipping a shared 20-token system prompt of a 45-token
request removes almost half of that request's prefill work.

The store keeps fixed-size blocks of `block` tokens. A block is identified by the hash
of the whole token prefix that ends with it (a chain: the hash of the previous block's
key and this block's tokens), so equal blocks at different places never collide by
content alone. A chain may start from a salt: the scheduler salts it with the request's
LoRA adapter, whose keys and values differ from the base model's for the same tokens
(salt 0, the base, is the unsalted chain). Lookups walk the chain until the first miss.
Blocks are evicted least recently used once the store exceeds its byte budget; a hit
refreshes every block of the matched chain.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class PrefixCache:
    """LRU store of per-block keys/values, keyed by the token prefix ending at each block."""

    def __init__(self, max_bytes: int, block: int = 4) -> None:
        if block < 1:
            raise ValueError("block must be at least 1 token")
        self.max_bytes = max_bytes
        self.block = block
        self.bytes = 0
        self.hits = 0  # tokens served from the store
        # key -> (the block's own tokens, keys, values); the tokens guard against hash collisions.
        self._blocks: OrderedDict[int, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def _keys(self, ids: list[int], limit: int, salt: int = 0) -> list[tuple[int, tuple[int, ...]]]:
        """(chain key, tokens) of the full blocks within ids[:limit]."""
        keys, key = [], 0 if not salt else hash(("adapter", salt))
        for end in range(self.block, limit + 1, self.block):
            tokens = tuple(ids[end - self.block : end])
            key = hash((key, tokens))
            keys.append((key, tokens))
        return keys

    def match(self, ids: list[int], salt: int = 0) -> int:
        """Tokens of `ids` whose K/V are stored, leaving at least one token to prefill."""
        found = 0
        for key, tokens in self._keys(ids, len(ids) - 1, salt):
            entry = self._blocks.get(key)
            if entry is None or entry[0] != tokens:
                break
            found += self.block
        return found

    def load(self, ids: list[int], length: int, k_row: torch.Tensor, v_row: torch.Tensor, salt: int = 0) -> None:
        """Copy the stored K/V of ids[:length] into one cache row ([layers, heads, T, d] views)."""
        if not length:
            return
        keys = [key for key, _ in self._keys(ids, length, salt)]
        blocks = [self._blocks[key] for key in keys]
        for key in keys:
            self._blocks.move_to_end(key)
        k_row[:, :, :length] = torch.cat([b[1] for b in blocks], dim=2)
        v_row[:, :, :length] = torch.cat([b[2] for b in blocks], dim=2)
        self.hits += length

    def store(self, ids: list[int], k_row: torch.Tensor, v_row: torch.Tensor, salt: int = 0) -> None:
        """Remember the full blocks of a prompt just prefilled into this cache row."""
        if self.max_bytes <= 0:
            return
        for i, (key, tokens) in enumerate(self._keys(ids, len(ids), salt)):
            entry = self._blocks.get(key)
            if entry is not None and entry[0] == tokens:
                self._blocks.move_to_end(key)
                continue
            if entry is not None:  # a hash collision: the newer block wins
                self.bytes -= entry[1].nbytes + entry[2].nbytes
            span = slice(i * self.block, (i + 1) * self.block)
            k, v = k_row[:, :, span].clone(), v_row[:, :, span].clone()
            self._blocks[key] = (tokens, k, v)
            self.bytes += k.nbytes + v.nbytes
        while self.bytes > self.max_bytes and self._blocks:
            _, (_, k, v) = self._blocks.popitem(last=False)
            self.bytes -= k.nbytes + v.nbytes
