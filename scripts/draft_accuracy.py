"""Held-out draft accuracy: acc@d of trained drafters on collected data they were not trained on.

    vlmspec collect --target testbed --suite-file EVAL.jsonl --regenerate --out evaldata
    python scripts/draft_accuracy.py --target testbed --data evaldata --drafters testbed:eagle abl/msd-mixed …

acc@d (DESIGN's per-depth accuracy, teacher-forced tokens): the share of answer positions where the draft's argmax
at depth d equals the target's argmax, depth d ≥ 2 drafted on the draft's own features (the training-time-test
unroll, `--steps`; flash's depth 2 comes from its head). Unlike τ it has no ceiling from the tree size or the
answer length, so it separates drafters that all accept nearly everything in short answers. Prints a Markdown
table (pairs-weighted means over the data).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from vlmspec.drafters import load_drafter
from vlmspec.target import Target
from vlmspec.train.data import CollectedData


def accuracy(drafter, target: Target, folders: list[str], steps: int, batch_size: int = 8) -> dict[str, float]:
    data = CollectedData(folders, drafter.feature_layers(), target)
    config = drafter.default_loss_config()
    config = dataclasses.replace(config, steps=1 if drafter.drafter_type == "flash" else steps,
                                 self_correction=False, sampled_token=False, kv_consistency_weight=0.0)
    totals: dict[str, float] = {}
    pairs = 0.0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = data.batch(range(start, min(start + batch_size, len(data))))
            _, metrics = drafter.training_loss(batch, config)
            for key, value in metrics.items():
                if key.startswith("acc@"):
                    totals[key] = totals.get(key, 0.0) + value * metrics["pairs"]
            pairs += metrics["pairs"]
    return {key: value / pairs for key, value in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="testbed")
    parser.add_argument("--data", nargs="+", required=True, help="collected folders (not the training data)")
    parser.add_argument("--drafters", nargs="+", required=True, help="checkpoint folders or testbed:<type>")
    parser.add_argument("--steps", type=int, default=3, help="depths evaluated (unrolled on the draft's features)")
    args = parser.parse_args()
    target = Target.from_pretrained(args.target, dtype=torch.float32)
    rows = []
    for name in args.drafters:
        drafter = load_drafter(name, target).float().eval()
        rows.append((name, accuracy(drafter, target, args.data, args.steps)))
    depths = sorted({key for _, acc in rows for key in acc}, key=lambda k: int(k[4:]))
    print("| drafter | " + " | ".join(depths) + " |\n|---|" + "---|" * len(depths))
    for name, acc in rows:
        print(f"| {name} | " + " | ".join(f"{acc[d]:.3f}" if d in acc else "–" for d in depths) + " |")


if __name__ == "__main__":
    main()
