"""A paged KV cache: one block pool per decoder layer, shared by every sequence in flight.

Layout, per layer: ``keys`` and ``values`` pools ``[kv_heads, capacity, BLOCK_TOKENS, head_dim]``
on that layer's device. A sequence owns a list of blocks (its block table); token ``p`` of it
lives in block ``table[p // BLOCK_TOKENS]`` at offset ``p % BLOCK_TOKENS``. Memory therefore
follows each sequence's own length (rounded up to a block), not the longest row's: a long
request no longer widens every other row as a shared column counter did.

A forward pass is planned first (:meth:`PagedKVCache.begin`: which sequences, how many new
tokens each); every layer's :meth:`~_PagedLayer.update` then writes the new keys and values
into their slots with one ``index_copy_`` and returns ``[rows, kv_heads, kv_len, head_dim]``
views for attention: the new states themselves when every row starts at position 0 (a prefill),
a slice of the pool when one sequence's blocks are consecutive (batch-1 decoding, no copy), and
otherwise one gather of the rows' blocks, right-padded to the longest row. The caller masks
each row's columns from its length on. Padding and unused slots always hold finite values
(the pools are zero-filled and only ever receive keys and values), so a masked column
contributes exactly nothing.

Reservations make the budget a guarantee: :meth:`PagedKVCache.open` reserves the most blocks a
sequence can ever need, and fails when the reservations would exceed ``max_blocks``; blocks are
then allocated as the sequence grows, and a sequence never allocates past its reservation. The
pools grow by doubling (up to ``max_blocks``) and shrink when a sequence closes and a quarter or
less of the pool is in use (live blocks are moved down first), so one long request that ended
does not keep its memory. All of it is freed when the last sequence closes.

Only the scheduler thread touches a cache; nothing here is thread-safe.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = [
    "BLOCK_TOKENS",
    "KV_MEMORY_FRACTION",
    "PagedKVCache",
    "available_memory",
    "blocks_for",
    "default_kv_cache_bytes",
    "kv_bytes_per_token",
]

BLOCK_TOKENS = 16
"""Tokens per block. Small enough that a short request wastes little (at most 15 slots per
sequence and layer), large enough that a block table stays short and a gather copies whole
``[BLOCK_TOKENS, head_dim]`` tiles."""

KV_MEMORY_FRACTION = 0.25
"""Default KV budget: this fraction of the memory available on the engine's device when the
scheduler is created (after the weights are loaded). A quarter leaves room for activations
(a prefill chunk's, the LM head's), the pools' growth (old and new pool coexist while one is
copied) and other processes. With several workers per machine, each takes a quarter of what is
left when it starts: set ``FLEXGATE_KV_CACHE_BYTES`` explicitly there."""

_SHRINK_BELOW = 4
"""A pool shrinks (to twice the blocks in use) when at most ``1 / _SHRINK_BELOW`` of it is in
use; with growth by doubling this hysteresis keeps a steady load from resizing back and forth."""


def blocks_for(tokens: int) -> int:
    """Blocks that hold ``tokens`` tokens."""
    return -(-max(tokens, 0) // BLOCK_TOKENS)


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take over all layers of a model with ``config``."""
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )
    return 2 * int(config.num_hidden_layers) * heads * head_dim * dtype.itemsize


