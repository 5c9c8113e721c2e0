"""`vlmspec demo`: the shipped testbed answers a few image prompts with the best shipped drafter, streaming the
text, then a side-by-side table of plain vs speculative decoding and where the full bench report went.

The drafter is the shipped one with the best geometric-mean greedy speedup in the shipped bench summary; without
a summary, the first shipped drafter (said so); without shipped drafters, the untrained `eagle` (said so: it is
lossless but slow). The run is a small `vlmspec bench`, so its numbers mean exactly what the report says.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

DEMO_SUITES = ("describe", "vqa", "chart")       # one sample each: a long answer, a short one, a chart reading
SUMMARY_NAMES = ("summary.json", "bench/summary.json")
BENCH_FILES = ("records.jsonl", "config.json", "summary.json", "report.md", "speedup.png", "acceptance.png",
               "costs.png")


def shipped_drafters() -> list[str]:
    """`testbed:<type>` of every shipped drafter checkpoint."""
    from vlmspec import testbed

    folder = getattr(testbed, "SHIPPED_DRAFTERS_DIR", Path(testbed.__file__).parent / "drafters")
    if not folder.is_dir():
        return []
    return [f"testbed:{p.name}" for p in sorted(folder.iterdir()) if (p / "config.json").is_file()]


def shipped_summary() -> dict | None:
    """The bench summary shipped beside the drafters or the demo data, if any."""
    from vlmspec import testbed

    root = Path(testbed.__file__).parent
    folders = [getattr(testbed, "SHIPPED_DRAFTERS_DIR", root / "drafters"), root / "demo"]
    for folder in folders:
        for name in SUMMARY_NAMES:
            if (folder / name).is_file():
                return json.loads((folder / name).read_text())
    return None


def choose_drafter(shipped: list[str], summary: dict | None) -> tuple[str, str]:
    """(drafter name, one sentence saying why)."""
    if shipped and summary:
        ranked = [r for r in summary.get("across_suites", []) if r.get("arm") in shipped
                  and r.get("temperature") == 0 and r.get("speedup_geomean")]
        if ranked:
            best = max(ranked, key=lambda r: r["speedup_geomean"])
            return best["arm"], (f"the best shipped drafter by the shipped bench summary "
                                 f"({best['speedup_geomean']:.2f}x geometric-mean greedy speedup there)")
    if shipped:
        return shipped[0], "the first shipped drafter (no shipped bench summary ranks them)"
    return "eagle", ("no trained drafter is shipped yet: using an UNTRAINED eagle drafter, which stays lossless "
                     "but accepts almost nothing, so expect a slowdown")


def demo_suite(folder: Path) -> Path:
    """The shipped demo suite if the package has one, else one generated sample per `DEMO_SUITES` entry."""
    from vlmspec import testbed
    from vlmspec.testbed.data import SUITE_DEFAULTS, make_sample

    shipped = Path(testbed.__file__).parent / "demo" / "suite.jsonl"
    if shipped.is_file():
        return shipped
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for name in DEMO_SUITES:
        seed = SUITE_DEFAULTS[name][1]
        sample = make_sample(name, seed, 0)
        sample_id = f"{name}-{seed}-00000"
        images = []
        for index, rendered in enumerate(sample.images):
            images.append(f"images/{sample_id}-{index}.png")
            rendered.image.save(folder / images[-1])
        lines.append(json.dumps({"id": sample_id, "category": sample.category, "images": images,
                                 "messages": sample.messages(), "reference": sample.answer}))
    path = folder / "demo.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def question(sample) -> str:
    if sample.prompt is not None:
        return sample.prompt
    parts = [p for m in sample.messages if isinstance(m.get("content"), list) for p in m["content"]]
    texts = [m["content"] for m in sample.messages if isinstance(m.get("content"), str)]
    images = sum(p.get("type") == "image" for p in parts)
    text = " ".join(texts + [p.get("text", "") for p in parts if p.get("type") == "text"])
    return ("[image] " * images) + text


def run_demo(out: Path = Path("vlmspec-demo"), max_new_tokens: int = 96,
             write: Callable[[str], None] = lambda s: print(s, end="", flush=True)) -> Path:
    """Run the demo; returns the folder holding the bench report."""
    from vlmspec.bench.runner import BenchConfig, run_bench
    from vlmspec.hardware import native_bf16
    from vlmspec.testbed import shipped_path

    shipped_path()                               # a clear ValueError when the testbed weights are missing
    out = Path(out)
    drafter, reason = choose_drafter(shipped_drafters(), shipped_summary())
    write(f"vlmspec demo: target testbed, drafter {drafter}: {reason}.\n")
    write("dtype bf16: this CPU computes bf16 natively.\n" if native_bf16("cpu") else
          "dtype fp32: this CPU has no native bf16 (no AVX512-BF16 or AMX), where bf16 runs emulated and slow.\n")
    report = out / "report"
    for name in BENCH_FILES:                     # a fresh small bench each time
        (report / name).unlink(missing_ok=True)
    suite = demo_suite(out / "suite")

    def on_text(arm: str, sample, temperature: float, piece: str) -> None:
        if piece == "" and arm == "none":                 # a sample starts with its plain run
            images = ", ".join(str(path) for path in sample.images)
            write(f"\nQ ({sample.category}): {question(sample)}\n  image: {images}\n"
                  f"  (plain decoding first, for the timing)\n")
        elif piece == "":
            write(f"A ({drafter}): ")
        elif arm != "none":
            write(piece)

    config = BenchConfig(target="testbed", drafters=("none", drafter), suite_files=(str(suite),),
                         temperatures=(0.0,), max_new_tokens=max_new_tokens, dtype="fast", out=str(report),
                         warmup=1, cost_repeats=3)
    run_bench(config, progress=False, on_text=on_text)
    summary = json.loads((report / "summary.json").read_text())
    write("\n\n" + side_by_side(summary, drafter) + "\n")
    write(f"\nFull report: {report / 'report.md'} (records, summary.json, plots beside it). "
          f"Measure your own: vlmspec bench --help\n")
    return report


def side_by_side(summary: dict, drafter: str) -> str:
    """Plain vs speculative over the demo prompts: tokens/s, τ, speedup."""
    from vlmspec.bench.report import fmt, table

    rows = {r["arm"]: r for r in summary["rows"] if r["temperature"] == 0}
    lines = []
    for arm, label in (("none", "plain decoding"), (drafter, f"speculative ({drafter})")):
        r = rows.get(arm)
        if r is not None:
            lines.append([label, fmt(r["tokens_per_second"], 1), fmt(r["tau"]), fmt(r["speedup"]) + "x"])
    return table(["", "tokens/s", "τ (tokens per target forward)", "speedup"], lines)


def demo_command(args: argparse.Namespace) -> int:
    run_demo(Path(args.out), args.max_new_tokens)
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("demo", help="watch the shipped testbed answer image prompts, plain vs speculative",
                            description="Load the shipped testbed and its best shipped drafter, stream answers to "
                                        "a few image prompts, then compare plain and speculative decoding "
                                        "(tokens/s, τ, speedup) and write a small bench report.")
    parser.add_argument("--out", default="vlmspec-demo", help="folder for the demo suite and report "
                                                              "(default ./vlmspec-demo)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.set_defaults(run=demo_command)
    return parser


if __name__ == "__main__":
    from vlmspec.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
