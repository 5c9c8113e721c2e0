"""KV-cache compaction after verification: keep the accepted tree nodes, drop the rest.

Works on the HF cache object the target owns (`DynamicCache` layers hold `keys`/`values` of shape
[B, heads, seq, head_dim]); the model itself is never touched.
"""

from __future__ import annotations

import torch


def compact_cache(cache, start: int, keep: list[int]) -> None:
    """Move entries `start + keep[i]` to `start + i` in every layer and drop everything after them."""
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or keys.dim() != 4:
            raise ValueError(f"cannot compact a {type(layer).__name__} cache layer (only full-attention dynamic "
                             "layers are supported)")
        if keep == list(range(len(keep))):
            layer.keys, layer.values = keys[:, :, : start + len(keep)], values[:, :, : start + len(keep)]
            continue
        index = torch.tensor(keep, dtype=torch.long, device=keys.device) + start      # [K]
        layer.keys = torch.cat([keys[:, :, :start], keys.index_select(2, index)], dim=2)
        layer.values = torch.cat([values[:, :, :start], values.index_select(2, index)], dim=2)
