"""`vlmspec collect` and `vlmspec train`: thin wrappers over `train.collect.collect` and `train.trainer.train`.

Both run unchanged under `torchrun --nproc-per-node N` / `accelerate launch`: they join the launcher's process group
(`train.distributed`), put the target on this process's GPU (or, with `--device-map`, on its share of the node's
GPUs), and only rank 0 prints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def sources(args: argparse.Namespace, out: Path) -> tuple[list, list[str]]:
    """The samples named by --suites / --suite-file / --data, and a description of each source."""
    from vlmspec.bench.suites import read_suite

    files: list[Path] = []
    names: list[str] = []
    if args.suites:
        from vlmspec.testbed.data import SUITE_DEFAULTS, write_suite

        for name in [n.strip() for n in args.suites.split(",") if n.strip()]:
            if name not in SUITE_DEFAULTS:
                raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITE_DEFAULTS)}")
            count = args.suite_n or SUITE_DEFAULTS[name][0]
            folder = out / "suites" / f"{name}-n{count}-s{args.suite_seed}"
            files.append(folder / "suite.jsonl" if (folder / "suite.jsonl").exists()
                         else write_suite(name, count, args.suite_seed, folder))
            names.append(f"suite:{name}:n={count}:seed={args.suite_seed}")
    for path in args.suite_file:
        files.append(Path(path))
        names.append(f"file:{Path(path).resolve()}")
    for folder in args.data:
        for path in suite_files(folder):
            files.append(path)
            names.append(f"file:{path.resolve()}")
    if not files:
        raise ValueError("give the samples with --suites, --suite-file or --data")
    samples = [sample for path in files for sample in read_suite(path)]
    if args.max_samples is not None:
        if args.max_samples < 1:
            raise ValueError(f"--max-samples must be >= 1, got {args.max_samples}")
        samples = samples[: args.max_samples]
    return samples, names


def suite_files(folder: str | Path) -> list[Path]:
    """The JSONL suite files under a folder (recursively, sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"data folder {folder} does not exist")
    files = sorted(folder.rglob("*.jsonl"))
    if not files:
        raise ValueError(f"no .jsonl suite files under {folder}")
    return files


def collect_layers(args: argparse.Namespace, target) -> list[int]:
    """--layers, else the union of the feature layers of the --drafters types (default: every trainable type)."""
    from vlmspec.drafters.base import available_drafters, build_drafter, drafter_class

    if args.layers:
        try:
            layers = [int(part) for part in args.layers.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"--layers expects integers like 0,2,4; got {args.layers!r}") from None
        return sorted({layer % (target.num_layers + 1) if layer < 0 else layer for layer in layers})
    types = [t.strip() for t in args.drafters.split(",") if t.strip()] if args.drafters else \
        [t for t in available_drafters() if drafter_class(t).trainable]
    layers: set[int] = {target.num_layers}
    for drafter_type in types:
        drafter_class(drafter_type)                                     # a clear error for an unknown type
        layers.update(build_drafter(drafter_type, target).feature_layers())
    return sorted(layers)


def load_target(name: str, dtype: str, device_map: str | None = None):
    """The target on this process's device (the CPU for a single process), or placed by `--device-map`."""
    from vlmspec.target import Target
    from vlmspec.train import distributed

    target = Target.from_pretrained(name, dtype=dtype, **distributed.target_placement(device_map))
    device = distributed.current().device
    if device_map is None and device.type != "cpu":
        target.model.to(device)
    return target


def collect_command(args: argparse.Namespace) -> int:
    from vlmspec.train import distributed

    with distributed.process_group(backend="gloo"):            # collect exchanges only a few small objects
        return collect_in_group(args)


def collect_in_group(args: argparse.Namespace) -> int:
    from vlmspec.train import distributed
    from vlmspec.train.collect import CollectConfig, collect

    if (args.long_answer_suffix or args.regenerate_with) and not args.regenerate:
        raise ValueError("--long-answer-suffix and --regenerate-with only apply with --regenerate")
    if args.shard_size < 1 or args.max_new_tokens < 1:
        raise ValueError("--shard-size and --max-new-tokens must be >= 1")
    out = Path(args.out)
    samples, names = distributed.on_main(lambda: sources(args, out))   # rank 0 alone writes generated suites
    target = load_target(args.target, args.dtype, args.device_map)
    config = CollectConfig(layers=collect_layers(args, target), regenerate=args.regenerate,
                           long_answer_suffix=args.long_answer_suffix, max_new_tokens=args.max_new_tokens,
                           shard_size=args.shard_size, sources=names)
    generator = None
    if args.regenerate_with:
        from vlmspec.engine import Generator
        from vlmspec.runtime import open_drafter
        from vlmspec.tree import TreeConfig

        drafter, tree = open_drafter(args.regenerate_with, target)
        generator = Generator(target, drafter, tree or TreeConfig())
    collect(target, samples, out, config, progress=not args.quiet, generator=generator)
    rank = distributed.current()
    if rank.main:
        done = "collected" if not rank.active else f"rank 0 of {rank.world} collected its shards of"
        print(f"{done} {len(samples)} samples (layers {config.layers}) into {out}")
    return 0


