"""The tree budget: which tree the rows draft under load, from measured throughput, and where answers end."""

from __future__ import annotations

from vlmspec.budget import TreeBudget, bucket, smaller_tree
from vlmspec.tree import TreeConfig

TREE = TreeConfig("dynamic", depth=6, topk=4, total_tokens=24)


def test_arms_are_the_tree_a_smaller_one_and_none():
    budget = TreeBudget(TREE)
    assert budget.arms(1) == budget.arms(16) == [TREE, smaller_tree(TREE), None]
    assert smaller_tree(TREE).depth == 3 and smaller_tree(TREE).total_tokens == 12
    assert TreeBudget(TreeConfig("chain", depth=1, total_tokens=1)).arms(8) == [TreeConfig("chain", depth=1,
                                                                                            total_tokens=1), None]
    assert [bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]


def chain(depth: int) -> TreeConfig:
    return TreeConfig("chain", depth=depth, total_tokens=1)


def test_each_bucket_also_tries_the_tree_picked_for_its_batch_size():
    picked = []

    def pick(batch: int) -> TreeConfig | None:
        picked.append(batch)
        return {2: None, 8: TREE}.get(batch, chain(max(1, 12 // batch)))

    budget = TreeBudget(TREE, pick=pick)
    default = [TREE, smaller_tree(TREE), None]
    assert budget.arms(1) == default                               # batch 1 runs the configured tree, unpicked
    assert budget.arms(2) == default                               # no pick for this size
    assert budget.arms(5) == default == budget.arms(8)             # bucket 5–8, picked at 8: the configured tree
    assert budget.arms(16) == [TREE, chain(1), None]
    run(budget, 4, {0: 50.0, 1: 80.0, 2: 60.0}, 12)
    assert budget.arms(3) == [TREE, chain(3), None]
    assert picked == [2, 8, 16, 4]                                 # once per bucket
    assert set(budget.rates()[4]) == {"dynamic/d6/k4/24", "chain/d3", "none"}


def run(budget: TreeBudget, batch: int, rates: dict[int, float], steps: int) -> list[int]:
    """Drive `steps` choices, feeding each arm's tokens/s from `rates`; return the arms chosen."""
    chosen = []
    for _ in range(steps):
        arm = budget.choose(batch)
        budget.record(batch, arm, tokens=int(rates[arm] * 10), seconds=10.0)
        chosen.append(arm)
    return chosen


def test_tries_every_arm_then_runs_the_fastest_and_keeps_checking_the_others():
    budget = TreeBudget(TREE, explore_every=8)
    chosen = run(budget, 8, {0: 50.0, 1: 80.0, 2: 60.0}, 64)
    assert chosen[:6] == [0, 0, 1, 1, 2, 2]                       # each arm measured first, in order
    later = chosen[6:]
    assert later.count(1) >= len(later) * 0.8                      # the smaller tree is the fastest here
    assert {0, 2} <= set(later)                                    # the others are re-tried now and then


def test_no_drafting_wins_when_speculation_does_not_pay():
    budget = TreeBudget(TREE)
    chosen = run(budget, 16, {0: 20.0, 1: 30.0, 2: 90.0}, 48)
    assert chosen[-10:].count(2) >= 9


def test_buckets_learn_separately():
    budget = TreeBudget(TREE)
    run(budget, 2, {0: 90.0, 1: 50.0, 2: 40.0}, 30)
    run(budget, 16, {0: 20.0, 1: 30.0, 2: 90.0}, 30)
    rates = budget.rates()
    assert max(rates[2], key=rates[2].get) == "dynamic/d6/k4/24" and max(rates[16], key=rates[16].get) == "none"


def test_drafting_stops_where_recent_answers_end():
    budget = TreeBudget(TREE)
    assert budget.continues(1) and budget.continues(50)          # nothing seen yet: draft
    for _ in range(2):
        budget.finished(2)                                       # one-word answers
    assert not budget.continues(1)                               # a second token would be the last one
    assert budget.continues(2)                                   # longer than any recent answer: draft
    for _ in range(4):
        budget.finished(4)
    assert budget.continues(1) and budget.continues(2)           # at least two more tokens to come
    assert not budget.continues(3)                               # the answer's last token: nothing to gain
    budget.finished(40)                                          # one long answer among four-token ones
    assert not budget.continues(3)                               # most answers still end at four
    assert budget.continues(30)                                  # but one this long went on
    budget.finished(2)
    budget.finished(2)
    assert not budget.continues(1)


def test_a_first_drafting_step_needs_more_evidence():
    budget = TreeBudget(TREE)
    for length in (3, 2, 3, 3, 2, 3):                            # mixed two- and three-token answers
        budget.finished(length)
    assert budget.continues(1) and not budget.continues(1, first=True)   # ~0.65 went on: enough, unless catching up
    for _ in range(3):
        budget.finished(3)
    assert budget.continues(1, first=True)


def test_older_answers_weigh_less():
    budget = TreeBudget(TREE)
    for _ in range(10):
        budget.finished(30)
    budget.finished(2)
    assert budget.continues(1)                                   # one short answer does not turn it off
    budget.finished(2)
    budget.finished(2)
    assert not budget.continues(1)                               # a run of them does
    assert budget.continues(5)
