"""What the engine's rule for answers about to end is worth: drafting at every step, never at a row's first step,
or by the recent answer lengths (the engine's own rule, `TreeBudget.continues`), against plain decoding, per suite
(decode speedup, median of interleaved repeats, one process).

    OMP_NUM_THREADS=2 python scripts/short_answer_rule.py --drafter testbed:flash --limit 8 --repeats 3

"always" and "skip-first" pin `continues` whatever the recent answers were; "lengths" learns them from the suite's
own answers as the engine does (docs/engine.md). Add `--temperature 1` for sampled answers (seeded per sample).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from vlmspec import Generator, Target
from vlmspec.bench.suites import read_suite
from vlmspec.budget import TreeBudget
from vlmspec.runtime import open_drafter, resolve_tree
from vlmspec.testbed.data import default_suite
from vlmspec.tree import TreeConfig

RULES = {"always": lambda emitted: True, "skip-first": lambda emitted: emitted > 1, "lengths": None}


class PinnedBudget(TreeBudget):
    def __init__(self, tree: TreeConfig, rule):
        super().__init__(tree)
        self._rule = rule

    def continues(self, emitted: int, first: bool = False) -> bool:
        return self._rule(emitted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="testbed")
    parser.add_argument("--drafter", default="testbed:flash")
    parser.add_argument("--suites", default="chart,ocr,vqa,caption,text_chat,describe")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="fast")
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args()
    target = Target.from_pretrained(args.target, dtype=args.dtype)
    drafter, recommended = open_drafter(args.drafter, target)
    tree = resolve_tree(None, target, args.drafter, drafter, recommended)          # the default: --tree auto
    print(f"{args.drafter}, tree {tree.to_dict()}, {target.dtype}, {torch.get_num_threads()} thread(s)")
    print("| suite | tokens | " + " | ".join(RULES) + " |\n|---|---|" + "---|" * len(RULES))
    for suite in args.suites.split(","):
        samples = read_suite(default_suite(suite))[: args.limit]
        seconds: dict[str, list[float]] = {name: [] for name in ["plain", *RULES]}
        for _ in range(args.repeats):
            for name in seconds:
                generator = Generator(target, None if name == "plain" else drafter, tree)
                if RULES.get(name) is not None:
                    generator.budget = PinnedBudget(tree, RULES[name])
                results = [generator.generate(list(s.images), prompt=s.prompt, messages=s.messages,
                                              max_new_tokens=128, temperature=args.temperature, seed=index)
                           for index, s in enumerate(samples)]
                seconds[name].append(sum(r.stats.decode_seconds for r in results))
        tokens = sum(r.stats.new_tokens for r in results)
        plain = statistics.median(seconds["plain"])
        print(f"| {suite} | {tokens} | " + " | ".join(f"{plain / statistics.median(seconds[name]):.2f}×"
                                                       for name in RULES) + " |", flush=True)


if __name__ == "__main__":
    main()
