"""Paged key/value cache (M9, I2): a shared pool of fixed-size blocks and a block table per row.

`KVCache` reserves `max_len` positions for every row whether the request will use 20 of
them or 2,000, so a memory budget holds budget / (max_len x bytes per position) rows. A
server does not know how long an answer will be, and most rows never come near
`max_len`. `PagedKVCache` instead splits the memory into blocks of `block_size`
positions that any row may use:

- the pool holds k and v as [n_layer, n_blocks, n_kv_head, block_size, head_dim];
- each row has a block table (row position p lives in block table[row, p // block_size]
  at offset p % block_size) and claims a block only when its tokens reach it;
- a finished row gives its blocks back to the free list at once, and a row moved to
  another slot moves its table, not its keys and values.

Memory is therefore accounted in blocks, and waste is at most block_size - 1 positions
per row instead of everything a row does not use of `max_len`.

The model sees the same object contract as `KVCache`: `rows(start, stop)` gives a view
whose `update(layer, k, v, start, end)` stores the new keys/values and returns every key
and value up to `end` as contiguous [B, kv_heads, end, head_dim] tensors, so attention is
unchanged. Those are gathered through the block tables (one `index_select` per layer and
tensor), where the preallocated cache returns a slice without copying: the price of
paging without a kernel that reads blocks in place (what vLLM's PagedAttention is).

Block 0 of the pool is never handed out. Table entries a row has not claimed point to
it, so a padded prefill's writes past a row's tokens land there, and reads of positions
a row does not have (masked out by attention, since they lie past the row's position)
find finite values in it.

Blocks are reference counted, so that one block can serve several rows: requests that
begin with the same system prompt can all point their tables at the blocks that hold its
keys and values (`PagedPrefixCache`, lmforge/infer/prefix_cache.py, keeps them between
requests). A block's count is the number of row tables that list it, plus one while the
prefix cache holds it, plus the pins a caller took (`retain`) to keep it alive between
looking it up and giving it to a row; it goes back to the free list when the count
reaches zero. A shared block is only ever read: it holds full blocks of positions before
the first one a row computes, and every write checks that the blocks it lands in belong
to the writing row alone (or are the scratch block), so a bug that would corrupt another
request's keys fails loudly instead. Blocks that only the prefix cache holds are
reclaimable: `free_blocks` counts them, and a claim that finds the free list short asks
the cache (`evictor`) to give back its least recently used ones.
"""

from __future__ import annotations

from typing import Callable

import torch

from .kv_cache import zeros

