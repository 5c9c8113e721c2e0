"""`--tree auto`: pick the draft tree that maximises expected tokens per second from measured costs and a drafter's
acceptance profile. Pure functions: no model, no clock (the cost probe is `vlmspec.probe`).

The model (docs/drafters.md, "`--tree auto`"):

- **Acceptance profile** of a drafter: `by_depth[d-1]` = a_d, the chance that the draft's *first choice* at depth d
  is accepted given its parent was (a chain's acceptance by depth); `by_rank[k-1]` = C(k), the chance that the
  target's token is among the draft's first k choices at depth 1 (a top-k tree's depth-1 acceptance; C(1) = a_1).
  Beyond the measured depths the mean measured a_d holds; beyond the measured ranks, the last C(k). The model
  caps every rate at `MAX_RATE` and lets the k-th choice remove at most `RANK_GAIN`^(k−1) of the misses (below).
- **Rank at depth d.** Width shrinks the miss rate at every depth in the proportion measured at depth 1:
  miss_d(k) = (1 − a_d) · max((1 − C(k)) / (1 − C(1)), RANK_GAIN^(k−1)), and the k-th choice is accepted with
  the mass m_d(k) = miss_d(k − 1) − miss_d(k) (miss_d(0) = 1, so m_d(1) = a_d).
- **A node's chance** to be on the accepted path is the product of m_d(rank) along its path; the expected number of
  accepted tokens of a tree is the sum over its nodes. A chain of depth D: sum_{d<=D} prod_{i<=d} a_i.
  A dynamic tree: its expected shape, built as `TreeBuilder` builds it with these chances in place of the draft's
  cumulative probabilities (each level: `topk` children of the `topk` best nodes of the level before, no children
  below `min_prob`; keep the `total` best nodes).
- **Cost of a step per request** at batch B with n verified nodes (root included): c(B·n)/B for the verify forward
  (B rows of n tokens priced as one forward of B·n tokens; c(k) made non-decreasing in k by `monotone`, then
  interpolated linearly by `costs.interpolate`, the last segment's slope past the probed k) plus the draft: (F + 1)
  draft forwards (F to build the tree, one to catch up on the accepted tokens) at c_draft · c(B)/c(1) each (a draft
  forward scales with batch as the target's does), shared by the B rows, plus c_node per drafted node (choosing
  children, the head and masks for it: bookkeeping that grows with the tree, not with the batch). F = depth levels
  / the drafter's tokens per forward. (Measured for `testbed:flash` in fp32 on the 2-core AVX2 VM, seven trees from
  a depth-3 chain to 24-node dynamic trees, fitted by `profile_from_summary`: 0.148·c(1) = 2.0 ms per draft
  forward, catch-up included, + 0.0137·c(1) = 0.19 ms per drafted node; docs/drafters.md has the command. Without
  the node term a 20-node tree's drafting was priced at half what it took.)
- **Expected tokens per second per request** = (1 + E[accepted]) / (cost of a step per request). Plain decoding
  makes c(B)/B per token, so the expected speedup is that rate × c(B)/B.
- **Choice**: every candidate with its break-even `min_prob` (below); among those within `SLACK` (5 %) of the best
  expected tokens per second, the fewest verified nodes win.
- `min_prob` of a candidate: the break-even chance of one more node, (c(B·(n+1)) − c(B·n))/B + c_node divided by
  the seconds the chosen tree spends per token (a node of chance p adds p tokens for that many seconds: worth it only
  when p / extra seconds beats the tree's own tokens per second), capped at 0.5.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from vlmspec.bench.costs import interpolate
from vlmspec.tree import TreeConfig

MAX_DEPTH = 12
# A rate of 1.0 measured on a few hundred steps does not make a perfect drafter: the model caps every rate here,
# and lets each further choice remove at most this share of the misses left (else a measured C(4) = 1 would promise
# acceptance 1 at every depth to any top-4 tree).
MAX_RATE = 0.98
RANK_GAIN = 0.5
# Trees within this share of the best expected tokens/s count as equal and the smallest wins: profiles from a few
# hundred steps leave the model a few percent of error, it does not see answer length, and on one-word answers (one
# step, which no tree pays for) fewer nodes lose less (docs/drafters.md, "`--tree auto`").
SLACK = 0.05
TOPKS = (2, 3, 4, 6, 8)
TOTALS = (4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)


@dataclass(frozen=True)
class AcceptanceProfile:
    """What `--tree auto` knows of a drafter (see the module docstring). Stored in a checkpoint's config.json under
    `acceptance` by `vlmspec tune --save`. `draft_cost_ratio` = one draft forward / c(1) where it was measured
    (None: unknown, then the caller supplies c_draft); `draft_node_ratio` = the drafting cost of one more node /
    c(1) (None: not measured, taken as 0); `source` says where the numbers come from."""

    by_depth: tuple[float, ...]
    by_rank: tuple[float, ...] = ()
    draft_cost_ratio: float | None = None
    tokens_per_forward: int = 1
    draft_node_ratio: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not self.by_depth:
            raise ValueError("an acceptance profile needs acceptance by depth for at least depth 1")
        for name in ("by_depth", "by_rank"):
            values = getattr(self, name)
            if any(not isinstance(v, (int, float)) or not 0 <= v <= 1 for v in values):
                raise ValueError(f"acceptance {name} must hold numbers in [0, 1], got {list(values)}")
        if any(b < a for a, b in zip(self.by_rank, self.by_rank[1:])):
            raise ValueError(f"acceptance by_rank (among the first k choices) cannot decrease, got "
                             f"{list(self.by_rank)}")
        for name in ("draft_cost_ratio", "draft_node_ratio"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if not isinstance(self.tokens_per_forward, int) or self.tokens_per_forward < 1:
            raise ValueError(f"tokens_per_forward must be an integer >= 1, got {self.tokens_per_forward!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AcceptanceProfile:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown acceptance profile keys: {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def depth_rate(self, depth: int) -> float:
        """a_d as the model uses it: measured, else the mean of the measured depths; at most `MAX_RATE`."""
        rate = self.by_depth[depth - 1] if depth <= len(self.by_depth) else statistics.fmean(self.by_depth)
        return min(rate, MAX_RATE)

    def coverage(self, k: int) -> float:
        """C(k) as the model uses it (at most `MAX_RATE`); without rank data, width is assumed to add nothing."""
        ranks = self.by_rank or self.by_depth[:1]
        return min(max(ranks[min(k, len(ranks)) - 1], ranks[0]), MAX_RATE)

    def rank_mass(self, depth: int, rank: int) -> float:
        """m_d(k): the chance that the k-th choice at depth d is accepted given its parent was."""
        return self._miss(depth, rank - 1) - self._miss(depth, rank)

    def _miss(self, depth: int, k: int) -> float:
        if k == 0:
            return 1.0
        shrink = max((1 - self.coverage(k)) / (1 - self.coverage(1)), RANK_GAIN ** (k - 1))
        return (1 - self.depth_rate(depth)) * shrink


@dataclass(frozen=True)
class Choice:
    """The chosen tree and what the model expects of it."""

    tree: TreeConfig
    expected_tokens_per_step: float          # 1 + E[accepted]
    verified_nodes: int                      # root included
    seconds_per_token: float                 # per request, at the batch size it was chosen for
    expected_speedup: float                  # vs plain decoding at the same batch size


def expected_shape(tree: TreeConfig, profile: AcceptanceProfile) -> tuple[list[float], int]:
    """(chance of each kept draft node, levels drafted) of `tree`'s expected shape under `profile`."""
    if tree.kind == "chain":
        chances, chance = [], 1.0
        for depth in range(1, tree.depth + 1):
            chance *= profile.rank_mass(depth, 1)
            chances.append(chance)
            if chance < tree.min_prob:
                break
        return chances, len(chances)
    if tree.kind != "dynamic":
        raise ValueError(f"--tree auto models chain and dynamic trees, not {tree.kind!r}")
    nodes, levels = _dynamic_nodes(tree.depth, tree.topk, tree.min_prob, profile)
    return list(nodes[: tree.total_tokens]), levels


