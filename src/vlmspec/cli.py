"""`vlmspec …` command line: each subcommand is a thin wrapper over an importable function.

Errors at the boundary (bad files, prompts, configs) are `ValueError`s; `main` prints them as one line and
exits with status 2.
"""

from __future__ import annotations

import argparse
import sys


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus filter in (0, 1]; 1 = off")
    parser.add_argument("--top-k", type=int, default=0, help="top-k filter; 0 = off")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="testbed", help="model directory, or 'testbed' (the shipped model)")
    parser.add_argument("--drafter", default="none",
                        help="'none' (plain decoding), a registered type (untrained), a checkpoint directory or "
                             "testbed:<type>")
    parser.add_argument("--drafter-option", action="append", default=[], metavar="KEY=VALUE",
                        help="option of an untrained drafter type, e.g. model=DIR for draft-model (repeatable)")
    parser.add_argument("--tree", default=None,
                        help="draft tree: auto (the tree expected fastest on this machine, from a cached c(k) probe "
                             "and the checkpoint's acceptance profile), recommended (the checkpoint's own tree), or "
                             "explicit, e.g. kind=dynamic,depth=6,topk=8,total=32 (default: auto for a checkpoint, "
                             "kind=dynamic,depth=6,topk=8,total=32 for an untrained drafter)")
    parser.add_argument("--dtype", default="fast",
                        help="fast (default: bf16 where the device computes bf16 natively, a GPU with bf16 or a CPU "
                             "with AVX512-BF16 or AMX, else fp32), fp32, bf16, fp16, or checkpoint (its own dtype)")


def generate_command(args: argparse.Namespace) -> int:
    import json

    from vlmspec.engine import check_max_new_tokens
    from vlmspec.inputs import resolve_prompt
    from vlmspec.runtime import open_generator
    from vlmspec.verify import SamplingConfig

    # Validate everything cheap before loading a model.
    SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    check_max_new_tokens(args.max_new_tokens)
    images, _ = resolve_prompt(args.image, args.prompt, None)
    generator = open_generator(args.target, args.drafter, args.tree, args.dtype, args.drafter_option)
    kwargs = dict(images=images, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                  stop=args.stop)
    if args.json:
        print(json.dumps(generator.generate(**kwargs).to_dict()))
        return 0
    for piece in generator.stream(**kwargs):
        if isinstance(piece, str):
            print(piece, end="", flush=True)
        else:
            stats = piece.stats
            print(f"\n[{stats.new_tokens} tokens, {stats.target_forwards} target forwards, tau {stats.tau:.2f}, "
                  f"{stats.new_tokens / max(stats.decode_seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def add_generate_parser(sub) -> None:
    parser = sub.add_parser("generate", help="answer one prompt (with images) by speculative decoding",
                            description="Answer one prompt with the target, drafting with --drafter; the output is "
                                        "exactly the target's own (greedy) or an exact sample of it.")
    add_model_arguments(parser)
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    parser.add_argument("--prompt", required=True, help="the prompt; <image> marks where each image goes")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    add_sampling_arguments(parser)
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, stats")
    parser.set_defaults(run=generate_command)


def build_parser() -> argparse.ArgumentParser:
    from vlmspec import __version__
    from vlmspec import demo, export
    from vlmspec.bench import cli as bench_cli
    from vlmspec.bench import tune as tune_cli
    from vlmspec.serve import cli as serve_cli
    from vlmspec.testbed import cli as testbed_cli
    from vlmspec.train import cli as train_cli

    parser = argparse.ArgumentParser(prog="vlmspec", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vlmspec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate_parser(sub)
    testbed_cli.add_parser(sub)
    train_cli.add_collect_parser(sub)
    train_cli.add_train_parser(sub)
    bench_cli.add_parser(sub)
    tune_cli.add_parser(sub)
    demo.add_parser(sub)
    export.add_parser(sub)
    serve_cli.add_parser(sub)
    return parser


def quiet_transformers() -> None:
    """The CLI prints its own progress; transformers' loading bars and backend notices are noise here."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    quiet_transformers()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"vlmspec {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlmspec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