SCRATCH = 0  # the pool block that unclaimed table entries point to


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks holding `tokens` positions."""
    return -(-tokens // block_size)


class PagedKVCache:
    """Keys and values of up to `max_rows` rows of up to `max_len` positions, in `n_blocks` shared blocks."""

    def __init__(
        self,
        n_layer: int,
        n_blocks: int,
        block_size: int,
        max_rows: int,
        max_len: int,
        n_kv_head: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if block_size < 1 or n_blocks < 1 or max_rows < 1 or max_len < 1:
            raise ValueError("block_size, n_blocks, max_rows and max_len must be at least 1")
        self.block_size = block_size
        self.max_len = max_len
        self.max_rows = max_rows
        shape = (n_layer, n_blocks + 1, n_kv_head, block_size, head_dim)  # + the scratch block
        self.k = zeros(shape, dtype, device)
        self.v = zeros(shape, dtype, device)
        self.tables = torch.full((max_rows, blocks_for(max_len, block_size)), SCRATCH, dtype=torch.long,
                                 device=device)
        self._claimed: list[list[int]] = [[] for _ in range(max_rows)]  # the blocks of each row, in order
        # Popped from the end: the lowest block numbers go out first, which keeps a test's
        # accounting easy to read and has no other meaning.
        self._free = list(range(n_blocks, SCRATCH, -1))
        self._refs = [0] * (n_blocks + 1)  # references to each block: row tables, the prefix cache, pins
        self._held: set[int] = set()  # blocks the prefix cache holds (one reference each)
        self._idle = 0  # held blocks nothing else refers to: reclaimable
        # Called with a number of blocks when a claim finds the free list short: gives back
        # up to that many reclaimable blocks (set by the prefix cache that holds them).
        self.evictor: Callable[[int], int] | None = None

    @classmethod
    def for_model(cls, config, n_blocks: int, block_size: int, max_rows: int, max_len: int, dtype: torch.dtype,
                  device) -> "PagedKVCache":
        return cls(config.n_layer, n_blocks, block_size, max_rows, max_len, config.n_kv_head, config.head_dim,
                   dtype, device)

    @staticmethod
    def block_bytes(config, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block (k and v, every layer) of a model with this config."""
        per_position = 2 * config.n_layer * config.n_kv_head * config.head_dim * torch.empty(0, dtype=dtype).element_size()
        return per_position * block_size

    # ------------------------------------------------------------ accounting
    @property
    def total_blocks(self) -> int:
        return self.k.shape[1] - 1

    @property
    def free_blocks(self) -> int:
        """Blocks a claim can get: the free list and the blocks only the prefix cache holds."""
        return len(self._free) + self.reclaimable_blocks

    @property
    def unreferenced_blocks(self) -> int:
        """Blocks on the free list: nothing refers to them."""
        return len(self._free)

    @property
    def reclaimable_blocks(self) -> int:
        """Blocks only the prefix cache holds, which it gives back when a claim needs them."""
        return self._idle if self.evictor is not None else 0

    def refcount(self, block: int) -> int:
        return self._refs[block]

    @property
    def nbytes(self) -> int:
        """The pool's bytes, the scratch block included (the tables are negligible)."""
        return self.k.numel() * self.k.element_size() * 2

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    def capacity(self, row: int) -> int:
        """Positions this row can hold without claiming another block."""
        return len(self._claimed[row]) * self.block_size

    def blocks_of(self, row: int) -> list[int]:
        return list(self._claimed[row])

    def ensure(self, row: int, length: int) -> bool:
        """Claim blocks until `row` holds `length` positions; False (nothing claimed) if too few are free."""
        need = self.blocks_for(min(length, self.max_len)) - len(self._claimed[row])
        if need <= 0:
            return True
        if need > self.free_blocks:
            return False
        if need > len(self._free):  # reclaim the prefix cache's least recently used idle blocks first
            self.evictor(need - len(self._free))
            if need > len(self._free):
                return False
        claimed = self._claimed[row]
        new = [self._free.pop() for _ in range(need)]
        for block in new:
            self._refs[block] = 1
        self.tables[row, len(claimed): len(claimed) + need] = torch.tensor(new, dtype=torch.long)
        claimed.extend(new)
        return True

    def share(self, row: int, blocks: list[int]) -> None:
        """Point the first table entries of `row` (which must hold no block) at existing blocks, by reference.

        The row will read them and never write them: they hold positions before the first
        one it computes (see `PagedRows.update`'s check).
        """
        if self._claimed[row]:
            raise ValueError(f"row {row} still holds {len(self._claimed[row])} blocks")
        self.retain(blocks)
        self.tables[row, :len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        self._claimed[row] = list(blocks)

    def release(self, row: int) -> int:
        """Drop `row`'s reference to each of its blocks (those nothing else refers to are freed); returns how many."""
        claimed = self._claimed[row]
        count = len(claimed)
        self.drop(reversed(claimed))
        self.tables[row, :count] = SCRATCH
        self._claimed[row] = []
        return count

    def release_all(self) -> None:
        """Every row's blocks (the prefix cache keeps its own references)."""
        for row in range(self.max_rows):
            self.release(row)

    def retain(self, blocks) -> None:
        """One more reference to each block (a row's table, or a pin kept until a row takes it over)."""
        for block in blocks:
            if self._refs[block] < 1:
                raise ValueError(f"block {block} is free: nothing to share")
            if self._refs[block] == 1 and block in self._held:
                self._idle -= 1
            self._refs[block] += 1

    def drop(self, blocks) -> None:
        """One reference fewer to each block; a block nothing refers to any more goes to the free list."""
        for block in blocks:
            refs = self._refs[block] - 1
            if refs < 0:
                raise ValueError(f"block {block} has no reference to drop")
            self._refs[block] = refs
            if refs == 0:
                self._free.append(block)
            elif refs == 1 and block in self._held:
                self._idle += 1

    def hold(self, block: int) -> None:
        """The prefix cache's reference to a block a row has just filled (held once at most)."""
        if block in self._held or self._refs[block] < 1:
            raise ValueError(f"block {block} is already held or not claimed")
        self._held.add(block)
        self._refs[block] += 1

    def unhold(self, block: int) -> None:
        """The prefix cache lets a block go; freed if no row refers to it."""
        self._held.remove(block)
        if self._refs[block] == 1:
            self._idle -= 1
        self._refs[block] -= 1
        if not self._refs[block]:
            self._free.append(block)

    def check_exclusive(self, blocks: torch.Tensor) -> None:
        """Raise if a write is about to land in a block another row or the prefix cache also refers to."""
        shared = [b for b in torch.unique(blocks).tolist() if b != SCRATCH and self._refs[b] != 1]
        if shared:
            raise RuntimeError(f"a write into shared KV blocks {shared} (references "
                               f"{[self._refs[b] for b in shared]}): shared blocks are read-only")

    def move(self, src: int, dst: int) -> None:
        """Row `src`'s blocks become row `dst`'s (which must hold none): no keys or values are copied."""
        if src == dst:
            return
        if self._claimed[dst]:
            raise ValueError(f"row {dst} still holds {len(self._claimed[dst])} blocks")
        count = len(self._claimed[src])
        self.tables[dst, :count] = self.tables[src, :count]
        self.tables[src, :count] = SCRATCH
        self._claimed[dst], self._claimed[src] = self._claimed[src], []

    # ------------------------------------------------------------ contents
    def rows(self, start: int, stop: int) -> "PagedRows":
        """The view the model writes and reads through, for rows start..stop."""
        return PagedRows(self, start, stop)

    def read_row(self, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions 0..length-1 of `row`, contiguous [n_layer, kv_heads, length, d] copies."""
        index = self._flat_index(self.tables[row: row + 1], torch.arange(length, device=self.tables.device))
        layers, _, heads, _, dim = self.k.shape
        k = self.k.view(layers, -1, dim).index_select(1, index).view(layers, heads, length, dim)
        v = self.v.view(layers, -1, dim).index_select(1, index).view(layers, heads, length, dim)
        return k, v

    def write_row(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store [n_layer, kv_heads, L, d] keys/values at positions 0..L-1 of `row` (its blocks claimed)."""
        length = k.shape[2]
        if self.capacity(row) < length:
            raise ValueError(f"row {row} holds {self.capacity(row)} positions, {length} written")
        self.check_exclusive(self.tables[row, :self.blocks_for(length)])
        index = self._flat_index(self.tables[row: row + 1], torch.arange(length, device=self.tables.device))
        layers, _, _, _, dim = self.k.shape
        self.k.view(layers, -1, dim).index_copy_(1, index, k.reshape(layers, -1, dim))
        self.v.view(layers, -1, dim).index_copy_(1, index, v.reshape(layers, -1, dim))

    def _block_index(self, tables: torch.Tensor, end: int) -> torch.Tensor:
        """Flat [B * heads * blocks] index of the (block, head) runs holding positions 0..end-1 of each row,
        into one layer's pool viewed as [blocks * heads, block_size * d]."""
        heads = self.k.shape[2]
        blocks = tables[:, : blocks_for(end, self.block_size)]
        head = torch.arange(heads, device=tables.device).view(1, heads, 1)
        return (blocks.unsqueeze(1) * heads + head).reshape(-1)

    def _flat_index(self, tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat [B * heads * P] index into one layer's pool viewed as [blocks * heads * block_size, d].

        `positions` is [P] (every row the same) or [B, P]; the order is row, head, position,
        the memory order of a [B, heads, P, d] tensor.
        """
        heads, size = self.k.shape[2], self.block_size
        if positions.dim() == 1:
            positions = positions.expand(tables.shape[0], -1)
        blocks = tables.gather(1, positions // size)  # [B, P]
        head = torch.arange(heads, device=tables.device).view(1, heads, 1)
        return ((blocks.unsqueeze(1) * heads + head) * size + (positions % size).unsqueeze(1)).reshape(-1)


class PagedRows:
    """Rows start..stop of a `PagedKVCache`, seen by the model as a `KVCache`.

    A view lives for one forward: the flat indices of its writes and reads are computed by
    the first layer and reused by the others (the block tables do not change inside a
    forward: the scheduler claims blocks before it runs one).
    """

    def __init__(self, pool: PagedKVCache, start: int, stop: int) -> None:
        self.pool = pool
        self.start, self.stop = start, stop
        self.max_len = pool.max_len
        self._write: tuple | None = None  # (key, flat index)
        self._read: tuple | None = None

    @property
    def batch(self) -> int:
        return self.stop - self.start

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`KVCache.update`'s contract: store new k/v ([B, kv_heads, L, d]) and return all keys/values up to `end`."""
        pool = self.pool
        tables = pool.tables[self.start: self.stop]
        batch, heads, length, dim = k.shape
        key = (start if isinstance(start, int) else id(start), length)
        if self._write is None or self._write[0] != key:
            if isinstance(start, int):
                positions = torch.arange(start, start + length, device=k.device)
            else:
                positions = start.view(-1, 1)
            pool.check_exclusive(tables.gather(1, (positions // pool.block_size).expand(batch, -1)))
            self._write = (key, pool._flat_index(tables, positions))
        if self._read is None or self._read[0] != end:
            self._read = (end, pool._block_index(tables, end))
        k_pool, v_pool = pool.k[layer].view(-1, dim), pool.v[layer].view(-1, dim)
        k_pool.index_copy_(0, self._write[1], k.reshape(-1, dim))
        v_pool.index_copy_(0, self._write[1], v.reshape(-1, dim))
        # Read whole (block, head) runs of block_size x d values: few, large copies.
        read, size = self._read[1], pool.block_size
        span = read.numel() // (batch * heads) * size
        k_blocks, v_blocks = pool.k[layer].view(-1, size * dim), pool.v[layer].view(-1, size * dim)
        return (k_blocks.index_select(0, read).view(batch, heads, span, dim)[:, :, :end],
                v_blocks.index_select(0, read).view(batch, heads, span, dim)[:, :, :end])


def contiguous_rows_in(budget_bytes: int, config, max_len: int, dtype: torch.dtype) -> int:
    """Rows of `max_len` positions a preallocated `KVCache` fits in `budget_bytes`."""
    return budget_bytes // PagedKVCache.block_bytes(config, max_len, dtype)


__all__ = ["PagedKVCache", "PagedRows", "blocks_for", "contiguous_rows_in"]