@functools.lru_cache(maxsize=4096)
def _dynamic_nodes(max_depth: int, topk: int, min_prob: float,
                   profile: AcceptanceProfile) -> tuple[tuple[float, ...], int]:
    """Every node's chance of a dynamic tree before the `total` cut, best first, and the levels drafted (the cut
    does not change them: the builder drafts every level first). Cached: the candidate grid shares them."""
    nodes: list[float] = []
    frontier, levels = [1.0], 0
    for depth in range(1, max_depth + 1):
        frontier = [c for c in frontier if c >= min_prob]
        if not frontier:
            break
        level = [parent * profile.rank_mass(depth, rank) for parent in frontier for rank in range(1, topk + 1)]
        nodes += level
        levels = depth
        frontier = sorted(level, reverse=True)[:topk]
    return tuple(sorted(nodes, reverse=True)), levels


def step_seconds(costs: Mapping[int, float], nodes: int, draft_forwards: int, c_draft: float, batch: int,
                 c_node: float = 0.0) -> float:
    """Seconds of one step per request (see the module docstring)."""
    scale = interpolate(dict(costs), batch) / interpolate(dict(costs), 1)
    return (interpolate(dict(costs), batch * nodes) + (draft_forwards + 1) * c_draft * scale) / batch \
        + (nodes - 1) * c_node


