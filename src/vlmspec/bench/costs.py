"""c(k): the target's median forward latency on k new tokens (a chain) against a cache of a given prompt, measured in
isolation. A step's verify cost c(tree) is read off these measurements by linear interpolation in k."""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch

from vlmspec.target import Target

DEFAULT_KS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def cost_grid(max_k: int) -> list[int]:
    """The k values to measure so that every tree size up to `max_k` can be interpolated (always 1…16)."""
    top = max(16, max_k)
    grid = [k for k in DEFAULT_KS if k <= top]
    if grid[-1] < top:
        grid.append(top)
    return grid


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_costs(target: Target, inputs: dict[str, torch.Tensor], ks: Sequence[int], repeats: int = 5,
                  warmup: int = 2) -> dict[int, float]:
    """Median seconds of `target.extend` on k chain tokens after prefilling `inputs`, for each k in `ks`."""
    samples = measure_cost_samples(target, inputs, ks, repeats, warmup)
    return {k: statistics.median(values) for k, values in samples.items()}


@torch.inference_mode()
def measure_cost_samples(target: Target, inputs: dict[str, torch.Tensor], ks: Sequence[int], repeats: int = 5,
                         warmup: int = 2) -> dict[int, list[float]]:
    """Every timed repeat of `target.extend` on k chain tokens after prefilling `inputs`, for each k in `ks`.

    After each timed forward `commit(state, [])` drops the pending nodes, so every k sees the same prompt cache."""
    state, prefill = target.prefill(inputs)
    token = int(prefill.logits[0].argmax())
    device = target.device
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"c(k) needs k >= 1, got {ks}")
    times: dict[int, list[float]] = {k: [] for k in ks}
    # round-robin over k, so a burst of load on a shared machine spreads over all k instead of skewing one
    for repeat in range(warmup + repeats):
        for k in ks:
            tokens = torch.full((1, k), token, dtype=torch.long, device=device)           # [1, k]
            parents = torch.arange(-1, k - 1, device=device)[None]                        # [1, k]: a chain
            _sync(device)
            start = time.perf_counter()
            target.extend(state, tokens, parents)
            _sync(device)
            elapsed = time.perf_counter() - start
            target.commit(state, [])
            if repeat >= warmup:
                times[k].append(elapsed)
    return times


def interpolate(costs: dict[int, float], k: float) -> float:
    """c(k) by linear interpolation between measured k (clamped extrapolation: slope of the last segment)."""
    if not costs:
        raise ValueError("no c(k) measurements")
    ks = sorted(costs)
    if k in costs:
        return costs[k]
    if len(ks) == 1:
        return costs[ks[0]]
    if k <= ks[0]:
        low, high = ks[0], ks[1]
    elif k >= ks[-1]:
        low, high = ks[-2], ks[-1]
    else:
        high = next(x for x in ks if x > k)
        low = ks[ks.index(high) - 1]
    slope = (costs[high] - costs[low]) / (high - low)
    return max(costs[low] + slope * (k - low), 0.0)
