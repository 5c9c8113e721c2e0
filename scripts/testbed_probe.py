"""Probe a testbed training run without touching evaluation seeds: greedy accuracy on suites drawn from a
training-range seed, and the accuracy of the run's own auxiliary patch classifier per task on the patches of an
object, letter or bar (what the vision tower has learned to put on the image tokens).

    python scripts/testbed_probe.py runs/testbed-cpu                 # a run folder (its checkpoint.pt)
    python scripts/testbed_probe.py runs/testbed-cpu --n 60 --suites vqa,ocr,chart,caption

docs/testbed.md ("Next checkpoint") quotes this script's output. A finished model folder without a checkpoint
gets the accuracy part only.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from vlmspec.testbed import render
from vlmspec.testbed.data import EVAL_SEED_START, write_suite
from vlmspec.testbed.evaluate import evaluate_records, load, read_suite
from vlmspec.testbed.model import ArchConfig
from vlmspec.testbed.train import CHECKPOINT, export_checkpoint, image_features, make_aux_head, vision_batch

PROBE_SEED = EVAL_SEED_START - 10  # a training-range seed, never used by the training streams' own draws


@torch.no_grad()
def aux_accuracy(model, state: dict, batches: int = 8) -> dict[str, float]:
    """Per task: the run's aux head's accuracy on labelled patches (for kind and center: non-background only)."""
    head = make_aux_head(ArchConfig(**state["arch"]))
    head.load_state_dict(state["aux_head"])
    right: dict[str, float] = {}
    seen: dict[str, float] = {}
    for b in range(batches):
        batch = vision_batch(PROBE_SEED, b, 16, state["train"]["mix"])
        logits = head(image_features(model, batch["pixel_values"]).float())
        for task, task_logits in zip(render.AUX_TASKS, logits.split(list(render.AUX_TASKS.values()), dim=-1)):
            labels = batch["aux"][task]
            mask = labels > 0 if task in ("kind", "center") else labels >= 0
            right[task] = right.get(task, 0) + float((task_logits.argmax(-1)[mask] == labels[mask]).sum())
            seen[task] = seen.get(task, 0) + float(mask.sum())
    return {task: round(right[task] / seen[task], 3) for task in right if seen[task]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a testbed run folder (with checkpoint.pt) or a model folder")
    parser.add_argument("--n", type=int, default=40, help="samples per suite (default 40)")
    parser.add_argument("--suites", default="vqa,ocr,chart,caption", help="comma-separated suites")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, state = args.run, None
        if (args.run / CHECKPOINT).is_file():
            state = torch.load(args.run / CHECKPOINT, weights_only=False, map_location="cpu")
            model_dir = export_checkpoint(args.run, Path(tmp) / "model")
            report["step"] = state["step"]
        model, processor = load(model_dir)
        for name in args.suites.split(","):
            records = read_suite(write_suite(name, args.n, PROBE_SEED, Path(tmp) / name))
            result = evaluate_records(model, processor, records)
            report[name] = {"accuracy": round(result["accuracy"], 3),
                            **{k: round(v, 2) for k, v in result["by_category"].items()}}
        if state is not None:
            report["aux_accuracy"] = aux_accuracy(model.float(), state)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
