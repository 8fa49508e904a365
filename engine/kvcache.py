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
otherwise, right-padded to the longest row:

- for a decoding step (one token per row), the staging buffers: per layer ``[rows, kv_heads,
  columns, head_dim]``, the decoding batch's rows in the order of its steps. A step appends each
  row's token there and gathers from the pool only the rows that joined, moved up (a row
  before them left) or fell behind, so a steady step copies nothing proportional to the
  context (re-gathering every row at every step tripled the memory traffic of attention at
  long contexts, which is memory-bound: read, write, read again). They cost memory beside the
  pools, rows x the longest row, so they are used only while that is at most
  :data:`STAGING_SHARE` of the pools;
- otherwise (a chunk of a prompt, whose gather is paid once for many tokens, or one long row
  among short ones), one gather of the rows' blocks into a scratch buffer that every layer
  reuses.

Staging and scratch buffers grow geometrically, so a step at a length already seen allocates
nothing; staging is dropped when the pools shrink below it, the scratch buffer whenever a
sequence closes. The caller masks each row's columns from its length on. Padding and unused slots
always hold finite values (pools and staging are zero-filled and only ever receive keys and
values; a gather writes every column it returns), so a masked column contributes exactly
nothing.

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
from typing import Any, Literal

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

STAGING_SHARE = 1.0
"""The staging buffers (rows x the longest row's columns, every layer) may hold at most this
share of the tokens the pools hold, so a decoding batch of rows of similar lengths (the common
case) is staged and one long row among short ones (where staging would hold mostly padding)
is gathered instead. Staging is memory beside the budget, which bounds the pools."""

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
    mode: Literal["fresh", "slice", "stage", "gather"]
    """What attention reads: ``fresh`` (every row starts at 0: the states computed in this
    pass), ``slice`` (one row on consecutive blocks: a view of the pool), ``stage`` (the
    staging buffers, rows appended or refilled) or ``gather`` (the shared scratch buffer)."""
    slots: list[int]
    """Pool slot (``block * BLOCK_TOKENS + offset``) of every new token, row-major."""
    gather: list[int] | None
    """Block ids to gather, ``len(gathered) * gather_blocks`` (short rows padded with block
    0): every row (``gather``) or the rows to refill (``stage``)."""
    gather_blocks: int
    first_block: int | None
    """``slice``: the first of the row's consecutive blocks."""
    n_blocks: int
    handles: list[int]
    appended: list[int] = field(default_factory=list)
    """``stage``: rows whose staged keys and values are current up to this pass (only its
    token is written)."""
    refilled: list[int] = field(default_factory=list)
    """``stage``: rows gathered from the pool (new in the batch, moved, or out of date)."""
    positions: list[int] = field(default_factory=list)
    """``stage``: every appended row's position (its column for the new token)."""
    stage_shape: tuple[int, int] = (0, 0)
    """``stage``: rows and columns every layer's staging buffers have for this pass."""
    keep: tuple[int, int] = (0, 0)
    """``stage``: rows and columns of the staging buffers still valid when they grow."""
    previous_shape: tuple[int, int] = (0, 0)
    """``stage``: the staging buffers' shape before this pass (restored if it never ran)."""
    touched: bool = False
    """``stage``: a layer has written its staging buffers for this pass."""
    _on: dict[torch.device, _Indices] = field(default_factory=dict)

    def on(self, device: torch.device) -> _Indices:
        """The index tensors on ``device`` (made once per pass and device)."""
        got = self._on.get(device)
        if got is None:

            def tensor(values: list[int]) -> torch.Tensor:
                return torch.tensor(values, dtype=torch.long, device=device)

            appended = refilled = positions = None
            if self.mode == "stage":
                if self.appended:
                    appended, positions = tensor(self.appended), tensor(self.positions)
                if self.refilled:
                    refilled = tensor(self.refilled)
            got = self._on[device] = _Indices(
                slots=tensor(self.slots),
                gather=None if self.gather is None else tensor(self.gather),
                appended=appended,
                positions=positions,
                refilled=refilled,
            )
        return got


