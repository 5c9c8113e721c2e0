"""`vlmspec bench …`: a thin wrapper over `run_bench`."""

from __future__ import annotations

import argparse
import sys


def split(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def split_trees(text: str) -> tuple[str, ...]:
    """'T1;T2;…' → trees (a tree itself holds commas)."""
    return tuple(tree.strip() for tree in text.split(";") if tree.strip())


def temperatures(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in split(text))
    except ValueError:
        raise ValueError(f"--temperatures must be comma-separated numbers, got {text!r}") from None


def concurrency(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in split(text))
    except ValueError:
        raise ValueError(f"--concurrency must be comma-separated integers, got {text!r}") from None


def config_from_args(args: argparse.Namespace):
    from vlmspec.bench.runner import BenchConfig

    drafters = split(args.drafters)
    return BenchConfig(target=args.target, drafters=drafters, suites=split(args.suites),
                       suite_files=tuple(args.suite_file), temperatures=temperatures(args.temperatures),
                       max_new_tokens=args.max_new_tokens, dtype=args.dtype, tree=args.tree,
                       trees=split_trees(args.trees), out=args.out,
                       resume=args.resume, limit=args.limit, warmup=args.warmup, seed=args.seed,
                       peers=split(args.peers), device=args.device, drafter_options=tuple(args.drafter_option),
                       cost_repeats=args.cost_repeats, plots=not args.no_plots,
                       concurrency=concurrency(args.concurrency))


def bench_command(args: argparse.Namespace) -> int:
    from vlmspec.bench.report import across_table
    from vlmspec.bench.runner import run_bench

    out = run_bench(config_from_args(args), progress=not args.quiet)
    import json

    summary = json.loads((out / "summary.json").read_text())
    if args.concurrency:
        from vlmspec.bench.throughput import across_table as throughput_table

        print(throughput_table(summary))
    else:
        print(across_table(summary))
    print(f"\nreport: {out / 'report.md'}  records: {out / 'records.jsonl'}  summary: {out / 'summary.json'}",
          file=sys.stderr)
    return 0


def add_run_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The options `bench` and `tune` share: what runs (target, suites, length, dtype, device, seed)."""
    parser.add_argument("--target", default="testbed", help="model directory, or 'testbed' (default)")
    parser.add_argument("--suites", default="", help="comma-separated testbed suites (default n and seed)")
    parser.add_argument("--suite-file", action="append", default=[], metavar="FILE",
                        help="a suite JSONL file (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="first N samples of each suite")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--dtype", default="fast",
                        help="fast (default: bf16 where --device computes bf16 natively, else fp32), bf16, fp16, "
                             "fp32, or checkpoint (its own dtype)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the per-sample sampling seeds")


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "bench", help="measure speedup, τ and acceptance of drafters and peers on suites",
        description="Run plain decoding, each drafter and each peer on the same samples in one process (per "
                    "sample all arms back to back, after a warm-up) and write DIR/records.jsonl, summary.json, "
                    "report.md and PNG plots. See docs/benchmarks.md for every column.")
    add_run_arguments(parser, max_new_tokens=64)
    parser.add_argument("--drafters", default="none",
                        help="comma-separated arms: none (plain, always run), registered types (untrained), "
                             "checkpoint directories, testbed:<type>")
    parser.add_argument("--drafter-option", action="append", default=[], metavar="ARM:KEY=VALUE",
                        help="option of a drafter arm (repeatable): a config option of an untrained type, e.g. "
                             "draft-model:model=DIR, or that arm's own tree, e.g. "
                             "draft-model:tree=kind=chain,depth=4")
    parser.add_argument("--peers", default="",
                        help="comma-separated Hugging Face peers: hf-generate, hf-assisted:DIR, "
                             "hf-prompt-lookup[:N]")
    parser.add_argument("--temperatures", default="0", help="comma-separated, e.g. 0,1 (0 = greedy)")
    parser.add_argument("--tree", default=None,
                        help="draft tree for every drafter arm: auto, recommended, or explicit, e.g. "
                             "kind=dynamic,depth=6,topk=8,total=32 (default: auto for checkpoints, the default "
                             "tree for untrained types; see `vlmspec generate --help`)")
    parser.add_argument("--trees", default="", metavar="TREE;TREE…",
                        help="run every drafter arm under each of these trees, as arms 'DRAFTER [TREE]' (compare "
                             "trees on the same samples in one process; `vlmspec tune` ranks them)")
    parser.add_argument("--concurrency", default="", metavar="C,C…",
                        help="instead of per-sample latency: total tokens/s of plain vs speculative batching "
                             "through the batched engine at each max batch size, e.g. 1,4,8,16 (report and "
                             "throughput.png; see docs/benchmarks.md)")
    parser.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    parser.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up generations per arm (default 1)")
    parser.add_argument("--cost-repeats", type=int, default=11, help="timed repeats per k for c(k) (default 11)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=bench_command)
    return parser
