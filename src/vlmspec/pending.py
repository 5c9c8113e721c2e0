"""Pending tree nodes on top of a committed KV prefix: the bookkeeping shared by the target and the drafters.

A cache row holds `[committed prefix | pending nodes]`. Each pending node attends to the whole prefix and to its
ancestors-or-self among the pending nodes; its position is the prefix length plus its depth (root-level nodes,
whose parent is -1, have depth 0). Parent pointers are the truth; ancestors and depths are derived when nodes
are added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class PendingNodes:
    tokens: Tensor       # [B, P] long
    parents: Tensor      # [B, P] long, -1 = hangs off the committed prefix
    depths: Tensor       # [B, P] long
    ancestors: Tensor    # [B, P, P] bool, [b, i, j]: j is i or an ancestor of i

    @classmethod
    def empty(cls, batch: int, device: torch.device | str = "cpu") -> "PendingNodes":
        long = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return cls(long, long.clone(), long.clone(), torch.zeros(batch, 0, 0, dtype=torch.bool, device=device))

    def __len__(self) -> int:
        return self.tokens.shape[1]

    def add(self, tokens: Tensor, parents: Tensor) -> Tensor:
        """Append nodes `tokens` [B, n] with `parents` [B, n] (indices into the pending list after the append,
        -1 for none; every parent comes before its child, as in a `Tree` and in `TreeBuilder` order). Returns the
        new nodes' depths [B, n]. One batched update per new node (a parent's row is complete before its child's),
        no host sync."""
        batch, count = tokens.shape
        old, total = len(self), len(self) + count
        parents = parents.to(self.parents)
        ancestors = torch.zeros(batch, total, total, dtype=torch.bool, device=tokens.device)
        ancestors[:, :old, :old] = self.ancestors
        depths = torch.cat([self.depths, torch.zeros_like(tokens)], dim=1)                 # [B, total]
        rows = torch.arange(batch, device=tokens.device)                                   # [B]
        for j in range(count):
            node, parent = old + j, parents[:, j]                                          # [B]
            has_parent = parent >= 0
            ancestors[:, node] = ancestors[rows, parent.clamp(min=0)] & has_parent[:, None]
            ancestors[:, node, node] = True
            depths[:, node] = torch.where(has_parent, depths[rows, parent.clamp(min=0)] + 1, 0)
        self.tokens = torch.cat([self.tokens, tokens], dim=1)
        self.parents = torch.cat([self.parents, parents], dim=1)
        self.depths, self.ancestors = depths, ancestors
        return depths[:, old:]

    def attention_mask(self, prefix: int | Sequence[int], count: int, dtype: torch.dtype) -> Tensor:
        """Additive mask [B, 1, count, max(prefix) + P] for the last `count` pending nodes (0 = attend), where row b
        holds its committed prefix (prefix[b] entries, or `prefix` for every row) then its P pending nodes."""
        batch, total = self.tokens.shape
        device = self.tokens.device
        lengths = torch.as_tensor(prefix, dtype=torch.long, device=device).expand(batch)          # [B]
        span = (prefix if isinstance(prefix, int) else max(prefix)) + total                      # no host sync
        visible = torch.arange(span, device=device)[None, None, :] < lengths[:, None, None]      # [B, 1, span]
        visible = visible.expand(batch, count, span).clone()                                    # [B, count, span]
        slots = (lengths[:, None] + torch.arange(total, device=device))[:, None, :]             # [B, 1, P]
        visible.scatter_(2, slots.expand(batch, count, total), self.ancestors[:, total - count:, :])
        mask = torch.zeros(visible.shape, dtype=dtype, device=device)
        return mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None]

    def follow(self, tokens: list[int]) -> list[int]:
        """Pending indices (batch row 0) of the longest chain from a root-level node whose tokens are `tokens`."""
        path: list[int] = []
        parent = -1
        token_row, parent_row = self.tokens[0].tolist(), self.parents[0].tolist()
        for token in tokens:
            match = next((i for i, (t, p) in enumerate(zip(token_row, parent_row)) if p == parent and t == token), None)
            if match is None:
                break
            path.append(match)
            parent = match
        return path

    def clear(self) -> None:
        empty = PendingNodes.empty(self.tokens.shape[0], self.tokens.device)
        self.tokens, self.parents, self.depths, self.ancestors = empty.tokens, empty.parents, empty.depths, empty.ancestors
