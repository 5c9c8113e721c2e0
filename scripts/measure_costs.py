"""c(k)/c(1) in bf16 for random-init LLaVA models: the verify-cost curve speculative decoding lives on.

c(k) is the median latency of one target forward on k new tokens (a chain) against a cache holding a prompt of
--prompt-tokens tokens (one image plus text), after warm-up, measured round-robin over k
(`vlmspec.bench.costs`, as `vlmspec bench` does). Prints a markdown table of c(k)/c(1) by the median (DESIGN's
statistic) and by the minimum over repeats: on a loaded machine, a forward of a millisecond or two is often
preempted for a whole scheduler slice, and only the minimum still shows the cost in isolation.

    OMP_NUM_THREADS=1 python scripts/measure_costs.py [--device cuda] [--compact]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from vlmspec.bench.costs import measure_cost_samples
from vlmspec.target import Target
from vlmspec.testing import tiny_model

COMPACT_KS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# name -> tiny_model kwargs (LLaVA family, 32x32 images → 16 image tokens)
MODELS = {"tiny (hidden 64, 2 layers)": dict(hidden=64, layers=2, heads=4),
          "~100M (hidden 768, 20 layers)": dict(hidden=768, layers=20, heads=12)}


def prompt_inputs(target: Target, prompt_tokens: int) -> dict:
    """One image and enough text to make a prompt of about `prompt_tokens` tokens."""
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    words = "describe the image in detail . there are three green triangles at the top left ."
    text = words
    while target.encode([image], prompt="<image> " + text)["input_ids"].shape[1] < prompt_tokens:
        text += " " + words
    return target.encode([image], prompt="<image> " + text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compact", action="store_true",
                        help=f"only k in {', '.join(map(str, COMPACT_KS))} (default: every k in 1…64)")
    args = parser.parse_args()
    ks = list(COMPACT_KS) if args.compact else list(range(1, 65))
    columns = {}
    for name, kwargs in MODELS.items():
        model, processor = tiny_model("llava", **kwargs)
        target = Target(model.to(device=args.device, dtype=torch.bfloat16), processor)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        inputs = prompt_inputs(target, args.prompt_tokens)
        started = time.perf_counter()
        samples = measure_cost_samples(target, inputs, ks, repeats=args.repeats, warmup=2)
        label = f"{name}, {params:.1f}M params"
        columns[f"{label}: median"] = {k: statistics.median(v) for k, v in samples.items()}
        columns[f"{label}: min"] = {k: min(v) for k, v in samples.items()}
        print(f"measured {name}: prompt {inputs['input_ids'].shape[1]} tokens, c(1) median "
              f"{columns[label + ': median'][1] * 1e3:.2f} ms ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"\nc(k)/c(1), bf16, {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    names = list(columns)
    print("| k | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for k in ks:
        print(f"| {k} | " + " | ".join(f"{columns[n][k] / columns[n][1]:.2f}" for n in names) + " |")
    print("| c(1) ms | " + " | ".join(f"{columns[n][1] * 1e3:.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
