"""report.md (the tables of summary.json) and PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

PLOTS = ("speedup.png", "acceptance.png", "costs.png")


def fmt(value: Any, digits: int = 2, percent: bool = False) -> str:
    if value is None:
        return "–"
    if percent:
        return f"{100 * value:.0f}%"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def across_table(summary: dict) -> str:
    rows = [[r["arm"], fmt(r["temperature"], 1), f"{r['ok_suites']}/{r['suites']}", fmt(r["speedup_geomean"]),
             fmt(r["e2e_speedup_geomean"]), fmt(r["tau_mean"]), r["status"]] for r in summary["across_suites"]]
    return table(["arm", "T", "suites run", "speedup (geomean)", "e2e speedup (geomean)", "τ (mean)", "status"],
                 rows)


def rows_table(summary: dict) -> str:
    rows = []
    for r in summary["rows"]:
        depth = r["acceptance_by_depth"]
        accept = " / ".join(f"{a:.2f}" for a in depth[:4]) if depth else "–"
        c_draft = fmt(r["c_draft_step"] * 1e3) if r["c_draft_step"] is not None else "–"
        note = r["error"] if r["status"] != "ok" else (f"{r['samples'] - r['ok_samples']} unsupported"
                                                       if r["ok_samples"] < r["samples"] else "")
        rows.append([r["arm"], r["suite"], fmt(r["temperature"], 1), f"{r['ok_samples']}/{r['samples']}",
                     fmt(r["tokens_per_second"], 1), fmt(r["speedup"]), fmt(r["e2e_speedup"]),
                     fmt(r["ttft_seconds"] * 1e3, 1) if r["ttft_seconds"] is not None else "–", fmt(r["tau"]),
                     fmt(r["tau_minus_1_per_step"]), accept, fmt(r["draft_share"], percent=True),
                     fmt(r["verify_share"], percent=True), c_draft, fmt(r["mean_tree_nodes"], 1),
                     fmt(r["ideal_speedup"]), fmt(r["efficiency"]), fmt(r["divergence_rate"], percent=True),
                     (note or "").replace("|", "/")[:160]])
    header = ["arm", "suite", "T", "samples", "tokens/s", "speedup", "e2e speedup", "TTFT ms", "τ", "τ−1 /step",
              "accept d1/d2/d3/d4", "draft", "verify", "c_draft ms", "tree nodes", "ideal", "efficiency", "divergence",
              "note"]
    return table(header, rows)


def grounded_table(summary: dict) -> str:
    """Per drafter arm and temperature, pooled over all suites: acceptance on image-grounded tokens vs the rest."""
    rows = [[r["arm"], fmt(r["temperature"], 1), fmt(r["grounded_accept_rate"]), str(r["grounded_tokens"]),
             fmt(r["rest_accept_rate"]), str(r["rest_tokens"])]
            for r in summary["across_suites"] if r["kind"] == "vlmspec" and r["arm"] != "none"]
    return table(["arm", "T", "grounded: accepted/emitted", "grounded tokens", "rest: accepted/emitted",
                  "rest tokens"], rows)


def costs_table(summary: dict) -> str:
    costs = summary["costs"]
    if not costs:
        return "(no c(k) measured)"
    suites = list(costs)
    ks = sorted({int(k) for entry in costs.values() for k in entry["seconds"]})
    rows = []
    for k in ks:
        cells = []
        for suite in suites:
            seconds = costs[suite]["seconds"]
            cells.append(f"{seconds[str(k)] / seconds['1']:.2f}" if str(k) in seconds else "–")
        rows.append([str(k)] + cells)
    header = ["k"] + [f"{s} (L={costs[s]['prompt_tokens']}, c(1)={costs[s]['seconds']['1'] * 1e3:.2f} ms)"
                      for s in suites]
    return table(header, rows)


def render_markdown(summary: dict) -> str:
    config, target = summary["config"], summary["target"]
    versions, machine = summary["versions"], summary["machine"]
    native = {True: ", native bf16", False: ", no native bf16", None: ""}[machine.get("native_bf16")]
    trees = ", ".join(f"{a['name']}: {tree_text(a['tree'])}" for a in summary["arms"] if a["kind"] == "vlmspec"
                      and a["tree"])
    parts = [
        "# vlmspec bench report", "",
        f"Target `{target['name']}` ({target['architecture']}, {target['dtype']}) on {machine['device_name']} "
        f"({machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads{native}); max new tokens "
        f"{config['max_new_tokens']}; temperatures {config['temperatures']}; warm-up {config['warmup']}; "
        f"seed {config['seed']}.",
        f"Trees: {trees or 'none'}.",
        f"vlmspec {versions['vlmspec']}, torch {versions['torch']}, transformers {versions['transformers']}, "
        f"Python {versions['python']}.", "",
        "## Across suites", "", across_table(summary), "",
        "## Per suite", "", rows_table(summary), "",
        "## Acceptance on image-grounded tokens", "",
        "Emitted tokens of answers to image samples (the first token excluded), split by whether they belong to a "
        "word the sample's reference names (colour, shape, count, position, chart value, OCR word); rate = "
        "accepted draft tokens / emitted tokens (a step's bonus token counts as emitted, not accepted).", "",
        grounded_table(summary), "",
        "## c(k)/c(1)", "", "Target forward on k new tokens against the cache of the suite's median prompt "
        "(L tokens), median of repeats after warm-up.", "", costs_table(summary), "",
        "## Conventions", "",
        *[f"- **{key}**: {text}" for key, text in summary["conventions"].items()],
        "- **draft / verify**: shares of decode seconds spent drafting (c_draft, incl. tree building and the "
        "drafter's catch-up) and in the target's verify forward; **c_draft ms**: mean per verify step.",
        "- **divergence**: samples whose tokens differ from plain decoding's with the same seed (bf16 near-ties; "
        "exactness is tested in fp32; blank for peers at T > 0). Peers (kind `peer`) run `model.generate`; their "
        "steps are not visible, so per-step columns are –.", "",
        "Plots: " + ", ".join(f"![{p}]({p})" for p in PLOTS if p), "",
    ]
    return "\n".join(parts)


def tree_text(tree: dict | None) -> str:
    if not tree:
        return "–"
    min_prob = f" min_prob={tree['min_prob']:g}" if tree.get("min_prob") else ""
    if tree["kind"] == "chain":
        return f"chain depth={tree['depth']}{min_prob}"
    return f"{tree['kind']} depth={tree['depth']} topk={tree['topk']} total={tree['total_tokens']}{min_prob}"


def write_plots(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = [r for r in summary["rows"] if r["speedup"] is not None]
    temperatures = sorted({r["temperature"] for r in summary["rows"]})
    suites = list(dict.fromkeys(r["suite"] for r in summary["rows"]))
    arms = list(dict.fromkeys(r["arm"] for r in summary["rows"]))

    fig, axes = plt.subplots(len(temperatures), 1, figsize=(min(14, 3 + 0.25 * len(suites) * len(arms)),
                                                            2.8 * len(temperatures)), squeeze=False)
    width = 0.8 / max(1, len(arms))
    for ax, temperature in zip(axes[:, 0], temperatures):
        for i, arm in enumerate(arms):
            values = {r["suite"]: r["speedup"] for r in rows if r["arm"] == arm and r["temperature"] == temperature}
            ax.bar([j + i * width for j in range(len(suites))], [values.get(s, 0.0) for s in suites], width,
                   label=arm)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks([j + width * (len(arms) - 1) / 2 for j in range(len(suites))], suites)
        ax.set_ylabel("speedup vs plain")
        ax.set_title(f"T={temperature:g} (missing bar: unsupported)", fontsize=9)
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    written.append(_save(fig, out / "speedup.png", plt))

    fig, axes = plt.subplots(1, len(temperatures), figsize=(4.5 * len(temperatures) + 2, 3.6), squeeze=False)
    for ax, temperature in zip(axes[0], temperatures):
        for r in summary["across_suites"]:
            depth = r.get("acceptance_by_depth")
            if r["temperature"] == temperature and depth:
                ax.plot(range(1, len(depth) + 1), depth, marker="o", label=r["arm"])
        ax.set_xlabel("depth d")
        ax.set_ylabel("P(accept d | accept d−1)")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"acceptance by depth, all suites, T={temperature:g}", fontsize=9)
    handles, labels = axes[0, -1].get_legend_handles_labels()
    if handles:
        axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    written.append(_save(fig, out / "acceptance.png", plt))

    fig, ax = plt.subplots(figsize=(5, 4))
    for suite, entry in summary["costs"].items():
        seconds = {int(k): v for k, v in entry["seconds"].items()}
        ks = sorted(seconds)
        ax.plot(ks, [seconds[k] / seconds[1] for k in ks], marker="o", label=f"{suite} (L={entry['prompt_tokens']})")
    ax.set_xlabel("k (new tokens in one target forward)")
    ax.set_ylabel("c(k) / c(1)")
    ax.set_title("target forward cost")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out / "costs.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(summary: dict, out: Path, plots: bool = True) -> Path:
    out = Path(out)
    return write_markdown(render_markdown(summary), out, (lambda: write_plots(summary, out)) if plots else None,
                          "Plots")


def write_markdown(text: str, out: Path, draw: Callable[[], object] | None, label: str) -> Path:
    """Write `out/report.md`, drawing its plots with `draw` (None: not in this run); the line starting with
    `label: ` says when they were not drawn."""
    if draw is None:
        text = text.replace(f"{label}: ", f"{label} (not drawn in this run): ")
    else:
        try:
            draw()
        except ImportError as error:          # a bare CUDA image may lack matplotlib: the tables still stand
            text = text.replace(f"{label}: ", f"{label} (not drawn: {error}): ")
    path = out / "report.md"
    path.write_text(text)
    return path