def node_cost(costs: Mapping[int, float], profile: AcceptanceProfile) -> float:
    """c_node in seconds: the profile's ratio times this machine's c(1)."""
    return (profile.draft_node_ratio or 0.0) * interpolate(dict(costs), 1)


def evaluate(tree: TreeConfig, costs: Mapping[int, float], c_draft: float, profile: AcceptanceProfile,
             batch: int = 1) -> Choice:
    """The model's expectations for one tree."""
    chances, levels = expected_shape(tree, profile)
    forwards = math.ceil(levels / profile.tokens_per_forward)
    tokens = 1.0 + sum(chances)
    per_token = step_seconds(costs, len(chances) + 1, forwards, c_draft, batch, node_cost(costs, profile)) / tokens
    plain = interpolate(dict(costs), batch) / batch
    return Choice(tree, tokens, len(chances) + 1, per_token, plain / per_token)


def candidates(max_nodes: int = 64) -> list[TreeConfig]:
    """Chains of depth 1…12 and dynamic trees over a grid of depth, top-k and total (total >= top-k)."""
    trees = [TreeConfig(kind="chain", depth=d) for d in range(1, MAX_DEPTH + 1)]
    trees += [TreeConfig(kind="dynamic", depth=d, topk=k, total_tokens=n) for d in range(2, MAX_DEPTH + 1)
              for k in TOPKS for n in TOTALS if k <= n <= max_nodes]
    return trees


def monotone(costs: Mapping[int, float]) -> dict[int, float]:
    """c(k) made non-decreasing in k (c(k) = min over j >= k of c(j)): a forward on more tokens is not cheaper, so a
    probe's noise (a preempted k = 2) must not make a wider tree look free."""
    out: dict[int, float] = {}
    lowest = math.inf
    for k in sorted(costs, reverse=True):
        lowest = min(lowest, costs[k])
        out[k] = lowest
    return dict(sorted(out.items()))


def choose_tree(costs: Mapping[int, float], c_draft: float, profile: AcceptanceProfile, batch: int = 1,
                trees: Iterable[TreeConfig] | None = None) -> Choice:
    """The tree to run: each candidate gets its break-even `min_prob` (`with_min_prob`); among those whose expected
    tokens per second is within `SLACK` of the best, the fewest verified nodes win (then shallower, then a chain,
    then the faster). Deterministic for given inputs."""
    if not costs or any(k < 1 or s <= 0 for k, s in costs.items()):
        raise ValueError(f"costs must map k >= 1 to positive seconds, got {dict(costs)}")
    if c_draft < 0 or batch < 1:
        raise ValueError(f"need c_draft >= 0 and batch >= 1, got {c_draft}, {batch}")
    costs = monotone(costs)
    pool = list(trees) if trees is not None else candidates()
    if not pool:
        raise ValueError("no candidate trees")
    scored = [with_min_prob(evaluate(tree, costs, c_draft, profile, batch), costs, c_draft, profile, batch)
              for tree in pool]
    fastest = min(c.seconds_per_token for c in scored)
    near = [c for c in scored if c.seconds_per_token * (1 - SLACK) <= fastest]
    return min(near, key=lambda c: (c.verified_nodes, c.tree.depth, c.tree.kind != "chain", c.seconds_per_token))


def with_min_prob(choice: Choice, costs: Mapping[int, float], c_draft: float, profile: AcceptanceProfile,
                  batch: int) -> Choice:
    """`choice`'s tree with `min_prob` at the break-even chance of one more node (module docstring), re-evaluated."""
    nodes = choice.verified_nodes
    extra = (interpolate(dict(costs), batch * (nodes + 1)) - interpolate(dict(costs), batch * nodes)) / batch \
        + node_cost(costs, profile)
    min_prob = round(min(max(extra / choice.seconds_per_token, 0.0), 0.5), 3)
    return evaluate(dataclasses.replace(choice.tree, min_prob=min_prob), costs, c_draft, profile, batch)


