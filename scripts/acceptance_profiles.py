"""Write each shipped drafter's acceptance profile (what `--tree auto` reads) from one bench of all of them.

    vlmspec bench --drafters none,testbed:eagle,testbed:eagle3,testbed:msd,testbed:vispec,testbed:flash,testbed:lumen \
      --trees "kind=chain,depth=8;kind=dynamic,depth=1,topk=2,total=2;kind=dynamic,depth=1,topk=4,total=4;\
kind=dynamic,depth=1,topk=8,total=8;kind=dynamic,depth=4,topk=4,total=16" \
      --suites describe,text_chat,caption,multi_image --limit 3 --max-new-tokens 96 --temperatures 0 --out rank-probe
    python scripts/acceptance_profiles.py rank-probe/summary.json "NOTE ON THE RUN"

For each `testbed:<type>` arm in the summary, `autotree.profile_from_summary` reads acceptance by depth off the
chain arm, by rank off the depth-1 top-k arms, and the draft cost ratios (per forward, per node) off every arm's
steps; the result goes into `src/vlmspec/testbed/drafters/<type>/config.json` under `acceptance` (weights and the
rest untouched).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from vlmspec.autotree import profile_from_summary
from vlmspec.testbed import SHIPPED_DRAFTERS_DIR


def main(summary_path: str, note: str) -> None:
    summary = json.loads(Path(summary_path).read_text())
    names = sorted({arm["name"].split(" ")[0] for arm in summary["arms"] if arm["name"].startswith("testbed:")})
    for name in names:
        config_path = SHIPPED_DRAFTERS_DIR / name.split(":", 1)[1] / "config.json"
        meta = json.loads(config_path.read_text())
        tokens_per_forward = int(meta.get("config", {}).get("tokens_per_forward", 1) or 1)
        profile = dataclasses.replace(profile_from_summary(summary, name, tokens_per_forward), source=note)
        meta["acceptance"] = profile.to_dict()
        config_path.write_text(json.dumps(meta, indent=2) + "\n")
        print(f"{name}: by_depth {[round(a, 3) for a in profile.by_depth]}, by_rank "
              f"{[round(c, 3) for c in profile.by_rank]}, draft forward / c(1) {profile.draft_cost_ratio:.3f}, "
              f"drafted node / c(1) {profile.draft_node_ratio}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/acceptance_profiles.py BENCH_SUMMARY.json NOTE")
    main(sys.argv[1], sys.argv[2])
