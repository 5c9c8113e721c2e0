"""Level-by-level tree drafting for a batch of rows, shared by the feature drafters (EAGLE-2 style, and FLASH's
k levels per draft forward).

Each row has its own `TreeBuilder` (its own tree shape) and its own choice rule (`ChildScores`). At each level the
draft logits of every row's frontier come from ONE lm_head call and choose that row's children; the rows advance in
lockstep (a row whose tree is complete drops out). With `tokens_per_forward` k = 1 every new level is fed to the
draft model in ONE forward over all rows, each node paired with its parent's predicted feature, under its parent's
pending cache entry. With k > 1 (FLASH), levels that are not a multiple of k get their features from a light
head (no attention, no cache) and wait; every k-th level one forward feeds the frontier together with its waiting
ancestors. Drafters supply the model calls; this function owns the bookkeeping.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from vlmspec.tree import Tree, TreeBuilder
from vlmspec.verify import ChildScores

# run_level(tokens per row, parent features per row [n_r, H], parents per row) -> (predicted features per row
# [n_r, H], pending slots used per row): parents index the row's pending nodes since the tree began, these
# included (-1: the root, already in the committed cache); every row is fed the same number of slots (padding)
RunLevel = Callable[[list[list[int]], list[Tensor | None], list[list[int]]], tuple[list[Tensor], int]]
# head(level, tokens [1, n], parent features [1, n, H]) -> features [1, n, H]
Head = Callable[[int, Tensor, Tensor], Tensor]


def draft_trees(builders: Sequence[TreeBuilder | None], root_features: Sequence[Tensor | None],
                draft_logits: Callable[[Tensor], Tensor], run_level: RunLevel,
                scores: Sequence[ChildScores], tokens_per_forward: int = 1,
                head: Head | None = None) -> list[Tree | None]:
    """The trees of a batch's rows (None for a row without a builder) from each row's root feature [H]."""
    rows = range(len(builders))
    features: list[dict[int, Tensor]] = [{0: root} if root is not None else {} for root in root_features]
    slot: list[dict[int, int]] = [{0: -1} for _ in rows]          # builder node → pending index
    waiting: list[list[int]] = [[] for _ in rows]                  # head-level nodes not yet in the cache
    frontier = [builder.frontier() if builder is not None else [] for builder in builders]
    fed = 0                                                        # pending slots per row so far
    while any(frontier):
        active = [r for r in rows if frontier[r]]
        logits = draft_logits(torch.stack([features[r][n] for r in active for n in frontier[r]]))   # [ΣF, V]
        for r, part in zip(active, logits.split([len(frontier[r]) for r in active])):
            builders[r].expand(scores[r](part, builders[r].depth(frontier[r][0])))
            frontier[r] = builders[r].frontier()
        active = [r for r in rows if frontier[r]]
        if not active:
            break
        level = builders[active[0]].depth(frontier[active[0]][0])
        if level % tokens_per_forward:                              # a head level: no attention, no forward
            nodes = [(r, n) for r in active for n in frontier[r]]
            tokens = torch.tensor([[builders[r].token(n) for r, n in nodes]], device=logits.device)
            parents = torch.stack([features[r][builders[r].parent(n)] for r, n in nodes])[None]
            for (r, n), feature in zip(nodes, head(level % tokens_per_forward, tokens, parents)[0]):
                features[r][n] = feature
            for r in active:
                waiting[r] += frontier[r]
            continue
        batch_nodes = [feed_order(builders[r], frontier[r], waiting[r]) if frontier[r] else [] for r in rows]
        tokens = [[builders[r].token(n) for n in batch_nodes[r]] for r in rows]
        inputs = [torch.stack([features[r][builders[r].parent(n)] for n in batch_nodes[r]]) if batch_nodes[r]
                  else None for r in rows]
        parents = []
        for r in rows:
            offsets = {node: fed + i for i, node in enumerate(batch_nodes[r])}
            parents.append([offsets.get(builders[r].parent(n), slot[r].get(builders[r].parent(n), -1))
                            for n in batch_nodes[r]])
            slot[r].update(offsets)
        predicted, width = run_level(tokens, inputs, parents)
        for r in rows:
            for node, feature in zip(batch_nodes[r], predicted[r]):
                if node in frontier[r]:
                    features[r][node] = feature
            waiting[r] = []
        fed += width
    return [builder.build() if builder is not None else None for builder in builders]


def feed_order(builder: TreeBuilder, frontier: list[int], waiting: list[int]) -> list[int]:
    """The frontier and its waiting (head-level) ancestors, in builder order (parents before children)."""
    needed = set(frontier)
    waiting_set = set(waiting)
    for node in frontier:
        parent = builder.parent(node)
        while parent in waiting_set and parent not in needed:
            needed.add(parent)
            parent = builder.parent(parent)
    return sorted(needed)