@dataclass
class _Indices:
    slots: torch.Tensor
    gather: torch.Tensor | None
    appended: torch.Tensor | None
    positions: torch.Tensor | None
    refilled: torch.Tensor | None
    _flat: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    _pool: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def pool_slots(self, rows: int, heads: int, slots: int) -> torch.Tensor:
        """Where the new tokens go in a pool of ``heads`` x ``slots`` seen as ``[heads *
        slots, head_dim]``, in the order of ``[rows, heads, q]``."""
        got = self._pool.get((heads, slots))
        if got is None:
            head = torch.arange(heads, device=self.slots.device) * slots
            per_row = self.slots.view(rows, 1, -1)
            got = self._pool[heads, slots] = (per_row + head.view(1, heads, 1)).reshape(-1)
        return got

    def appended_slots(self, heads: int, cols: int) -> torch.Tensor:
        """Where the appended rows' tokens go in a staging buffer of ``heads`` x ``cols``
        seen as ``[rows * heads * cols, head_dim]``: row-major over (row, head)."""
        got = self._flat.get((heads, cols))
        if got is None:
            assert self.appended is not None and self.positions is not None
            head = torch.arange(heads, device=self.appended.device) * cols
            base = self.appended * (heads * cols) + self.positions
            got = self._flat[heads, cols] = (base.unsqueeze(1) + head).reshape(-1)
        return got