def add_collect_parser(sub) -> None:
    parser = sub.add_parser("collect", help="run the target over samples and store drafter training data",
                            description="Run the target once per sample (teacher forcing on prompt + reference, or "
                                        "--regenerate: the target writes the answer) and store token ids, loss mask, "
                                        "image mask, positions and hidden states (bf16) as resumable shards.")
    parser.add_argument("--target", default="testbed", help="model directory, or 'testbed'")
    parser.add_argument("--suites", default=None,
                        help="testbed suites, e.g. describe,vqa, generated with training seeds (see --suite-seed)")
    parser.add_argument("--suite-n", type=int, default=None, help="samples per --suites suite (default: its n)")
    parser.add_argument("--suite-seed", type=int, default=0,
                        help="seed of the --suites samples (default 0: a training seed, disjoint from the "
                             "evaluation suites)")
    parser.add_argument("--suite-file", action="append", default=[], metavar="F", help="a JSONL suite (repeatable)")
    parser.add_argument("--data", action="append", default=[], metavar="DIR",
                        help="a folder of JSONL suites (repeatable)")
    parser.add_argument("--out", required=True, help="output folder (rerun to resume)")
    parser.add_argument("--regenerate", action="store_true", help="answers written by the target itself (greedy)")
    parser.add_argument("--long-answer-suffix", default="", metavar="S",
                        help="with --regenerate: text appended to the prompt, e.g. 'Answer in detail.'")
    parser.add_argument("--regenerate-with", default=None, metavar="DRAFTER",
                        help="with --regenerate: write the answers with this drafter (a checkpoint or "
                             "testbed:<type>) — the same answers, faster (speculative decoding is lossless)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="regenerated answer budget")
    parser.add_argument("--layers", default=None, help="hidden-state indices to store, e.g. 0,2,4 (0 = embeddings)")
    parser.add_argument("--drafters", default=None,
                        help="store the layers these drafter types need (default: every trainable type)")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--shard-size", type=int, default=32, help="samples per shard")
    parser.add_argument("--dtype", default="fast",
                        help="target dtype: fast (default: bf16 where the CPU computes it natively, else fp32), "
                             "checkpoint (the checkpoint's), bf16, fp16 or fp32")
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="place the target with HF's device_map, e.g. auto: its layers spread over the node's "
                             "GPUs (for a target too big for one; each torchrun process gets its own block of GPUs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=collect_command)


def train_command(args: argparse.Namespace) -> int:
    from vlmspec.train import distributed

    with distributed.process_group():
        return train_in_group(args)


def train_in_group(args: argparse.Namespace) -> int:
    from vlmspec.runtime import parse_options
    from vlmspec.train import distributed
    from vlmspec.train.trainer import SUMMARY_STEPS, TrainConfig, train

    config = TrainConfig(drafter_type=args.drafter, steps=args.steps, minutes=args.minutes, seed=args.seed,
                         lr=args.lr, batch_size=args.batch_size, warmup=args.warmup, weight_decay=args.weight_decay,
                         clip=args.clip, bf16=not args.no_bf16, checkpoint_every=args.checkpoint_every,
                         loss=args.loss or "", curriculum=args.curriculum or "",
                         drafter_options=parse_options(args.drafter_option), tree=args.tree, init=args.init,
                         fsdp=args.fsdp, stop_at=args.stop_at)
    target = load_target(args.target, args.dtype)
    train(target, args.data, args.out, config, progress=not args.quiet)
    if not distributed.current().main:
        return 0
    summary = json.loads((Path(args.out) / "train_config.json").read_text())["final_metrics"]
    shown = ", ".join(f"{key} {value:.3f}" for key, value in summary.items() if key == "loss" or key.startswith("acc@"))
    print(f"drafter written to {args.out}" + (f" (last {SUMMARY_STEPS} steps: {shown})" if shown else ""))
    return 0


def add_train_parser(sub) -> None:
    parser = sub.add_parser("train", help="train a drafter on collected data",
                            description="Train a drafter on `vlmspec collect` output. Rerunning the same command on "
                                        "the same --out resumes from its last checkpoint; --out ends as a drafter "
                                        "checkpoint usable as `--drafter OUT`.")
    parser.add_argument("--drafter", required=True, help="drafter type, e.g. eagle, eagle3, lumen")
    parser.add_argument("--target", default="testbed", help="model directory, or 'testbed'")
    parser.add_argument("--data", nargs="+", required=True, metavar="DIR", help="collected data folder(s)")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, log, final drafter)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget (stops at the first limit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=4,
                        help="the global batch: under torchrun each of N processes takes batch-size / N samples")
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default min(100, steps/10))")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    parser.add_argument("--loss", default=None, metavar="KEY=VALUE,…",
                        help="loss options over the drafter's defaults: feature_weight, logit_weight, steps, "
                             "step_decay, feature_noise, ranking_weight, ranking_topk, self_correction, "
                             "sampled_token, kv_consistency_weight")
    parser.add_argument("--curriculum", default=None, metavar="text-first:STEPS,ramp:STEPS",
                        help="MSD curriculum: text-only samples first, then a linear ramp of the multimodal share")
    parser.add_argument("--drafter-option", action="append", default=[], metavar="KEY=VALUE",
                        help="drafter config option, e.g. layers=1,4,7 (repeatable)")
    parser.add_argument("--tree", default=None, help="recommended tree saved with the drafter")
    parser.add_argument("--init", default=None, metavar="DRAFTER",
                        help="start from this trained drafter of the same type (a folder or testbed:<type>) "
                             "instead of random weights, e.g. to follow a fine-tuned target")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="end this run after step STEP (checkpointed; the schedule still counts --steps); "
                             "rerun, on any number of processes, to continue")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard the drafter's weights, gradients and optimizer state across "
                             "the processes (FSDP) instead of a whole copy per process (DDP)")
    parser.add_argument("--no-bf16", action="store_true", help="train in fp32 (default: bf16 autocast)")
    parser.add_argument("--dtype", default="fp32", help="target dtype during training (default fp32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=train_command)
