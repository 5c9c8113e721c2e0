"""The cost probe of `--tree auto`: c(k) for a few k on this machine, dtype and target in a second or two, cached.

The measurement is `vlmspec.bench.costs.measure_costs` (a chain of k tokens against the cache of a typical prompt:
one image and a short question for a VLM, a short question for a text-only target). Results are cached in
`$VLMSPEC_CACHE/costs.json` (default `~/.cache/vlmspec/costs.json`), keyed by the machine (CPU or GPU model, core
and thread counts, torch version), the target's fingerprint, its dtype and device: a second load on the same
machine measures nothing.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from vlmspec.target import Target

PROBE_KS = (1, 2, 4, 8, 16, 32, 64)
PROBE_QUESTION = "Describe the image in detail."


def cache_path() -> Path:
    root = os.environ.get("VLMSPEC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlmspec")
    return Path(root) / "costs.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(target: Target) -> str:
    device = target.device
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    return "|".join([hardware, f"{os.cpu_count()} cpus", f"{torch.get_num_threads()} threads",
                     f"torch {torch.__version__}", target.fingerprint(), str(target.dtype), str(device)])


def probe_inputs(target: Target) -> dict[str, torch.Tensor]:
    """A typical short request: one mid-gray image (VLMs) and a one-line question."""
    if target.supports_images:
        from PIL import Image

        return target.encode([Image.new("RGB", (224, 224), (128, 128, 128))], prompt=PROBE_QUESTION)
    return target.encode(prompt=PROBE_QUESTION)


def measure_target_costs(target: Target) -> dict[int, float]:
    """c(k) for `PROBE_KS` (k up to the context's room), three timed repeats after one warm-up."""
    from vlmspec.bench.costs import measure_costs

    inputs = probe_inputs(target)
    room = target.context_length - inputs["input_ids"].shape[1]
    ks = [k for k in PROBE_KS if k <= room] or [1]
    return measure_costs(target, inputs, ks, repeats=3, warmup=1)


def target_costs(target: Target, path: Path | None = None) -> dict[int, float]:
    """c(k) of `target` on this machine: from the cache when this machine, target and dtype were probed before,
    else measured now and added to the cache (written atomically; an unreadable cache is measured over)."""
    path = path or cache_path()
    key = cache_key(target)
    try:
        cache = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key in cache:
        return {int(k): float(v) for k, v in cache[key].items()}
    costs = measure_target_costs(target)
    cache[key] = {str(k): v for k, v in costs.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=1) + "\n")
    os.replace(tmp, path)
    return costs
