"""What the engine's short-answer rule is worth: a greedy row's first step drafting the full tree, a depth-2 chain,
or nothing, against plain decoding, per suite (decode speedup, median of interleaved repeats, one process).

    OMP_NUM_THREADS=2 python scripts/short_answer_rule.py --drafter testbed:flash --limit 8 --repeats 3

Each variant pins the first step's tree (`TreeBudget.first_tree`) whatever the recent answers were; the engine's
own rule picks "skip" while most recent answers were one word and "full" otherwise (docs/engine.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from vlmspec import Generator, Target
from vlmspec.bench.suites import read_suite
from vlmspec.budget import TreeBudget
from vlmspec.runtime import open_drafter
from vlmspec.testbed.data import default_suite
from vlmspec.tree import TreeConfig

FIRST_STEP = {"full": lambda tree: tree, "chain2": lambda tree: dataclasses.replace(tree, kind="chain", depth=2),
              "skip": lambda tree: None}


class PinnedBudget(TreeBudget):
    def __init__(self, tree: TreeConfig, first):
        super().__init__(tree)
        self._first = first

    def first_tree(self, tree):
        return None if tree is None else self._first(tree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="testbed")
    parser.add_argument("--drafter", default="testbed:flash")
    parser.add_argument("--suites", default="chart,ocr,vqa,caption,text_chat,describe")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="fast")
    args = parser.parse_args()
    target = Target.from_pretrained(args.target, dtype=args.dtype)
    drafter, tree = open_drafter(args.drafter, target)
    print(f"{args.drafter}, tree {tree.to_dict()}, {target.dtype}, {torch.get_num_threads()} thread(s)")
    print("| suite | tokens | " + " | ".join(FIRST_STEP) + " |\n|---|---|" + "---|" * len(FIRST_STEP))
    for suite in args.suites.split(","):
        samples = read_suite(default_suite(suite))[: args.limit]
        seconds: dict[str, list[float]] = {name: [] for name in ["plain", *FIRST_STEP]}
        for _ in range(args.repeats):
            for name in seconds:
                generator = Generator(target, None if name == "plain" else drafter, tree)
                if name != "plain":
                    generator.budget = PinnedBudget(tree, FIRST_STEP[name])
                results = [generator.generate(list(s.images), prompt=s.prompt, messages=s.messages,
                                              max_new_tokens=128) for s in samples]
                seconds[name].append(sum(r.stats.decode_seconds for r in results))
        tokens = sum(r.stats.new_tokens for r in results)
        plain = statistics.median(seconds["plain"])
        print(f"| {suite} | {tokens} | " + " | ".join(f"{plain / statistics.median(seconds[name]):.2f}×"
                                                       for name in FIRST_STEP) + " |", flush=True)


if __name__ == "__main__":
    main()
