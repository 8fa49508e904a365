"""A pre-allocated KV cache for a batch of left-padded rows that join and leave while it runs.

Layout, per decoder layer: ``keys`` and ``values`` buffers ``[row_capacity, kv_heads,
col_capacity, head_dim]`` on that layer's device. Rows ``0 .. batch-1`` are in use; all rows share
one column counter ``length``: a decoding step writes column ``length`` of every row. A row
shorter than ``length`` is left-padded; its padding columns hold zeros and are masked out by
the caller's attention mask. Buffers grow by doubling, so a step never reallocates or copies
the past (unlike a cache that concatenates), and the model's attention reads views of them.

Only the scheduler thread touches a cache; nothing here is thread-safe.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["SlotKVCache"]


class _SlotLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]
    """One decoder layer's buffers; positions come from the owning :class:`SlotKVCache`."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, owner: SlotKVCache) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._owner = owner
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, cols = self._owner.row_capacity, self._owner.col_capacity
        _, heads, _, dim = key_states.shape
        vdim = value_states.shape[-1]
        self.keys = key_states.new_zeros((rows, heads, cols, dim))
        self.values = value_states.new_zeros((rows, heads, cols, vdim))
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None or self.values is None:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        batch, q = key_states.shape[0], key_states.shape[2]
        start = self._owner.length
        if batch != self._owner.batch or start + q > self.keys.shape[2]:
            raise RuntimeError(
                f"KV cache holds {self._owner.batch} rows and {self.keys.shape[2]} columns; "
                f"got {batch} rows writing columns {start}..{start + q - 1}"
            )
        self.keys[:batch, :, start : start + q].copy_(key_states)
        self.values[:batch, :, start : start + q].copy_(value_states)
        return self.keys[:batch, :, : start + q], self.values[:batch, :, : start + q]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.length + query_length, 0

    def get_seq_length(self) -> int:
        return self._owner.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False

    def resize(self, rows: int, cols: int) -> None:
        """Reallocate to ``rows`` x ``cols``, keeping the rows and columns in use."""
        if self.keys is None or self.values is None:
            return
        b, t = self._owner.batch, self._owner.length
        for name in ("keys", "values"):
            old: torch.Tensor = getattr(self, name)
            new = old.new_zeros((rows, old.shape[1], cols, old.shape[3]))
            new[:b, :, :t].copy_(old[:b, :, :t])
            setattr(self, name, new)


class SlotKVCache(Cache):
    """KV cache for ``batch`` left-padded rows sharing the column counter ``length``.

    The caller (the decoding loop) owns the positions: it passes ``position_ids`` and an
    attention mask that hides the padding columns, calls :meth:`advance` after every forward
    pass, and uses the row and column operations below to admit, remove and compact rows.
    """

    def __init__(self, num_layers: int, rows: int = 1, cols: int = 64) -> None:
        self.length = 0
        self.batch = 0
        self.row_capacity = max(1, rows)
        self.col_capacity = max(1, cols)
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    @property
    def slot_layers(self) -> list[_SlotLayer]:
        return [layer for layer in self.layers if isinstance(layer, _SlotLayer)]

    def advance(self, q: int) -> None:
        """Columns ``length .. length+q-1`` were written by the forward pass just run."""
        self.length += q

    def reserve(self, rows: int, cols: int) -> None:
        """Make room for ``rows`` rows and ``cols`` columns (doubling, never shrinking)."""
        new_rows, new_cols = self.row_capacity, self.col_capacity
        while new_rows < rows:
            new_rows *= 2
        while new_cols < cols:
            new_cols *= 2
        if (new_rows, new_cols) == (self.row_capacity, self.col_capacity):
            return
        self.row_capacity, self.col_capacity = new_rows, new_cols
        for layer in self.slot_layers:
            layer.resize(new_rows, new_cols)

    def shift(self, delta: int) -> None:
        """Move every row's columns right (``delta > 0``, adding left padding) or left
        (``delta < 0``, dropping leading columns that must be padding in every row)."""
        if delta == 0:
            return
        b, t = self.batch, self.length
        if delta > 0:
            self.reserve(b, t + delta)
        for layer in self.slot_layers:
            for buf in (layer.keys, layer.values):
                if buf is None:
                    continue
                if delta > 0:
                    buf[:b, :, delta : delta + t] = buf[:b, :, :t].clone()
                    buf[:b, :, :delta].zero_()
                else:
                    buf[:b, :, : t + delta] = buf[:b, :, -delta:t].clone()
        self.length = t + delta

    def add_row(self, source: SlotKVCache, source_row: int, source_len: int) -> int:
        """Append row ``source_row`` of ``source`` (its first ``source_len`` columns, no
        padding) right-aligned at column ``length``; returns the new row's index.
        Requires ``source_len <= length`` (call :meth:`shift` first)."""
        if source_len > self.length:
            raise ValueError("shift the cache right before adding a longer row")
        self.reserve(self.batch + 1, self.length + 1)
        row, t = self.batch, self.length
        for layer, src in zip(self.slot_layers, source.slot_layers, strict=True):
            if src.keys is None or src.values is None:
                raise RuntimeError("the source cache holds no keys for a layer")
            if layer.keys is None:
                layer.keys = src.keys.new_zeros(
                    (self.row_capacity, src.keys.shape[1], self.col_capacity, src.keys.shape[3])
                )
                layer.values = src.values.new_zeros(
                    (self.row_capacity, src.values.shape[1], self.col_capacity, src.values.shape[3])
                )
                layer.device = src.keys.device
                layer.is_initialized = True
            assert layer.keys is not None and layer.values is not None
            for dst, s in ((layer.keys, src.keys), (layer.values, src.values)):
                dst[row, :, : t - source_len].zero_()
                dst[row, :, t - source_len : t].copy_(s[source_row, :, :source_len])
        self.batch += 1
        return row

    def move_row(self, src: int, dst: int) -> None:
        """Copy row ``src`` over row ``dst`` (used to fill a hole with the last row)."""
        if src == dst:
            return
        t = self.length
        for layer in self.slot_layers:
            for buf in (layer.keys, layer.values):
                if buf is not None:
                    buf[dst, :, :t].copy_(buf[src, :, :t])

    def pop_last_row(self) -> None:
        """Forget the last row."""
        if self.batch == 0:
            raise ValueError("the cache holds no rows")
        self.batch -= 1
        if self.batch == 0:
            self.length = 0