def profile_from_summary(summary: Mapping[str, Any], drafter: str, tokens_per_forward: int = 1) -> AcceptanceProfile:
    """Derive a drafter's profile from a bench summary (a `vlmspec tune` run) at its lowest temperature: `by_depth` from
    its deepest chain arm, `by_rank` from the depth-1 acceptance of its arms of each top-k (C(1) from the chains),
    the cost ratios from c_draft per step / c(1) of every arm and suite (`_draft_cost_ratios`)."""
    arms = {a["name"]: a["tree"] for a in summary["arms"] if a["tree"] and _arm_of(a["name"], drafter)}
    coldest = min(summary["config"]["temperatures"])
    rows = {r["arm"]: r for r in summary["across_suites"]
            if r["arm"] in arms and r["acceptance_by_depth"] and r["temperature"] == coldest}
    if not rows:
        raise ValueError(f"the bench summary has no acceptance of {drafter!r}")
    chains = sorted((a for a in rows if arms[a]["kind"] == "chain"), key=lambda a: -arms[a]["depth"])
    if not chains:
        raise ValueError(f"the bench summary has no chain arm of {drafter!r}: acceptance by depth needs one")
    by_depth = tuple(rows[chains[0]]["acceptance_by_depth"])
    first = {1: by_depth[0]}
    for arm, row in rows.items():
        if arms[arm]["kind"] == "dynamic":
            first[arms[arm]["topk"]] = max(first.get(arms[arm]["topk"], 0.0), row["acceptance_by_depth"][0])
    by_rank, best = [], 0.0
    for k in range(1, max(first) + 1):                     # cumulative: unmeasured k hold the last measured value
        best = max(best, first.get(k, best))
        by_rank.append(best)
    forward_ratio, node_ratio = _draft_cost_ratios(summary, rows)
    return AcceptanceProfile(by_depth=by_depth, by_rank=tuple(by_rank), draft_cost_ratio=forward_ratio,
                             tokens_per_forward=tokens_per_forward, draft_node_ratio=node_ratio,
                             source=f"bench of {len(rows)} tree(s), T={rows[chains[0]]['temperature']:g}")


def _arm_of(name: str, drafter: str) -> bool:
    return name == drafter or name.startswith(f"{drafter} [")


def _draft_cost_ratios(summary: Mapping[str, Any], arms: Iterable[str]) -> tuple[float | None, float | None]:
    """(draft forward / c(1), drafted node / c(1)): the least-squares fit of c_draft per step / c(1) ≈
    forward ratio · (draft forwards + 1) + node ratio · drafted nodes over the arms' rows (suites) at the lowest
    temperature. With one tree shape the two cannot be told apart: (mean c_draft / (forwards + 1), None)."""
    points = []
    coldest = min(summary["config"]["temperatures"])
    for row in summary["rows"]:
        seconds = summary["costs"].get(row["suite"], {}).get("seconds", {})
        if row["arm"] in arms and row["temperature"] == coldest and row["c_draft_step"] is not None \
                and row.get("mean_tree_nodes") is not None and "1" in seconds:
            points.append((row["draft_forwards_per_step"] + 1, row["mean_tree_nodes"] - 1,
                           row["c_draft_step"] / seconds["1"]))
    if not points:
        return None, None
    if len({round(n / f, 1) for f, n, _ in points}) > 1:          # forwards and nodes vary apart: fit both
        ff = sum(f * f for f, _, _ in points)
        fn = sum(f * n for f, n, _ in points)
        nn = sum(n * n for _, n, _ in points)
        fy = sum(f * y for f, _, y in points)
        ny = sum(n * y for _, n, y in points)
        det = ff * nn - fn * fn
        forward, node = (fy * nn - ny * fn) / det, (ny * ff - fy * fn) / det
        if forward >= 0 and node >= 0:
            return forward, node
    return statistics.fmean(y / f for f, _, y in points), None


def describe(choice: Choice, sources: Sequence[str] = ()) -> str:
    """One log line: the tree and what the model expects of it."""
    tree = choice.tree
    shape = f"chain depth={tree.depth}" if tree.kind == "chain" else \
        f"dynamic depth={tree.depth} topk={tree.topk} total={tree.total_tokens}"
    return (f"--tree auto: {shape} min_prob={tree.min_prob:g}: expected {choice.expected_tokens_per_step:.2f} "
            f"tokens/step, {choice.expected_speedup:.2f}x plain" + (f" ({'; '.join(sources)})" if sources else ""))
