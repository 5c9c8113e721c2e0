"""Level-by-level tree drafting shared by the feature drafters (EAGLE-2 style).

At each level the draft logits of the frontier choose children (`TreeBuilder`); the new frontier is then fed
to the draft model in ONE forward, each node paired with its parent's predicted feature, under its parent's
pending cache entry. Drafters supply the two model calls; this function owns the bookkeeping.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from vlmspec.tree import Tree, TreeBuilder
from vlmspec.verify import SamplingConfig, warp_logits

# run_nodes(tokens [n], parent_features [n, H], parent_pending [n]) -> predicted features [n, H]; pending indices
# count the nodes fed through run_nodes in this call, from 0 (-1: the root, already in the committed cache)
RunNodes = Callable[[list[int], Tensor, list[int]], Tensor]


def draft_tree(builder: TreeBuilder, root_feature: Tensor, draft_logits: Callable[[Tensor], Tensor],
               run_nodes: RunNodes, sampling: SamplingConfig) -> Tree:
    """Build a draft tree with `builder` (see `Drafter.tree_builder`) from the root's predicted feature [H]; greedy
    trees take top-k children, sampled trees draw them from the warped draft distribution."""
    node_feature = {0: root_feature}                                            # builder node → predicted feature
    node_pending = {0: -1}                                                      # builder node → pending index
    pending = 0
    frontier = builder.frontier()
    while frontier:
        logits = draft_logits(torch.stack([node_feature[n] for n in frontier]))          # [F, V]
        builder.expand(logits if sampling.greedy else warp_logits(logits, sampling))
        frontier = builder.frontier()
        if not frontier:
            break
        parents = [builder.parent(n) for n in frontier]
        predicted = run_nodes([builder.token(n) for n in frontier], torch.stack([node_feature[p] for p in parents]),
                              [node_pending[p] for p in parents])                # [F, H]
        for offset, node in enumerate(frontier):
            node_feature[node], node_pending[node] = predicted[offset], pending + offset
        pending += len(frontier)
    return builder.build()
