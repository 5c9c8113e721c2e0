"""A preallocated KV cache with one row per sequence, written in place at each row's own end.

`RowCache` is a transformers `Cache` whose layers hold `keys`/`values` buffers of shape [rows, heads, capacity,
head_dim]. Row r holds `ends[r]` filled entries. A forward over B rows (rows 0 … B−1 of the buffer; a batch keeps
its rows packed at the front) writes each row's n new entries at that row's own end and returns the buffers up to
the longest row: the 4D mask the caller passes hides every slot a row does not own (another row's longer tail, or
entries a row has dropped). Nothing is concatenated per step: `keep` compacts an accepted path in place (one
gather per layer), `move_row` packs the rows when one leaves, and the buffers grow by doubling only when a row
outgrows them. The model classes stay unmodified: they only call `update`.

Used for the target's batch (filled from each request's prefill) and for every drafter's own small cache (one row).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin


class RowLayer(CacheLayerMixin):
    """One layer's buffers; the owning `RowCache` holds the per-row ends and does the writes."""

    is_sliding = False

    def __init__(self, owner: "RowCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.keys, self.values, self.is_initialized = key_states, value_states, True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        return self.owner.write(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.span(query_length), 0

    def get_seq_length(self) -> int:
        return self.owner.longest()

    def get_max_length(self) -> int:
        return -1


class RowCache(Cache):
    """Per-row KV buffers for `num_layers` decoder layers (see the module docstring)."""

    def __init__(self, num_layers: int, rows: int = 0):
        super().__init__(layers=[])
        self.layers = [RowLayer(self) for _ in range(num_layers)]
        self.ends: list[int] = [0] * rows               # filled entries per row
        self._writing: tuple[list[int], int, Tensor] | None = None   # (ends, span, write index) of this forward

    # ------------------------------------------------------------------ sizes
    @property
    def rows(self) -> int:
        return len(self.ends)

    @property
    def capacity(self) -> int:
        keys = self.layers[0].keys
        return 0 if keys is None else keys.shape[2]

    def longest(self, rows: int | None = None) -> int:
        return max(self.ends[:rows], default=0)

    def span(self, query_length: int) -> int:
        return self.longest() + query_length

    def _reserve(self, rows: int, length: int, like: Tensor) -> None:
        """Room for `rows` rows of `length` entries, shaped like `like` [*, heads, *, head_dim]; grows by doubling."""
        have_rows = 0 if self.layers[0].keys is None else self.layers[0].keys.shape[0]
        if rows <= have_rows and length <= self.capacity:
            return
        new_rows = max(rows, 2 * have_rows) if rows > have_rows else have_rows
        new_length = max(length, 2 * self.capacity, 16) if length > self.capacity else self.capacity
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                shape = (new_rows, like.shape[1], new_length, like.shape[3])
                buffer = torch.zeros(shape, dtype=like.dtype, device=like.device)
                if old is not None:
                    buffer[: old.shape[0], :, : old.shape[2]] = old
                setattr(layer, name, buffer)
            layer.is_initialized = True

    # ------------------------------------------------------------------ the forward's writes
    def write(self, layer: RowLayer, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Write keys/values [B, heads, n, head_dim] of rows 0 … B−1 at their ends; the ends advance after the
        last layer's write. Returns the buffers [B, heads, longest end + n, head_dim]."""
        batch, _, count, _ = keys.shape
        if self._writing is None:                      # layer 0 of a forward: its rows, slots and span
            if layer is not self.layers[0]:
                raise RuntimeError("RowCache: a forward must write layer 0 first")
            if batch > self.rows:
                raise ValueError(f"RowCache has {self.rows} rows, the forward has {batch}")
            ends = self.ends[:batch]
            self._reserve(batch, max(ends) + count, keys)
            slots = torch.tensor(ends, device=keys.device)[:, None] + torch.arange(count, device=keys.device)
            where = slots[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])  # [B, heads, n, head_dim]
            self._writing = (ends, max(ends) + count, where)
        ends, span, where = self._writing
        layer.keys[:batch].scatter_(2, where, keys.to(layer.keys.dtype))
        layer.values[:batch].scatter_(2, where, values.to(layer.values.dtype))
        if layer is self.layers[-1]:
            self.ends[:batch] = [end + count for end in ends]
            self._writing = None
        return layer.keys[:batch, :, :span], layer.values[:batch, :, :span]

    # ------------------------------------------------------------------ row bookkeeping
    def add_row(self, source: Cache, length: int, room: int = 0) -> int:
        """A new row at the end holding the first `length` entries of row 0 of `source` (a cache whose layers have
        `keys`/`values` [rows, heads, seq, head_dim]: the prefill's `DynamicCache`, another `RowCache`), with room
        for `room` more entries reserved; returns its index."""
        row = self.rows
        self.ends.append(0)
        self._reserve(row + 1, length + room, source.layers[0].keys)
        for layer, other in zip(self.layers, source.layers):
            layer.keys[row, :, :length] = other.keys[0, :, :length]
            layer.values[row, :, :length] = other.values[0, :, :length]
        self.ends[row] = length
        return row

    def add_empty_row(self) -> int:
        """A new empty row at the end; returns its index."""
        self.ends.append(0)
        return self.rows - 1

    def keep(self, row: int, start: int, keep: Sequence[int]) -> None:
        """Move entries `start + keep[i]` to `start + i` in `row` (keep: increasing) and drop everything after."""
        keep = list(keep)
        if keep != list(range(len(keep))):
            source = torch.tensor(keep, device=self.layers[0].keys.device) + start     # [K]
            for layer in self.layers:
                layer.keys[row, :, start: start + len(keep)] = layer.keys[row][:, source]
                layer.values[row, :, start: start + len(keep)] = layer.values[row][:, source]
        self.ends[row] = start + len(keep)

    def move_row(self, source: int, target: int) -> None:
        """Copy row `source` over row `target` (to pack the rows after `target` left); `source` is dropped if last."""
        length = self.ends[source]
        if source != target and length:              # a row with entries has its buffer rows
            for layer in self.layers:
                layer.keys[target, :, :length] = layer.keys[source, :, :length]
                layer.values[target, :, :length] = layer.values[source, :, :length]
        self.ends[target] = length
        if source == self.rows - 1:
            self.ends.pop()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.longest()
