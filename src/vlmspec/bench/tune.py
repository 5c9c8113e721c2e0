"""`vlmspec tune`: find the draft tree that runs one drafter fastest on this machine, and save it as the
checkpoint's recommended tree.

The best tree depends on the hardware's price of a k-token forward (c(k)/c(1)) as much as on the drafter: on a
2-core AVX2 CPU in fp32, a top-2 tree of 10 nodes beat the d5/k4/16 tuned on a CPU with bf16 units by 12% on
average over the seven testbed suites (docs/benchmarks.md, "bf16 without bf16 hardware"). All candidate trees run
in one `vlmspec bench` (`--trees`: per sample, plain decoding and then the drafter under each tree, back to back in
one process), so the numbers mean what the bench says and compare trees under the same machine state, which
separate runs do not; the winner has the highest geometric-mean speedup over the suites. A killed run resumes as
the bench does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

from vlmspec.tree import TreeConfig

# `--tree auto`'s own choice (so tune is its measured check), then narrow trees (cheap to verify where c(k) grows
# fast) to wide ones (where it is flat: bf16 hardware, GPUs)
DEFAULT_TREES = ("auto", "kind=chain,depth=5,min_prob=0.02", "kind=dynamic,depth=4,topk=2,total=8,min_prob=0.02",
                 "kind=dynamic,depth=6,topk=2,total=10,min_prob=0.02",
                 "kind=dynamic,depth=8,topk=2,total=12,min_prob=0.02",
                 "kind=dynamic,depth=5,topk=4,total=16,min_prob=0.02",
                 "kind=dynamic,depth=8,topk=6,total=24,min_prob=0.02",
                 "kind=dynamic,depth=6,topk=8,total=32,min_prob=0.02")


def tune(target: str, drafter: str, trees: Sequence[str], out: Path, progress: bool = True,
         **bench_options) -> list[dict]:
    """One bench run in `out` with `drafter` under every tree (`--trees`: per sample, plain decoding and then each
    tree back to back); return one row per tree (`tree` as given, `resolved`: the tree that ran, as a dict, which
    differs for `auto` and `recommended`; `speedup`, `tau`), fastest first. `bench_options` are
    `BenchConfig` fields (suites, suite_files, limit, temperatures, max_new_tokens, dtype, device, seed, warmup,
    cost_repeats). A rerun with the same `out` resumes the bench (which refuses other settings)."""
    from vlmspec.bench.runner import BenchConfig, run_bench, tree_arm_name

    if drafter == "none":
        raise ValueError("tune needs a drafter: --drafter none has no tree")
    if not trees:
        raise ValueError("no candidate trees")
    temperatures = tuple(bench_options.get("temperatures", (0.0,)))
    if len(temperatures) != 1:
        raise ValueError(f"tune compares trees at one temperature, got {list(temperatures)}")
    out = Path(out)
    config = BenchConfig(target=target, drafters=("none", drafter), trees=tuple(trees), out=str(out),
                         resume=(out / "records.jsonl").exists(), plots=False, **bench_options)
    run_bench(config, progress=progress)
    summary = json.loads((out / "summary.json").read_text())
    across = {row["arm"]: row for row in summary["across_suites"]}
    resolved = {arm["name"]: arm["tree"] for arm in summary["arms"]}
    rows = [{"tree": tree, "resolved": resolved[tree_arm_name(drafter, tree)],
             "speedup": across[tree_arm_name(drafter, tree)]["speedup_geomean"],
             "tau": across[tree_arm_name(drafter, tree)]["tau_mean"]} for tree in trees]
    ranked = sorted(rows, key=lambda r: -(r["speedup"] or 0.0))
    if ranked[0]["speedup"] is None:
        raise ValueError(f"{drafter} failed under every tree; see {out / 'report.md'}")
    (out / "tune.json").write_text(json.dumps({"target": target, "drafter": drafter, "temperature":
                                               temperatures[0], "trees": ranked}, indent=1) + "\n")
    return ranked


def save_target(drafter: str, dest: Path) -> Path:
    """The checkpoint folder `--save` copies; a clear error, before any bench runs, when there is none or `dest`
    holds files."""
    from vlmspec.drafters import available_drafters
    from vlmspec.drafters.base import read_drafter_meta, resolve_drafter_path

    if drafter in available_drafters() and not Path(drafter).exists():
        raise ValueError(f"--save needs a drafter checkpoint; {drafter!r} is an untrained type")
    source = resolve_drafter_path(drafter)
    read_drafter_meta(source)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"{dest} exists and is not an empty folder: choose another --save folder")
    return source


def save_with_tree(drafter: str, tree: TreeConfig, dest: Path, summary: dict | None = None) -> Path:
    """Copy the drafter checkpoint to `dest` (which must not exist or be empty) with `tree` as its recommended
    tree and, from the tune's bench `summary`, its acceptance profile for `--tree auto` (`autotree`; kept as it was
    when the candidate trees hold no chain); weights and the rest of its config unchanged."""
    from vlmspec.autotree import profile_from_summary
    from vlmspec.drafters.base import read_drafter_meta

    dest = Path(dest)
    source = save_target(drafter, dest)
    meta = read_drafter_meta(source)
    shutil.copytree(source, dest, dirs_exist_ok=True)
    meta["tree"] = tree.to_dict()
    if summary is not None:
        tokens_per_forward = int(meta.get("config", {}).get("tokens_per_forward", 1) or 1)
        try:
            meta["acceptance"] = profile_from_summary(summary, drafter, tokens_per_forward).to_dict()
        except ValueError as error:
            print(f"acceptance profile not updated: {error}", file=sys.stderr)
    (dest / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dest


def tree_flag(tree: TreeConfig) -> str:
    """The `--tree` text of a tree."""
    return (f"kind={tree.kind},depth={tree.depth},topk={tree.topk},total={tree.total_tokens},"
            f"min_prob={tree.min_prob:g}")


def table(rows: list[dict]) -> str:
    lines = ["| tree | speedup (geomean) | τ (mean) |", "|---|---|---|"]
    for i, row in enumerate(rows):
        speedup = "failed" if row["speedup"] is None else f"{row['speedup']:.2f}"
        tau = "–" if row["tau"] is None else f"{row['tau']:.2f}"
        tree = row["tree"] if "=" in row["tree"] else \
            f"{row['tree']}: {tree_flag(TreeConfig.from_dict(row['resolved']))}"
        lines.append(f"| {tree} | {'**' + speedup + '**' if i == 0 else speedup} | {tau} |")
    return "\n".join(lines)


def tune_command(args: argparse.Namespace) -> int:
    from vlmspec.bench.cli import split, split_trees

    trees = split_trees(args.trees)
    if args.save:
        save_target(args.drafter, Path(args.save))
    rows = tune(args.target, args.drafter, trees, Path(args.out), progress=not args.quiet,
                suites=split(args.suites), suite_files=tuple(args.suite_file), limit=args.limit,
                temperatures=(args.temperature,), max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                device=args.device, seed=args.seed, cost_repeats=args.cost_repeats)
    print(table(rows))
    from vlmspec.runtime import TREE_WORDS

    best = TreeConfig.from_dict(rows[0]["resolved"])
    shown = rows[0]["tree"] if rows[0]["tree"] not in TREE_WORDS else f"{tree_flag(best)} ({rows[0]['tree']})"
    print(f"\nfastest: --tree {shown}  (the bench report: {Path(args.out) / 'report.md'})")
    if args.save:
        summary = json.loads((Path(args.out) / "summary.json").read_text())
        saved = save_with_tree(args.drafter, best, Path(args.save), summary)
        print(f"saved: {saved} (the weights of {args.drafter}, recommending that tree, with the acceptance "
              f"profile --tree auto reads)")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    from vlmspec.bench.cli import add_run_arguments

    parser = sub.add_parser(
        "tune", help="find the fastest draft tree for a drafter on this machine",
        description="Bench one drafter under each candidate tree in one `vlmspec bench` run (per sample, plain "
                    "decoding and then each tree, back to back) and rank the trees by geometric-mean speedup; "
                    "--save writes a copy of the checkpoint that recommends the winner. Tune on suites you do "
                    "not report. See docs/benchmarks.md.")
    add_run_arguments(parser, max_new_tokens=128)
    parser.add_argument("--drafter", required=True,
                        help="checkpoint directory, testbed:<type>, or a registered type")
    parser.add_argument("--trees", default=";".join(DEFAULT_TREES),
                        help="candidate trees separated by ';', 'auto' and 'recommended' included (default: auto, "
                             "then seven from a 6-node chain to a 32-node tree, all with min_prob=0.02)")
    parser.add_argument("--temperature", type=float, default=0.0, help="the one temperature compared (default 0)")
    parser.add_argument("--cost-repeats", type=int, default=3, help="timed repeats per k for c(k) (default 3)")
    parser.add_argument("--out", default="tune-out", help="folder of the bench report and tune.json "
                                                          "(default ./tune-out; a rerun resumes)")
    parser.add_argument("--save", default=None, metavar="DIR",
                        help="write the drafter with the fastest tree as its recommended tree into DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=tune_command)
    return parser
