"""The per-step tree budget under load: which tree the rows of a batch draft, chosen from measured throughput.

A batched step costs one target forward over every row's tree; c(k) grows with the total node count, so a tree that
pays at batch 1 can lose at batch 16. The budget tries three arms per batch-size bucket — the configured tree, a
smaller tree (half the depth and nodes), and no drafting at all (each row verifies its root alone: plain
decoding) — and keeps, for each, an exponential moving average of the tokens per second that steps with that arm
delivered (tokens emitted by all rows ÷ the step's wall time, drafting included). After a few steps of each, it
runs the best arm and re-tries the others every `explore_every` steps, so a change of acceptance or load is
noticed. The schedule is deterministic given the measurements. With `pick` (`--tree auto`: `runtime.tree_picker`),
the smaller arm is instead the tree the cost model expects to run fastest at the bucket's batch size
(`autotree.choose_tree(batch=B)`: shallower and with a higher `min_prob` as the batch grows, since a wider forward
leaves less for drafted nodes to win back), picked the first time the bucket is seen; the configured tree stays an
arm, because the model's pick alone measured slower (docs/engine.md).

Answers about to end. A step can only gain from drafting if the answer goes on for at least two more tokens (one
token is what the step emits anyway), and a row's first drafting step also pays the drafter's catch-up over the
whole prompt. The budget remembers the lengths of recent answers (newer ones weigh more) and a row that has emitted
m tokens drafts only while at least half of the recent answers that reached m + 1 tokens reached m + 2 (three
quarters before its first drafting step, which also pays the catch-up) (`continues`); else it verifies its root
alone, as plain decoding does. So among one-word answers (a word and EOS: two tokens, the first from the prefill)
no row drafts or pays the catch-up, among three-token answers a row drafts at its first step only, and an answer
of a length seen before skips drafting at its last step; an answer longer than any recent one always drafts.
(Measured on the testbed, flash, fp32: docs/engine.md, `scripts/short_answer_rule.py`.)

Every row follows the budget, greedy or sampled: a row's tokens never depend on its tree (`verify.Sampler`: a
sampled row's noise is fixed by its seed per answer position), so the budget changes speed, never output.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict, deque
from typing import Callable

from vlmspec.tree import TreeConfig

WARMUP = 2             # steps of each arm before exploiting
SMOOTHING = 0.3        # weight of the newest measurement in the moving average
LENGTH_DECAY = 0.6     # weight of an answer length per newer answer since (two short answers outweigh the past)
LENGTH_MEMORY = 32     # answer lengths remembered
# the share of recent answers that must go on for two more tokens before a row drafts: at a row's first drafting
# step, which also pays the drafter's catch-up over the prompt (about half a target step on the testbed), and later
FIRST_DRAFT_SHARE = 0.75
DRAFT_SHARE = 0.5


def smaller_tree(tree: TreeConfig) -> TreeConfig:
    """Half the depth and node budget (at least 1 each)."""
    return dataclasses.replace(tree, depth=max(1, tree.depth // 2), total_tokens=max(1, tree.total_tokens // 2))


def bucket(batch: int) -> int:
    """Batch sizes grouped by powers of two: 1, 2, 3–4, 5–8, …; the bucket is the group's upper bound."""
    return 1 << (batch - 1).bit_length()


class TreeBudget:
    """Measured choice among `arms` (trees; None = no drafting) per batch-size bucket."""

    def __init__(self, tree: TreeConfig, explore_every: int = 16,
                 pick: Callable[[int], TreeConfig | None] | None = None):
        """`pick(batch)`: the tree to try beside `tree` at that batch size (None, or no `pick`: half of `tree`)."""
        self.tree = tree
        self.pick = pick
        self.explore_every = explore_every
        self._arms: dict[int, list[TreeConfig | None]] = {}          # bucket → its arms
        self._rate: dict[tuple[int, int], float] = {}                 # (bucket, arm) → tokens/s
        self._count: dict[tuple[int, int], int] = defaultdict(int)
        self._steps: dict[int, int] = defaultdict(int)
        self.lengths: deque[int] = deque(maxlen=LENGTH_MEMORY)     # recent answer lengths, newest first

    def finished(self, new_tokens: int) -> None:
        """Record the length of a finished answer."""
        self.lengths.appendleft(new_tokens)

    def continues(self, emitted: int, first: bool = False) -> bool:
        """Whether an unfinished answer of `emitted` tokens is worth drafting for: of the recent answers that reached
        emitted + 1 tokens (weights LENGTH_DECAY^age), at least DRAFT_SHARE reached emitted + 2 (FIRST_DRAFT_SHARE
        when the row has not drafted yet: `first`); True when none reached emitted + 1."""
        reached = longer = 0.0
        for age, length in enumerate(self.lengths):
            weight = LENGTH_DECAY ** age
            reached += weight * (length >= emitted + 1)
            longer += weight * (length >= emitted + 2)
        return reached == 0 or longer >= (FIRST_DRAFT_SHARE if first else DRAFT_SHARE) * reached

    def arms(self, batch: int) -> list[TreeConfig | None]:
        """The arms of this batch size's bucket: the configured tree, the tree picked for the bucket (else, or if it
        is the same, a smaller one, if any) and None (no drafting)."""
        group = bucket(batch)
        if group not in self._arms:
            picked = self.pick(group) if self.pick is not None and group > 1 else None
            second = picked if picked not in (None, self.tree) else smaller_tree(self.tree)
            self._arms[group] = [self.tree] + ([second] if second != self.tree else []) + [None]
        return self._arms[group]

    def choose(self, batch: int) -> int:
        """The index among `arms(batch)` of the arm for the next step at this batch size."""
        group, arms = bucket(batch), self.arms(batch)
        self._steps[group] += 1
        untried = [arm for arm in range(len(arms)) if self._count[group, arm] < WARMUP]
        if untried:
            return untried[0]
        ranked = sorted(range(len(arms)), key=lambda arm: -self._rate[group, arm])
        if self._steps[group] % self.explore_every == 0:
            return ranked[1 + (self._steps[group] // self.explore_every) % (len(ranked) - 1)]
        return ranked[0]

    def record(self, batch: int, arm: int, tokens: int, seconds: float) -> None:
        key = (bucket(batch), arm)
        rate = tokens / max(seconds, 1e-9)
        self._rate[key] = rate if key not in self._rate else (1 - SMOOTHING) * self._rate[key] + SMOOTHING * rate
        self._count[key] += 1

    def rates(self) -> dict[int, dict[str, float]]:
        """Measured tokens/s per bucket and arm (for reports)."""
        out: dict[int, dict[str, float]] = defaultdict(dict)
        for (group, arm), rate in sorted(self._rate.items()):
            out[group][arm_name(self._arms[group][arm])] = rate
        return dict(out)


def arm_name(tree: TreeConfig | None) -> str:
    if tree is None:
        return "none"
    return f"{tree.kind}/d{tree.depth}" + ("" if tree.kind == "chain" else f"/k{tree.topk}/{tree.total_tokens}")
