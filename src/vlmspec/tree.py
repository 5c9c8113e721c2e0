"""Draft trees: the `Tree` value (parent pointers), its tree shape config, and the builder drafters use.

Definitions used here and in `verify.py`:

- **node 0 / root**: the last verified token; it is not yet in the target's cache. Depth 0.
- **draft node**: every other real node; its token was proposed by the drafter.
- **node order invariant**: a parent's index is smaller than its child's; siblings appear in draw order (the
  order in which the drafter proposed them).
- **padding**: to batch trees of different sizes, rows are padded at the end with nodes of parent -1 and token
  `PAD_TOKEN`; `num_nodes[b]` counts the real nodes (root included).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Collection, Literal

import torch
from torch import Tensor

PAD_TOKEN = 0
TREE_KINDS = ("chain", "static", "dynamic")
_PARSE_KEYS = {"kind": "kind", "depth": "depth", "topk": "topk", "total": "total_tokens", "min_prob": "min_prob"}


@dataclass(frozen=True)
class TreeConfig:
    """Shape of the draft tree.

    kind: "chain" (one child per node, `depth` draft tokens; topk and total_tokens ignored), "static" (a fixed shape
        that does not depend on the draft's probabilities, see `static_shape`) or "dynamic" (EAGLE-2 expansion by
        cumulative log-prob, see `TreeBuilder`).
    depth: maximum draft depth (the root is depth 0).
    topk: children per expanded node.
    total_tokens: maximum number of draft nodes, root excluded.
    min_prob: nodes whose (cumulative) draft probability — their rank, see `TreeBuilder` — is below this get no
        children; 0 expands every level to `depth`. It only shapes the tree, so it keeps decoding lossless.
    """

    kind: Literal["chain", "static", "dynamic"] = "dynamic"
    depth: int = 6
    topk: int = 8
    total_tokens: int = 32
    min_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in TREE_KINDS:
            raise ValueError(f"tree kind must be one of {', '.join(TREE_KINDS)}, got {self.kind!r}")
        for name in ("depth", "topk", "total_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"tree {name} must be an integer >= 1, got {value!r}")
        if isinstance(self.min_prob, bool) or not isinstance(self.min_prob, (int, float)) or \
                not 0 <= self.min_prob < 1:
            raise ValueError(f"tree min_prob must be a number in [0, 1), got {self.min_prob!r}")

    @classmethod
    def parse(cls, text: str) -> TreeConfig:
        """Parse the CLI form "kind=dynamic,depth=6,topk=8,total=32"; missing keys keep their defaults."""
        values: dict[str, object] = {}
        for part in text.split(","):
            key, sep, value = (s.strip() for s in part.partition("="))
            if not sep or key not in _PARSE_KEYS:
                raise ValueError(f"bad tree option {part.strip()!r}: expected key=value with key in "
                                 f"{', '.join(_PARSE_KEYS)}, e.g. kind=dynamic,depth=6,topk=8,total=32")
            field = _PARSE_KEYS[key]
            if field in values:
                raise ValueError(f"tree option {key!r} given twice in {text!r}")
            if field == "kind":
                values[field] = value
            elif field == "min_prob":
                try:
                    values[field] = float(value)
                except ValueError:
                    raise ValueError(f"tree option min_prob must be a number, got {value!r}") from None
            else:
                try:
                    values[field] = int(value)
                except ValueError:
                    raise ValueError(f"tree option {key} must be an integer, got {value!r}") from None
        return cls(**values)  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TreeConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown tree config keys: {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass(frozen=True, eq=False)
class Tree:
    """A batch of draft trees. Parent pointers are the truth; everything else is derived from them.

    Node 0 is the root (last verified token, not yet in the target cache). Padding nodes (for batching trees of
    different sizes) sit after the real nodes with parent -1 and token `PAD_TOKEN`; node 0 also has parent -1;
    `num_nodes[b]` counts real nodes, root included.
    """

    tokens: Tensor  # [B, N] long
    parents: Tensor  # [B, N] long, -1 for root and padding
    num_nodes: Tensor  # [B] long

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.parents.shape != self.tokens.shape:
            raise ValueError(f"tokens and parents must both be [B, N], got {tuple(self.tokens.shape)} "
                             f"and {tuple(self.parents.shape)}")
        if self.num_nodes.shape != self.tokens.shape[:1]:
            raise ValueError(f"num_nodes must be [B], got {tuple(self.num_nodes.shape)}")

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_nodes(self) -> int:
        return self.tokens.shape[1]

    @staticmethod
    def root_only(root_tokens: Tensor) -> Tree:
        """Plain decoding: each tree is just its root. root_tokens: [B] long."""
        B = root_tokens.shape[0]
        return Tree(
            tokens=root_tokens.long().view(B, 1),  # [B, 1]
            parents=torch.full((B, 1), -1, dtype=torch.long, device=root_tokens.device),  # [B, 1]
            num_nodes=torch.ones(B, dtype=torch.long, device=root_tokens.device),  # [B]
        )

    @staticmethod
    def stack(trees: list[Tree]) -> Tree:
        """Concatenate trees along the batch, padding each to the largest N."""
        if not trees:
            raise ValueError("Tree.stack needs at least one tree")
        N = max(t.max_nodes for t in trees)

        def pad(x: Tensor, value: int) -> Tensor:  # [b, n] -> [b, N]
            return torch.cat([x, x.new_full((x.shape[0], N - x.shape[1]), value)], dim=1)

        return Tree(
            tokens=torch.cat([pad(t.tokens, PAD_TOKEN) for t in trees]),  # [B, N]
            parents=torch.cat([pad(t.parents, -1) for t in trees]),  # [B, N]
            num_nodes=torch.cat([t.num_nodes for t in trees]),  # [B]
        )

    @cached_property
    def _ancestor_mask(self) -> Tensor:
        B, N = self.tokens.shape
        batch = torch.arange(B, device=self.parents.device)  # [B]
        mask = torch.eye(N, dtype=torch.bool, device=self.parents.device).repeat(B, 1, 1)  # [B, N, N]
        for i in range(1, N):  # parents precede children, so row parents[:, i] is already complete
            parent = self.parents[:, i]  # [B]
            inherited = mask[batch, parent.clamp(min=0)] & (parent >= 0)[:, None]  # [B, N]
            mask[:, i] |= inherited
        return mask

    def ancestor_mask(self) -> Tensor:
        """[B, N, N] bool: [b, i, j] is True iff j is i or an ancestor of i (padding rows: only self).
        This is the tree attention mask: node i may attend to node j."""
        return self._ancestor_mask

    def depths(self) -> Tensor:
        """[B, N] long: root 0, padding 0; the position offset of each node after the root."""
        return self._ancestor_mask.sum(-1) - 1  # [B, N]

    def children(self, b: int, i: int) -> list[int]:
        """Children of node i in tree b, in node-index order (= draw order)."""
        return torch.nonzero(self.parents[b] == i).flatten().tolist()

    def path_to(self, b: int, i: int) -> list[int]:
        """Node indices from the root to node i, both included."""
        path = [i]
        parents = self.parents[b].tolist()
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        return path[::-1]

    def leaf_paths(self, b: int) -> list[list[int]]:
        """Root-to-leaf paths of tree b, ordered by leaf index."""
        n = int(self.num_nodes[b])
        has_child = set(self.parents[b, :n].tolist())
        return [self.path_to(b, i) for i in range(n) if i not in has_child]


def static_shape(depth: int, topk: int, total_tokens: int) -> list[tuple[int, ...]]:
    """The fixed node set of a static tree, as sibling-rank paths (root = (), excluded), parents first.

    Rule: in the full `topk`-ary tree of `depth` levels, give the node reached by sibling ranks (r_1, …, r_d)
    (0 = the drafter's first choice) the prior prod_k 1/(r_k + 1), and keep the `total_tokens` nodes of highest
    prior, ties broken by (depth, ranks) in lexicographic order. A prior never grows from a parent to its child or
    from a sibling to the next one, so the kept set is closed under parents and earlier siblings.
    Example: depth=3, topk=2, total=4 -> (0,), (1,), (0, 0), (0, 0, 0).
    """
    key = lambda path: (math.prod(r + 1 for r in path), len(path), path)  # noqa: E731
    heap = [key((r,)) for r in range(topk)]
    heapq.heapify(heap)
    kept: list[tuple[int, ...]] = []
    while heap and len(kept) < total_tokens:  # best-first: pops nodes in global key order
        *_, path = heapq.heappop(heap)
        kept.append(path)
        if len(path) < depth:
            for r in range(topk):
                heapq.heappush(heap, key(path + (r,)))
    return sorted(kept, key=lambda path: (len(path), path))


class TreeBuilder:
    """Incremental EAGLE-2 dynamic expansion, also producing chain and static shapes, for batch 1 (the engine
    runs B=1; Tree has B for verification).

    Usage by a drafter:
        builder = TreeBuilder(config, root_token, leaves=eos_tokens)
        frontier = builder.frontier()         # node indices whose children are wanted next (first: [0])
        while frontier:
            scores = <drafter computes [len(frontier), V] scores of the next token at each frontier node: its
                      log-probs, or for a sampled request its warped logits + the request's Gumbel noise>
            builder.expand(scores)            # chooses children of each frontier node, returns new node indices
            frontier = builder.frontier()
        tree = builder.build()                # Tree with B=1, pruned to total_tokens+1 nodes
    builder.token(n), builder.parent(n) and builder.depth(n) describe node n for the drafter's next forward.

    Children: the top-k tokens by score (tokens of score -inf never: a node may get fewer children). Scores are
    re-normalised to log-probs (x - logsumexp(x)), so raw logits work too. k is 1 (chain), `topk` (dynamic) or the
    number of children the static shape gives the node.

    Ranks (dynamic): cum(node) = sum of log-probs along its path (EAGLE-2). Nodes are ranked by
    rank(child_j) = min(rank(parent), cum(child_j)), which never increases from a parent to a child or from a
    sibling to a later one, ties broken by creation order, so every prefix of the ranking is a tree whose siblings
    are a prefix of top-k order. Verification emits the target's own choice whatever the tree (`verify.py`), so
    any selection is lossless.
    Dynamic frontier: [0], then the `topk` best-ranked nodes of the newest level, until level `depth`. The tree
    kept by `build` is the root plus the `total_tokens` best-ranked nodes over all levels.
    Every kind: a node whose token is in `leaves` (the target's EOS tokens: nothing after them is ever emitted) or
    whose rank is below log(`config.min_prob`) gets no children, and drafting stops when no node is left to expand,
    so a confident one-word answer costs one draft level. Whether a node has children may depend on its own token
    (given that node, verification is exact with or without them); which siblings exist never does.
    """

    def __init__(self, config: TreeConfig, root_token: int | Tensor, leaves: Collection[int] = ()) -> None:
        self.config = config
        self.leaves = frozenset(leaves)          # tokens that end the answer (EOS): nothing after them is emitted
        self._min_rank = math.log(config.min_prob) if config.min_prob > 0 else -math.inf
        self._tokens = [int(root_token)]
        self._parents = [-1]
        self._cum = [0.0]
        self._rank = [0.0]
        self._depth = [0]
        self._path: list[tuple[int, ...]] = [()]  # sibling ranks from the root, for static shapes
        self._device: torch.device | None = None
        self._frontier = [0]
        if config.kind == "static":
            shape = static_shape(config.depth, config.topk, config.total_tokens)
            self._num_static_children: dict[tuple[int, ...], int] = {}
            for path in shape:
                self._num_static_children[path[:-1]] = self._num_static_children.get(path[:-1], 0) + 1

    def token(self, node: int) -> int:
        """Token of builder node `node` (builder indices: creation order, root 0; `build` re-indexes)."""
        return self._tokens[node]

    def parent(self, node: int) -> int:
        """Parent of builder node `node` (-1 for the root)."""
        return self._parents[node]

    def depth(self, node: int) -> int:
        """Depth of builder node `node` (root 0)."""
        return self._depth[node]

    def frontier(self) -> list[int]:
        """Node indices whose children are wanted next, in node order; empty when the tree is complete."""
        return list(self._frontier)

    def _num_children(self, node: int) -> int:
        if self.config.kind == "chain":
            return 1
        if self.config.kind == "static":
            return self._num_static_children.get(self._path[node], 0)
        return self.config.topk

    def expand(self, scores: Tensor) -> list[int]:
        """Choose the children of every frontier node from scores [len(frontier), V]; return new node indices."""
        frontier = self._frontier
        if scores.dim() != 2 or scores.shape[0] != len(frontier):
            raise ValueError(f"expand expects scores of shape [{len(frontier)}, V], got {tuple(scores.shape)}")
        self._device = scores.device
        logprobs = scores.double()  # [F, V]
        logprobs = logprobs - logprobs.logsumexp(dim=-1, keepdim=True)  # [F, V] normalised
        counts = [self._num_children(node) for node in frontier]
        k = min(max(counts), logprobs.shape[-1])
        top = logprobs.topk(k, dim=-1)
        chosen, chosen_logprobs = top.indices, top.values.tolist()  # [F, k] best first
        new_nodes = []
        for row, node in enumerate(frontier):
            running_min = self._rank[node]
            for sibling, (token, lp) in enumerate(zip(chosen[row, :counts[row]].tolist(),
                                                      chosen_logprobs[row][:counts[row]])):
                if lp == -math.inf:  # probability 0: never chosen
                    break
                cum = self._cum[node] + lp
                running_min = min(running_min, cum)
                new_nodes.append(len(self._tokens))
                self._tokens.append(token)
                self._parents.append(node)
                self._cum.append(cum)
                self._rank.append(running_min)
                self._depth.append(self._depth[node] + 1)
                self._path.append(self._path[node] + (sibling,))
        self._frontier = self._next_frontier(new_nodes)
        return new_nodes

    def _next_frontier(self, level: list[int]) -> list[int]:
        if not level or self._depth[level[0]] >= self.config.depth:
            return []
        level = [node for node in level if self._tokens[node] not in self.leaves and self._rank[node] >= self._min_rank]
        if self.config.kind == "chain":
            return level[-1:]
        if self.config.kind == "static":
            return [node for node in level if self._num_children(node) > 0]
        best = sorted(level, key=lambda node: (-self._rank[node], node))[: self.config.topk]
        return sorted(best)

    def build(self) -> Tree:
        """The tree so far as a B=1 `Tree`: dynamic trees are pruned to the root plus the `total_tokens`
        best-ranked nodes; nodes keep creation order (parents first, siblings in draw order)."""
        nodes = range(1, len(self._tokens))
        if self.config.kind == "dynamic":
            nodes = sorted(nodes, key=lambda node: (-self._rank[node], node))[: self.config.total_tokens]
        kept = [0, *sorted(nodes)]
        new_index = {old: new for new, old in enumerate(kept)}
        device = self._device
        tokens = torch.tensor([[self._tokens[i] for i in kept]], dtype=torch.long, device=device)  # [1, n]
        parents = torch.tensor([[new_index[self._parents[i]] if i else -1 for i in kept]], dtype=torch.long,
                               device=device)  # [1, n]
        return Tree(tokens, parents, torch.tensor([len(kept)], dtype=torch.long, device=device))
