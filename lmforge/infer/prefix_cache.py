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

`PrefixCache` keeps its own copies of the keys and values: a hit copies them into the new
request's row, and storing copies them out. With the paged KV cache
(lmforge/model/paged_kv.py) `PagedPrefixCache` does neither: its entries are pool block
ids, a hit points the new row's block table at them (the row and the cache then share
those blocks by reference count), and storing a prompt takes a reference to its full
blocks. Ten requests with the same system prompt then hold its keys and values once, not
ten times. Its memory is the pool's: blocks that only the cache holds count as free, and
are evicted least recently used when a row needs a block the free list does not have.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


def chain_keys(ids: list[int], limit: int, block: int, salt: int = 0) -> list[tuple[int, tuple[int, ...]]]:
    """(chain key, tokens) of the full blocks of `block` tokens within ids[:limit]."""
    keys, key = [], 0 if not salt else hash(("adapter", salt))
    for end in range(block, limit + 1, block):
        tokens = tuple(ids[end - block : end])
        key = hash((key, tokens))
        keys.append((key, tokens))
    return keys


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
        return chain_keys(ids, limit, self.block, salt)

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


class PagedPrefixCache:
    """LRU map from a token prefix (hash chain, as `PrefixCache`) to the pool block holding its last block's K/V.

    Blocks are the pool's (`pool.block_size` tokens). The cache holds one reference to
    each block it maps; rows that share a block hold theirs. Only full blocks are ever
    mapped, and a hit always leaves at least one prompt token to compute, so a shared
    block lies wholly before the first position its row writes.
    """

    def __init__(self, pool) -> None:
        self.pool = pool
        self.block = pool.block_size
        self.hits = 0  # tokens served from the cache
        self.evicted = 0  # blocks given back to the pool for rows that needed them
        # key -> (the block's own tokens, pool block id); the tokens guard against hash collisions.
        self._blocks: OrderedDict[int, tuple[tuple[int, ...], int]] = OrderedDict()
        pool.evictor = self.evict

    def __len__(self) -> int:
        return len(self._blocks)

    def _chain(self, ids: list[int], limit: int, salt: int) -> list[tuple[int, int]]:
        """(key, block id) of the stored chain within ids[:limit], up to the first miss."""
        found = []
        for key, tokens in chain_keys(ids, limit, self.block, salt):
            entry = self._blocks.get(key)
            if entry is None or entry[0] != tokens:
                break
            found.append((key, entry[1]))
        return found

    def _refresh(self, keys: list[int]) -> None:
        """Most recently used: the chain's first block last, so a prefix outlives its extensions in the LRU order."""
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def match(self, ids: list[int], salt: int = 0) -> int:
        """Tokens of `ids` whose K/V are mapped, leaving at least one token to prefill (a multiple of the block)."""
        return len(self._chain(ids, len(ids) - 1, salt)) * self.block

    def hit_blocks(self, ids: list[int], salt: int = 0) -> tuple[int, int]:
        """(blocks a hit would share, how many of those only the cache holds now): sharing those
        takes them out of the reclaimable blocks, so admission counts them as claimed."""
        blocks = [block for _, block in self._chain(ids, len(ids) - 1, salt)]
        idle = sum(1 for block in blocks if self.pool.refcount(block) == 1)
        return len(blocks), idle

    def take(self, ids: list[int], salt: int = 0) -> list[int]:
        """The block ids of the hit `match` finds for `ids` (none: []), each pinned by one reference for the caller.

        The pin keeps them from eviction until a row shares them (`pool.share`), after
        which the caller drops it (`pool.drop`).
        """
        chain = self._chain(ids, len(ids) - 1, salt)
        blocks = [block for _, block in chain]
        self.pool.retain(blocks)
        self._refresh([key for key, _ in chain])
        self.hits += len(blocks) * self.block
        return blocks

    def store(self, ids: list[int], blocks: list[int], salt: int = 0) -> None:
        """Map the full blocks of a prompt just prefilled; `blocks` is its row's block table, in order."""
        keys = chain_keys(ids, len(ids), self.block, salt)
        for (key, tokens), block in zip(keys, blocks):
            entry = self._blocks.get(key)
            if entry is not None and entry[0] == tokens:
                continue  # mapped already (this row shares it, or computed its own copy alongside)
            if entry is not None:  # a hash collision: the newer block wins
                self.pool.unhold(entry[1])
            self.pool.hold(block)
            self._blocks[key] = (tokens, block)
        self._refresh([key for key, _ in keys])

    def evict(self, count: int) -> int:
        """Give up to `count` blocks that no row uses back to the pool, least recently used first; returns how many."""
        freed = []
        for key, (_, block) in self._blocks.items():
            if len(freed) >= count:
                break
            if self.pool.refcount(block) == 1:  # only this cache refers to it
                freed.append((key, block))
        for key, block in freed:
            del self._blocks[key]
            self.pool.unhold(block)
        self.evicted += len(freed)
        return len(freed)

    def clear(self) -> None:
        """Let every block go (those rows still use stay with them)."""
        for _, block in self._blocks.values():
            self.pool.unhold(block)
        self._blocks.clear()
