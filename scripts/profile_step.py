"""Where do the milliseconds of a decoding step go? Exclusive wall time per phase, per verify step.

    python scripts/profile_step.py --target testbed --drafter testbed:eagle --suite describe --limit 4

Phases are the engine's own functions, timed by wrappers that attribute every interval to the innermost phase
running (so "draft forwards" excludes the masks they build, "target forward" excludes nothing inside the model):
the draft layer forwards, draft logits (lm_head), tree building (TreeBuilder), attention masks (draft and target
pending nodes), the target's verify forward, its in-place cache writes, verification, cache commit,
detokenizing/stop checks, and what is
left of each step (Python glue of propose/accept/verify and the loop). The prefill and the drafter's `begin` are
reported apart and excluded from the per-step numbers. Run with OMP_NUM_THREADS=1 on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import time
from collections import defaultdict
from unittest import mock

import torch

from vlmspec.bench.suites import read_suite
from vlmspec.drafters.base import DraftBatch
from vlmspec.drafters.feature import FeatureDraftBatch
from vlmspec.drafters.layers import DraftDecoder
from vlmspec.engine import Engine, Generator
from vlmspec.pending import PendingNodes
from vlmspec.request import Request
from vlmspec.target.cache import RowCache
from vlmspec.runtime import open_drafter
from vlmspec.target import Target
from vlmspec.testbed.data import default_suite
from vlmspec.tree import TreeBuilder, TreeConfig


class PhaseTimer:
    """Exclusive time per label: an interval belongs to the innermost wrapped call running."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack = ["loop"]
        self.last = time.perf_counter()

    def wrap(self, label: str, function):
        def timed(*args, **kwargs):
            self._switch(label)
            try:
                return function(*args, **kwargs)
            finally:
                self._switch(None)
        return timed

    def _switch(self, label: str | None) -> None:
        now = time.perf_counter()
        self.seconds[self.stack[-1]] += now - self.last
        self.last = now
        if label is None:
            self.stack.pop()
        else:
            self.stack.append(label)


def patches(timer: PhaseTimer, target: Target, drafter) -> list:
    import vlmspec.engine as engine

    method = {  # (owner, attribute): label
        (DraftDecoder, "forward"): "draft forwards", (type(drafter), "draft_logits"): "draft logits (lm_head)",
        (TreeBuilder, "expand"): "tree building", (TreeBuilder, "build"): "tree building",
        (PendingNodes, "attention_mask"): "attention masks", (DraftBatch, "propose"): "draft glue",
        (FeatureDraftBatch, "propose"): "draft glue", (type(drafter), "accept"): "draft glue",
        (Engine, "_prefill"): "prefill (excluded)", (Target, "encode"): "prefill (excluded)",
        (Target, "verify"): "verify glue", (RowCache, "write"): "cache writes", (RowCache, "keep"): "cache commit",
        (engine, "verify"): "verification",
        (Request, "emit"): "detokenize / stops",
    }
    found = []
    for (owner, name), label in method.items():
        timed = timer.wrap(label, getattr(owner, name))
        static = isinstance(inspect.getattr_static(owner, name), staticmethod)
        found.append(mock.patch.object(owner, name, staticmethod(timed) if static else timed))
    return found + [mock.patch.object(target.model, "forward", timer.wrap("target forward", target.model.forward))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="testbed")
    parser.add_argument("--drafter", default="testbed:eagle")
    parser.add_argument("--tree", default=None, help="default: the drafter's recommended tree")
    parser.add_argument("--suite", default="describe")
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bf16")
    args = parser.parse_args()
    target = Target.from_pretrained(args.target, dtype=args.dtype)
    drafter, recommended = open_drafter(args.drafter, target)
    tree = TreeConfig.parse(args.tree) if args.tree else (recommended or TreeConfig())
    generator = Generator(target, drafter, tree)
    samples = read_suite(default_suite(args.suite))[: args.limit]
    generator.generate(samples[0].images, prompt=samples[0].prompt, messages=samples[0].messages, max_new_tokens=8)
    timer, steps, tokens, decode = PhaseTimer(), 0, 0, 0.0
    with contextlib.ExitStack() as stack, torch.inference_mode():
        for patch in patches(timer, target, drafter):
            stack.enter_context(patch)
        for sample in samples:
            result = generator.generate(sample.images, prompt=sample.prompt, messages=sample.messages,
                                        max_new_tokens=args.max_new_tokens)
            steps += result.stats.target_forwards - 1
            tokens += result.stats.new_tokens
            decode += result.stats.decode_seconds
        timer._switch(None)
    per_step = {label: 1000 * s / max(1, steps) for label, s in timer.seconds.items() if label != "prefill (excluded)"}
    total = sum(per_step.values())
    print(f"{args.drafter} on {args.suite} ({len(samples)} samples, {steps} steps, {tokens} tokens, τ "
          f"{tokens / max(1, steps + len(samples)):.2f}, tree {tree.to_dict()}), {args.dtype}, "
          f"{torch.get_num_threads()} thread(s); engine decode time {1000 * decode / max(1, steps):.2f} ms/step")
    print("| phase | ms / step | share |\n|---|---:|---:|")
    for label, ms in sorted(per_step.items(), key=lambda item: -item[1]):
        print(f"| {label} | {ms:.2f} | {ms / total:.0%} |")
    print(f"| total (timed) | {total:.2f} | 100% |")


if __name__ == "__main__":
    main()