class _PagedLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]
    """One decoder layer's pools and staging buffers; block tables and the pass come from the
    owner."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, owner: PagedKVCache) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._owner = owner
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.staged_keys: torch.Tensor | None = None
        """``[rows, kv_heads, columns, head_dim]``: the decoding batch's keys, row by row in
        the order of its passes (see :class:`PagedKVCache`)."""
        self.staged_values: torch.Tensor | None = None

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
        idx = p.on(self.keys.device)
        if p.mode == "stage":
            p.touched = True
            self._fit_staging(p)
        out: list[torch.Tensor] = []
        for n, (pool, new) in enumerate(((self.keys, key_states), (self.values, value_states))):
            heads, cap, _, dim = pool.shape
            # one index_copy_ of the states as they come ([rows, heads, q, dim], no transpose)
            pool.view(heads * cap * BLOCK_TOKENS, dim).index_copy_(
                0, idx.pool_slots(rows, heads, cap * BLOCK_TOKENS), new.reshape(-1, dim)
            )
            if p.mode == "fresh":
                out.append(new)
            elif p.mode == "slice":
                assert p.first_block is not None
                span = pool[:, p.first_block : p.first_block + p.n_blocks]
                out.append(span.reshape(heads, -1, dim)[:, : p.kv_len].unsqueeze(0))
            elif p.mode == "gather":
                assert idx.gather is not None
                picked = self._gather(pool, idx.gather, n).view(heads, rows, -1, dim)
                out.append(picked[:, :, : p.kv_len].transpose(0, 1))
            else:
                stage = self.staged_keys if n == 0 else self.staged_values
                assert stage is not None
                if idx.appended is not None:
                    # q == 1: each appended row's token goes to its own column, one
                    # index_copy_ into the flat buffer (advanced indexing over rows and
                    # columns would restride the whole buffer: a cost that grows with it)
                    src = new if len(p.appended) == rows else new.index_select(0, idx.appended)
                    r_cap, _, c_cap, _ = stage.shape
                    stage.view(r_cap * heads * c_cap, dim).index_copy_(
                        0, idx.appended_slots(heads, c_cap), src.reshape(-1, dim)
                    )
                if idx.refilled is not None:
                    assert idx.gather is not None
                    cols = p.gather_blocks * BLOCK_TOKENS
                    picked = self._gather(pool, idx.gather, n)
                    picked = picked.view(heads, len(p.refilled), cols, dim).transpose(0, 1)
                    stage[:, :, :cols].index_copy_(0, idx.refilled, picked)
                out.append(stage[:rows, :, : p.kv_len])
        return out[0], out[1]

    def _gather(self, pool: torch.Tensor, blocks: torch.Tensor, n: int) -> torch.Tensor:
        """``pool``'s ``blocks`` into the owner's scratch buffer ``n`` (0: keys, 1: values):
        ``[kv_heads, len(blocks), BLOCK_TOKENS, head_dim]``, valid until the next layer."""
        shape = (pool.shape[0], blocks.numel(), BLOCK_TOKENS, pool.shape[-1])
        buf = self._owner.scratch(pool, n, shape)
        torch.index_select(pool, 1, blocks, out=buf)
        return buf

    def _fit_staging(self, p: _Pass) -> None:
        """Give the staging buffers the pass's shape, keeping the rows and columns still valid
        (growth is geometric, so this is rare)."""
        assert self.keys is not None and self.values is not None
        rows, cols = p.stage_shape
        keep_rows, keep_cols = p.keep
        for name, pool in (("staged_keys", self.keys), ("staged_values", self.values)):
            old: torch.Tensor | None = getattr(self, name)
            if old is not None and old.shape[0] == rows and old.shape[2] == cols:
                continue
            if old is None and p.appended:  # the owner believes this layer holds those rows
                raise RuntimeError("a layer's staging buffers are out of step with the cache")
            # zero-filled, then only ever keys and values: masked columns stay finite
            new = pool.new_zeros((rows, pool.shape[0], cols, pool.shape[-1]))
            if old is not None and keep_rows and keep_cols:
                kr, kc = min(keep_rows, old.shape[0]), min(keep_cols, old.shape[2])
                new[:kr, :, :kc].copy_(old[:kr, :, :kc])
            setattr(self, name, new)

    def drop_staging(self) -> None:
        self.staged_keys = self.staged_values = None

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
        self.drop_staging()
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
        self._staged: list[tuple[int, int]] = []
        """(handle, length) of every staging row whose keys and values are current in every
        layer's staging buffers, in row order."""
        self._stage_shape = (0, 0)
        """Rows and columns of the staging buffers (every layer's, once it has run a pass)."""
        self._scratch: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}
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
    def working_bytes(self) -> int:
        """Bytes of the buffers attention reads beside the pools: the staging buffers (all
        layers) and the shared scratch buffers."""
        # tuple(): one step under the GIL (Scheduler.memory() reads this from other threads)
        total = sum(buf.numel() * buf.element_size() for buf in tuple(self._scratch.values()))
        for layer in self.paged_layers:
            for stage in (layer.staged_keys, layer.staged_values):
                if stage is not None:
                    total += stage.numel() * stage.element_size()
        return total

    @property
    def staging_shape(self) -> tuple[int, int]:
        """Rows and columns (tokens) of the staging buffers; (0, 0) when there are none."""
        return self._stage_shape

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
        self._scratch.clear()  # sized for the batch that was: regrown on demand, once
        self._maybe_shrink()
        rows, cols = self._stage_shape
        if rows * cols > self._staging_limit():
            self._drop_staging()

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
        p = _Pass(
            rows=len(handles),
            q=q,
            kv_len=kv_len,
            query_offset=kv_len - q,
            mode="fresh",
            slots=slots,
            gather=None,
            gather_blocks=0,
            first_block=None,
            n_blocks=n_blocks,
            handles=list(handles),
        )
        if not all(s == 0 for s in starts):
            table = self._tables[handles[0]][:n_blocks]
            if len(handles) == 1 and table == list(range(table[0], table[0] + n_blocks)):
                p.mode, p.first_block = "slice", table[0]
            elif q == 1 and self._plan_staging(p, starts):
                p.mode = "stage"
            else:
                # a chunk (its gather is paid once for q tokens), or staging would not fit
                if q == 1:
                    self._drop_staging()
                p.mode, p.gather_blocks = "gather", n_blocks
                p.gather = self._block_ids(handles, n_blocks)
        self.current = p

    def _block_ids(self, handles: Sequence[int], n_blocks: int) -> list[int]:
        """The first ``n_blocks`` blocks of each of ``handles``, padded with block 0."""
        ids: list[int] = []
        for h in handles:
            t = self._tables[h][:n_blocks]
            ids.extend(t)
            ids.extend([0] * (n_blocks - len(t)))
        return ids

    # -- staging --------------------------------------------------------------------------------

    def _staging_limit(self) -> int:
        """Most tokens (rows x columns) the staging buffers may hold: a share of the pools."""
        return int(STAGING_SHARE * self.capacity * BLOCK_TOKENS)

    def _plan_staging(self, p: _Pass, starts: Sequence[int]) -> bool:
        """Plan a decoding step over the staging buffers: which rows only append their token,
        which are gathered from the pool, and the buffers' shape. False when it would not fit
        (:data:`STAGING_SHARE`)."""
        rows, cols = p.rows, p.n_blocks * BLOCK_TOKENS
        limit = self._staging_limit()
        if rows * cols > limit:
            return False
        r0, c0 = self._stage_shape
        if r0 * c0 > limit:  # the pools shrank since: start over
            self._drop_staging()
            r0 = c0 = 0
        r = r0 if rows <= r0 else max(rows, 2 * r0)
        c = c0 if cols <= c0 else max(cols, 2 * c0)
        if r * c > limit:
            r = rows
            c = max(cols, min(c, limit // r // BLOCK_TOKENS * BLOCK_TOKENS))
        keep = (0, 0)
        if (r, c) == (r0, c0):
            keep = (r, c)
        elif r >= r0 and c >= c0 and self._staged:
            keep = (min(len(self._staged), r0), min(c0, max(n for _, n in self._staged)))
        p.stage_shape, p.keep, p.previous_shape = (r, c), keep, self._stage_shape
        self._stage_shape = (r, c)
        staged = self._staged[: keep[0]]
        refill_blocks = 0
        for i, (h, start) in enumerate(zip(p.handles, starts, strict=True)):
            if i < len(staged) and staged[i] == (h, start):
                p.appended.append(i)
                p.positions.append(start)
            else:
                p.refilled.append(i)
                refill_blocks = max(refill_blocks, blocks_for(start + 1))
        if p.refilled:
            p.gather_blocks = refill_blocks
            p.gather = self._block_ids([p.handles[i] for i in p.refilled], refill_blocks)
        return True

    def _drop_staging(self) -> None:
        for layer in self.paged_layers:
            layer.drop_staging()
        self._staged = []
        self._stage_shape = (0, 0)

    def scratch(self, like: torch.Tensor, n: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A contiguous ``shape`` view of scratch buffer ``n`` on ``like``'s device and dtype.
        One buffer serves every layer: a layer's gather is read by its attention before the
        next layer's update overwrites it. It grows by a quarter at least, so steps as the
        rows lengthen rarely allocate, and is let go whenever a sequence closes."""
        numel = 1
        for d in shape:
            numel *= d
        key = (like.device, like.dtype, n)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < numel:
            size = numel if buf is None else max(numel, buf.numel() * 5 // 4)
            buf = self._scratch[key] = like.new_empty(size)
        return buf[:numel].view(shape)

    def commit(self) -> None:
        """The planned pass ran: its tokens now count in their sequences' lengths."""
        p = self.current
        if p is None:
            raise RuntimeError("no pass is planned")
        for h in p.handles:
            self._lengths[h] += p.q
        if p.mode == "stage":
            self._staged = [(h, self._lengths[h]) for h in p.handles]
        self.current = None

    def cancel(self) -> None:
        """The planned pass failed: lengths stay as they were (its blocks stay allocated to
        their sequences, within their reservations)."""
        p = self.current
        if p is not None and p.mode == "stage":
            if p.touched:  # some layers' staging may hold this pass's rows, others not
                self._staged = []
            else:
                self._stage_shape = p.previous_shape
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
            self._drop_staging()
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
