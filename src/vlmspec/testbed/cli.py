"""`vlmspec testbed build | data | eval`: thin wrappers over train.build, data.write_suite, evaluate.evaluate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from vlmspec.testbed.data import MIXES
    from vlmspec.testbed.train import TrainConfig, build

    if args.mix not in MIXES:
        raise ValueError(f"unknown mix {args.mix!r}; choose from {', '.join(MIXES)}")
    if args.init is not None and not (args.init / "config.json").is_file():
        raise ValueError(f"--init {args.init} is not a model folder (no config.json)")
    cfg = TrainConfig()
    overrides = {"batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "threads": args.threads,
                 "vision_steps": args.vision_steps, "vision_lr": args.vision_lr,
                 "shuffle_image_tokens": args.shuffle_image_tokens, "mirror_image_tokens": args.mirror_image_tokens,
                 "attend_weight": args.attend_weight, "attend_layer": args.attend_layer,
                 "attend_heads": args.attend_heads, "attend_at": args.attend_at,
                 "deep_aux_weight": args.deep_aux_weight, "deep_aux_layer": args.deep_aux_layer}
    if args.followups < 0:
        raise ValueError(f"--followups must be >= 0, got {args.followups}")
    cfg = replace(cfg, mix=args.mix, per_answer_loss=not args.token_mean_loss, followups=args.followups,
                  count_followups=args.count_followups, bf16=not args.no_bf16,
                  **{k: v for k, v in overrides.items() if v is not None})
    if cfg.batch_size < 1 or cfg.lr <= 0 or cfg.threads < 1 or cfg.vision_lr <= 0:
        raise ValueError("batch size, learning rates and threads must be positive")
    for flag, chance in (("shuffle", cfg.shuffle_image_tokens), ("mirror", cfg.mirror_image_tokens)):
        if not 0 <= chance <= 1:
            raise ValueError(f"--{flag}-image-tokens is a probability, got {chance}")
    if cfg.vision_steps < 0:
        raise ValueError(f"--vision-steps must be >= 0, got {cfg.vision_steps}")
    out = build(out=args.out, seed=args.seed, steps=args.steps, minutes=args.minutes, device=args.device,
                workers=args.workers, train=cfg, init=args.init)
    print(out)
    return 0


def _data(args: argparse.Namespace) -> int:
    from vlmspec.testbed.data import write_suite

    print(write_suite(args.suite, args.n, args.seed, args.out))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from vlmspec.testbed import shipped_path
    from vlmspec.testbed.data import SUITES
    from vlmspec.testbed.evaluate import evaluate, summary_table

    model_dir = args.model or shipped_path()
    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a model folder (no config.json)")
    suites = tuple(args.suites.split(",")) if args.suites else SUITES
    report = evaluate(Path(model_dir), n=args.n, suites=suites)
    print(summary_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    from vlmspec.testbed.data import EVAL_SEED_START, SUITES

    parser = subparsers.add_parser("testbed", help="build, generate data for, or evaluate the testbed VLM",
                                   description=__doc__)
    sub = parser.add_subparsers(dest="testbed_command", required=True, metavar="ACTION")

    build = sub.add_parser("build", help="train the testbed model from scratch (resumes from --out)")
    build.add_argument("--out", type=Path, default=None,
                       help="run folder (default: a new runs/testbed-<timestamp>); resumes if it has a checkpoint")
    build.add_argument("--seed", type=int, default=0, help=f"training seed, in [0, {EVAL_SEED_START})")
    build.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's 3000)")
    build.add_argument("--minutes", type=float, default=None, help="wall-time cap; a later call resumes")
    build.add_argument("--device", default="cpu", help="torch device (default cpu)")
    build.add_argument("--workers", type=int, default=0, help="data worker processes (default 0)")
    build.add_argument("--init", type=Path, default=None, help="start from this saved testbed model's weights")
    build.add_argument("--no-bf16", action="store_true",
                       help="train in fp32 (default: bf16 autocast; use this where the CPU has no AVX512-BF16 or "
                            "AMX, which emulates bf16 many times slower)")
    build.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 16)")
    build.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    build.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 150)")
    build.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default 2; use 1 on a CPU shared with other jobs)")
    build.add_argument("--mix", default="short", help="training mixture: base, short or focus (default short)")
    build.add_argument("--token-mean-loss", action="store_true",
                       help="average the loss over answer tokens instead of per answer (stage 1 of the recipe)")
    build.add_argument("--vision-steps", type=int, default=None,
                       help="vision pretraining steps before the main steps (vision tower, projector and the "
                            "patch classifier on labelled images; default 0)")
    build.add_argument("--vision-lr", type=float, default=None, help="peak learning rate of vision pretraining")
    build.add_argument("--followups", type=int, default=0,
                       help="up to N more questions about the same scene or chart as further chat turns (default 0)")
    build.add_argument("--count-followups", choices=("all", "multiple"), default="all",
                       help="which count questions the follow-up turns may ask: all (default), or multiple, only of "
                            "kinds the scene holds more than once (with all, most count answers are 1)")
    build.add_argument("--shuffle-image-tokens", type=float, default=None, metavar="P",
                       help="chance that an image's tokens reach the language model in a random order during "
                            "the main phase, so positions must be read from the tokens' content (default 0)")
    build.add_argument("--mirror-image-tokens", type=float, default=None, metavar="P",
                       help="chance, per axis, that an image's token grid reaches the language model with its "
                            "rows or each row's tokens reversed during the main phase (neighbours stay "
                            "neighbours; positions must be read from content; default 0)")
    build.add_argument("--attend-weight", type=float, default=None, metavar="W",
                       help="weight of the attention-focus loss: where a question names a color or shape, one "
                            "position of the question is taught to attend to those objects' image tokens "
                            "(default 0: off)")
    build.add_argument("--attend-layer", type=int, default=None,
                       help="decoder layer the attention-focus loss supervises (default 4)")
    build.add_argument("--attend-heads", type=int, default=None,
                       help="how many of that layer's heads it supervises, from head 0 (default 1)")
    build.add_argument("--attend-at", choices=("name", "answer"), default=None,
                       help="the position it supervises: the last token naming the objects, or the one that "
                            "predicts the answer (default name)")
    build.add_argument("--deep-aux-weight", type=float, default=None, metavar="W",
                       help="weight of a second patch classifier on the language model's image-token states, "
                            "which keeps the patch facts on them up to --deep-aux-layer (default 0: off)")
    build.add_argument("--deep-aux-layer", type=int, default=None,
                       help="decoder layer at whose input that classifier reads (default 8)")
    build.set_defaults(run=_build)

    data = sub.add_parser("data", help="write a suite: DIR/suite.jsonl plus images")
    data.add_argument("--suite", required=True, help=f"one of {', '.join(SUITES)}")
    data.add_argument("--n", type=int, required=True, help="number of samples")
    data.add_argument("--seed", type=int, required=True,
                      help=f"evaluation seeds are >= {EVAL_SEED_START}; training uses seeds below it")
    data.add_argument("--out", type=Path, required=True, help="output folder")
    data.set_defaults(run=_data)

    ev = sub.add_parser("eval", help="accuracy, blank-image control, diversity and entropy per suite")
    ev.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped testbed)")
    ev.add_argument("--n", type=int, default=None, help="samples per suite (default: each suite's default n)")
    ev.add_argument("--suites", default=None, help="comma-separated suite names (default: all)")
    ev.add_argument("--json", type=Path, default=None, help="also write the full report (with answers) here")
    ev.set_defaults(run=_eval)
    return parser
