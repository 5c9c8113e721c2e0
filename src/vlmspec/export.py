"""`vlmspec export`: write a trained drafter in a format an inference engine loads: `speculators` (the EAGLE-3
layout vLLM reads, `vlmspec.drafters.speculators`) or `sglang` (EAGLE-3's original layout that SGLang and SpecForge
use, `vlmspec.drafters.sglang`). The way back needs no command: `--drafter DIR` / `load_drafter(DIR, target)` load
either as an `eagle3` drafter.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def export_drafter(drafter: str, out: str | Path, target: str = "testbed", format: str = "speculators",
                   verifier: str | None = None, speculative_tokens: int | None = None,
                   dtype: str = "checkpoint") -> Path:
    """Load `drafter` (a checkpoint directory or testbed:<type>) for `target` and write it to `out` in `format`.

    `verifier`: the target's name as the engine will load it (a Hugging Face id or path; default: the target's
    resolved directory). `speculative_tokens`: the draft length the checkpoint proposes (default: the depth of the
    drafter's recommended tree, else 3)."""
    from vlmspec.drafters import load_drafter, recommended_tree
    from vlmspec.drafters.base import read_drafter_meta, resolve_drafter_path
    from vlmspec.drafters.sglang import save_sglang
    from vlmspec.drafters.speculators import refusal, save_speculators
    from vlmspec.target import Target
    from vlmspec.target.base import resolve_target_path

    writers = {"speculators": save_speculators, "sglang": save_sglang}
    if format not in writers:
        raise ValueError(f"unknown export format {format!r}; available: {', '.join(writers)}")
    meta = read_drafter_meta(resolve_drafter_path(drafter))
    reason = refusal(meta["drafter_type"], (meta.get("config") or {}).get("layout", "fc"))
    if reason:                                       # before loading a target the export could not use
        raise ValueError(reason)
    loaded_target = Target.from_pretrained(target, dtype=dtype)
    loaded = load_drafter(drafter, loaded_target)
    if speculative_tokens is None:
        tree = recommended_tree(drafter)
        speculative_tokens = tree.depth if tree is not None else 3
    verifier = verifier or str(resolve_target_path(target).resolve())
    return writers[format](loaded, out, verifier, speculative_tokens)


def export_command(args: argparse.Namespace) -> int:
    out = export_drafter(args.drafter, args.out, target=args.target, format=args.format, verifier=args.verifier,
                         speculative_tokens=args.speculative_tokens, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser("export", help="write a trained eagle3 drafter in the format vLLM or SGLang loads",
                            description="Write a trained drafter as an EAGLE-3 checkpoint (config.json + "
                                        "model.safetensors): --format speculators for vLLM (--speculative-config), "
                                        "--format sglang for SGLang (--speculative-algorithm EAGLE3). Only eagle3 "
                                        "drafters trained with layout=speculators map onto it exactly; other "
                                        "drafters are refused with what would be lost. Either directory loads back "
                                        "with --drafter DIR.")
    parser.add_argument("--drafter", required=True, help="a drafter checkpoint directory or testbed:<type>")
    parser.add_argument("--target", default="testbed", help="the drafter's target: a model directory or 'testbed'")
    parser.add_argument("--format", default="speculators", choices=["speculators", "sglang"],
                        help="speculators (vLLM, default) or sglang (SGLang / SpecForge)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--verifier", default=None,
                        help="the target as the engine names it (HF id or path) for speculators_config.verifier; "
                             "default: the target's directory (the sglang layout has no such field)")
    parser.add_argument("--speculative-tokens", type=int, default=None,
                        help="draft tokens the checkpoint proposes (vLLM's default num_speculative_tokens); "
                             "default: the depth of the drafter's recommended tree, else 3")
    parser.add_argument("--dtype", default="checkpoint",
                        help="dtype of the written weights: checkpoint (the target's own, default), fp32, bf16, fp16")
    parser.set_defaults(run=export_command)