def available_memory(device: torch.device) -> int:
    """Bytes available for new allocations on ``device``: free GPU memory for a CUDA device,
    otherwise the host's available memory (``MemAvailable``, else the free physical pages)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def default_kv_cache_bytes(device: torch.device) -> int:
    """The default KV budget on ``device`` (see :data:`KV_MEMORY_FRACTION`)."""
    return int(available_memory(device) * KV_MEMORY_FRACTION)


@dataclass
class _Pass:
    """One planned forward pass: what every layer's update writes and returns."""

    rows: int
    q: int
    kv_len: int
    """Columns attention sees: the longest row's length after this pass."""
    query_offset: int
    """Position of the first query column among the ``kv_len`` columns (``kv_len - q``)."""
    fresh: bool
    """Every row starts at 0: attention needs only the states computed in this pass."""
    slots: list[int]
    """Pool slot (``block * BLOCK_TOKENS + offset``) of every new token, row-major."""
    gather: list[int] | None
    """``rows * n_blocks`` block ids to gather (short rows padded with block 0)."""
    first_block: int | None
    """One row whose blocks are consecutive from this id: attention reads a slice."""
    n_blocks: int
    handles: list[int]
    _on: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The slot and gather indices on ``device`` (made once per pass and device)."""
        got = self._on.get(device)
        if got is None:
            slots = torch.tensor(self.slots, dtype=torch.long, device=device)
            gather = (
                None
                if self.gather is None
                else torch.tensor(self.gather, dtype=torch.long, device=device)
            )
            got = self._on[device] = (slots, gather)
        return got


class _PagedLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]
    """One decoder layer's pools; block tables and the pass come from the owner."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, owner: PagedKVCache) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._owner = owner
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        cap = self._owner.capacity
        heads, dim, vdim = key_states.shape[1], key_states.shape[-1], value_states.shape[-1]
        self.keys = key_states.new_zeros((heads, cap, BLOCK_TOKENS, dim))
        self.values = value_states.new_zeros((heads, cap, BLOCK_TOKENS, vdim))
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = self._owner.current
        if p is None:
            raise RuntimeError("plan the pass with PagedKVCache.begin() before the forward")
        rows, q = key_states.shape[0], key_states.shape[2]
        if rows != p.rows or q != p.q:
            raise RuntimeError(
                f"the pass was planned for {p.rows} rows of {p.q} tokens; "
                f"got {rows} rows of {q} tokens"
            )
        if self.keys is None or self.values is None:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        slots, gather = p.on(self.keys.device)
        out: list[torch.Tensor] = []
        for pool, new in ((self.keys, key_states), (self.values, value_states)):
            heads, cap, _, dim = pool.shape
            flat = pool.view(heads, cap * BLOCK_TOKENS, dim)
            flat.index_copy_(1, slots, new.transpose(0, 1).reshape(heads, rows * q, dim))
            if p.fresh:
                out.append(new)
            elif p.first_block is not None:
                span = pool[:, p.first_block : p.first_block + p.n_blocks]
                out.append(span.reshape(heads, -1, dim)[:, : p.kv_len].unsqueeze(0))
            else:
                assert gather is not None
                picked = pool.index_select(1, gather).view(heads, rows, -1, dim)
                out.append(picked[:, :, : p.kv_len].transpose(0, 1))
        return out[0], out[1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        p = self._owner.current
        return (query_length, 0) if p is None else (p.kv_len, 0)

    def get_seq_length(self) -> int:
        p = self._owner.current
        return 0 if p is None else p.query_offset

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False

    def resize(self, capacity: int, moves: tuple[list[int], list[int]] | None = None) -> None:
        """Reallocate the pools to ``capacity`` blocks, keeping the blocks below both sizes;
        ``moves`` (sources, destinations) copies live blocks down first (a shrink)."""
        if self.keys is None or self.values is None:
            return
        for name in ("keys", "values"):
            old: torch.Tensor = getattr(self, name)
            if moves is not None and moves[0]:
                src = torch.tensor(moves[0], dtype=torch.long, device=old.device)
                dst = torch.tensor(moves[1], dtype=torch.long, device=old.device)
                old.index_copy_(1, dst, old.index_select(1, src))
            keep = min(capacity, old.shape[1])
            if capacity <= old.shape[1]:
                new = old[:, :capacity].clone(memory_format=torch.contiguous_format)
            else:
                new = old.new_zeros((old.shape[0], capacity, *old.shape[2:]))
                new[:, :keep].copy_(old[:, :keep])
            setattr(self, name, new)


class PagedKVCache(Cache):
    """Block pools for every sequence in flight, addressed by handles.

    The caller (the decoding loop) opens a handle per sequence with its reservation, plans
    each forward pass with :meth:`begin` (rows in the order of the pass's batch), runs the
    model with this cache, then calls :meth:`commit` (or :meth:`cancel` when it failed), and
    closes a handle when its sequence leaves. It passes position ids and an attention mask that
    hides every column at or past a row's length after the pass (a prefill whose rows all
    start at 0 may use the model's own causal mask).
    """

    def __init__(self, num_layers: int, *, max_blocks: int | None = None) -> None:
        if max_blocks is not None and max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        self.max_blocks = max_blocks
        self.capacity = 0
        """Blocks allocated in every layer's pool."""
        self.current: _Pass | None = None
        self._free: list[int] = []  # a heap: the lowest free block first
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._reserved: dict[int, int] = {}
        self._reserved_total = 0
        self._next_handle = 0
        super().__init__(layers=[_PagedLayer(self) for _ in range(num_layers)])

    @property
    def paged_layers(self) -> list[_PagedLayer]:
        return [layer for layer in self.layers if isinstance(layer, _PagedLayer)]

    # -- accounting -----------------------------------------------------------------------------

    @property
    def reserved_blocks(self) -> int:
        return self._reserved_total

    @property
    def used_blocks(self) -> int:
        return self.capacity - len(self._free)

    @property
    def allocated_bytes(self) -> int:
        """Bytes the pools hold now, over all layers."""
        total = 0
        for layer in self.paged_layers:
            for pool in (layer.keys, layer.values):
                if pool is not None:
                    total += pool.numel() * pool.element_size()
        return total

    @property
    def sequences(self) -> int:
        return len(self._tables)

    def can_reserve(self, tokens: int) -> bool:
        """Whether a new sequence of up to ``tokens`` tokens fits beside the reservations."""
        return self.max_blocks is None or self._reserved_total + blocks_for(tokens) <= (
            self.max_blocks
        )

    def length(self, handle: int) -> int:
        """Tokens of sequence ``handle`` held in the cache."""
        return self._lengths[handle]

    # -- sequences ------------------------------------------------------------------------------

    def open(self, tokens: int) -> int:
        """A new, empty sequence that may grow to ``tokens`` tokens; returns its handle.
        Raises ``ValueError`` when the reservation does not fit."""
        if not self.can_reserve(tokens):
            raise ValueError(
                f"a sequence of {tokens} tokens needs {blocks_for(tokens)} KV blocks; "
                f"{self._reserved_total} of {self.max_blocks} are reserved"
            )
        handle = self._next_handle
        self._next_handle += 1
        self._tables[handle] = []
        self._lengths[handle] = 0
        self._reserved[handle] = blocks_for(tokens)
        self._reserved_total += self._reserved[handle]
        return handle

    def close(self, handle: int) -> None:
        """Forget sequence ``handle`` and free its blocks (the pools may shrink)."""
        if self.current is not None:
            raise RuntimeError("a sequence cannot close while a pass is planned")
        for block in self._tables.pop(handle):
            heapq.heappush(self._free, block)
        del self._lengths[handle]
        self._reserved_total -= self._reserved.pop(handle)
        self._maybe_shrink()

    # -- passes ---------------------------------------------------------------------------------

    def begin(self, handles: Sequence[int], q: int) -> None:
        """Plan a pass that appends ``q`` tokens to each of ``handles`` (the batch's rows, in
        order), allocating the blocks it needs."""
        if self.current is not None:
            raise RuntimeError("a pass is already planned")
        if not handles or q < 1:
            raise ValueError("a pass needs at least one row and one token")
        starts = [self._lengths[h] for h in handles]
        for h, start in zip(handles, starts, strict=True):
            need = blocks_for(start + q)
            if need > self._reserved[h]:
                raise RuntimeError(
                    f"sequence {h} would hold {start + q} tokens, past its reservation of "
                    f"{self._reserved[h] * BLOCK_TOKENS}"
                )
        self._ensure_free(
            sum(
                max(0, blocks_for(s + q) - len(self._tables[h]))
                for h, s in zip(handles, starts, strict=True)
            )
        )
        slots: list[int] = []
        for h, start in zip(handles, starts, strict=True):
            table = self._tables[h]
            while len(table) < blocks_for(start + q):
                table.append(heapq.heappop(self._free))
            slots.extend(
                table[pos // BLOCK_TOKENS] * BLOCK_TOKENS + pos % BLOCK_TOKENS
                for pos in range(start, start + q)
            )
        kv_len = max(starts) + q
        n_blocks = blocks_for(kv_len)
        fresh = all(s == 0 for s in starts)
        first: int | None = None
        gather: list[int] | None = None
        if not fresh:
            table = self._tables[handles[0]][:n_blocks]
            if len(handles) == 1 and table == list(range(table[0], table[0] + n_blocks)):
                first = table[0]
            else:
                gather = []
                for h in handles:
                    t = self._tables[h][:n_blocks]
                    gather.extend(t)
                    gather.extend([0] * (n_blocks - len(t)))
        self.current = _Pass(
            rows=len(handles),
            q=q,
            kv_len=kv_len,
            query_offset=kv_len - q,
            fresh=fresh,
            slots=slots,
            gather=gather,
            first_block=first,
            n_blocks=n_blocks,
            handles=list(handles),
        )

    def commit(self) -> None:
        """The planned pass ran: its tokens now count in their sequences' lengths."""
        p = self.current
        if p is None:
            raise RuntimeError("no pass is planned")
        for h in p.handles:
            self._lengths[h] += p.q
        self.current = None

    def cancel(self) -> None:
        """The planned pass failed: lengths stay as they were (its blocks stay allocated to
        their sequences, within their reservations)."""
        self.current = None

    # -- pools ----------------------------------------------------------------------------------

    def _ensure_free(self, blocks: int) -> None:
        if len(self._free) >= blocks:
            return
        need = self.capacity + blocks - len(self._free)
        new = max(need, 2 * self.capacity)
        if self.max_blocks is not None:
            new = max(need, min(new, self.max_blocks))
        self._resize(new)

    def _resize(self, capacity: int, moves: tuple[list[int], list[int]] | None = None) -> None:
        for layer in self.paged_layers:
            layer.resize(capacity, moves)
        used = {b for table in self._tables.values() for b in table}
        self._free = [b for b in range(capacity) if b not in used]
        heapq.heapify(self._free)
        self.capacity = capacity

    def _maybe_shrink(self) -> None:
        used = self.used_blocks
        if used == 0:
            for layer in self.paged_layers:
                layer.reset()
            self.capacity = 0
            self._free = []
            return
        if used * _SHRINK_BELOW > self.capacity:
            return
        capacity = 2 * used
        low_free = iter(sorted(b for b in self._free if b < capacity))
        src: list[int] = []
        dst: list[int] = []
        for table in self._tables.values():
            for j, block in enumerate(table):
                if block >= capacity:
                    src.append(block)
                    dst.append(next(low_free))
                    table[j] = dst[-1]
        self._resize(capacity, (src, dst))
