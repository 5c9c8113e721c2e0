"""`vlmspec bench --concurrency 1,4,8,16`: total generated tokens per second of plain batching vs speculative batching
on the same requests, through the batched `Engine`.

Per suite, concurrency c and temperature, each arm (plain decoding first, then each `--drafters` entry under its
resolved tree) gets a fresh engine (`Generator.engine(max_batch=c)`, which keeps the generator's `TreeBudget`, so
what the warm-up and earlier runs measured carries over as in a server); all of the suite's requests are submitted
(encoded) first, then `Engine.run` drives it, keeping c of them running (continuous batching: a finished row's slot
goes to the next waiting request). Throughput = the requests' new tokens / the seconds `run` took. The
requests carry the same seeds as in the per-sample bench, so outputs, greedy or sampled, must match plain
decoding's (the `divergence` column counts requests whose tokens differ).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from vlmspec.bench import metrics
from vlmspec.bench.report import write_markdown
from vlmspec.bench.suites import SuiteSample, load_suites

PLOT = "throughput.png"


def run_throughput(config, progress: bool = True) -> Path:
    """The concurrency sweep of `config` (a `BenchConfig` with `concurrency`): records.jsonl (one line per request),
    summary.json, report.md and throughput.png in `config.out`."""
    from tqdm import tqdm

    from vlmspec.bench.runner import environment, open_arms, open_target

    suites = load_suites(list(config.suites), list(config.suite_files))
    if config.limit:
        suites = {name: samples[: config.limit] for name, samples in suites.items()}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "records.jsonl").exists():
        raise ValueError(f"{out / 'records.jsonl'} exists: choose another --out (a concurrency sweep does not resume)")
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    target = open_target(config)
    arms = open_arms(config, target)
    temperatures = [float(t) for t in config.temperatures]
    if config.warmup:
        first = next(iter(suites.values()))[: max(config.concurrency)]
        for arm in arms:
            for _ in range(config.warmup):
                run_requests(target, arm, first, max(config.concurrency), config.max_new_tokens, 0.0, config.seed)
    records: list[dict[str, Any]] = []
    runs = [(s, c, t) for s in suites for c in config.concurrency for t in temperatures]
    with open(out / "records.jsonl", "w") as handle, \
            tqdm(total=len(runs) * len(arms), desc="throughput", unit="run", disable=not progress,
                 file=sys.stderr) as bar:
        for suite, concurrency, temperature in runs:
            plain: dict[str, list[int]] = {}
            for arm in arms:
                bar.set_postfix_str(f"{suite} c={concurrency} {arm.name}", refresh=False)
                lines = run_requests(target, arm, suites[suite], concurrency, config.max_new_tokens, temperature,
                                     config.seed)
                for line in lines:
                    if arm.name == metrics.PLAIN:
                        plain[line["id"]] = line["token_ids"]
                    line["diverged"] = line["token_ids"] != plain.get(line["id"])
                handle.write("".join(json.dumps(line) + "\n" for line in lines))
                handle.flush()
                records += lines
                bar.update(1)
    summary = {"config": config.to_dict(),
               "target": {"name": config.target, "architecture": target.architecture, "dtype": str(target.dtype),
                          "fingerprint": target.fingerprint()},
               "arms": [{"name": arm.name, "kind": arm.kind, "tree": arm.tree} for arm in arms],
               "conventions": {"tokens_per_second": "new tokens of all the suite's requests / seconds the engine "
                                                    "took to finish them all (prefill included)",
                               "speedup": "tokens_per_second ÷ plain batching's at the same concurrency"},
               **summarize(records), **environment(target)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(summary, out, plots=config.plots)
    return out


def run_requests(target, arm, samples: list[SuiteSample], concurrency: int, max_new_tokens: int, temperature: float,
                 seed: int) -> list[dict[str, Any]]:
    """All `samples` through one engine of `max_batch=concurrency`; one record per request."""
    from vlmspec.bench.runner import sample_seed

    engine = arm.generator.engine(max_batch=concurrency)
    seeds = [sample_seed(seed, sample, temperature) for sample in samples]
    handles = [engine.submit(images=list(sample.images), prompt=sample.prompt, messages=sample.messages,
                             max_new_tokens=max_new_tokens, temperature=temperature, seed=s)
               for sample, s in zip(samples, seeds)]
    start = time.perf_counter()
    results = engine.run(handles)
    seconds = time.perf_counter() - start
    lines = []
    for sample, s, handle, result in zip(samples, seeds, handles, results):
        stats = result.stats
        lines.append({"suite": sample.suite, "id": sample.id, "arm": arm.name, "concurrency": concurrency,
                      "temperature": temperature, "seed": s, "prompt_tokens": handle.prompt_tokens,
                      "token_ids": result.token_ids, "new_tokens": stats.new_tokens,
                      "target_forwards": stats.target_forwards, "seconds": stats.seconds,
                      "prefill_seconds": stats.prefill_seconds, "finish_reason": result.finish_reason,
                      "run_seconds": seconds})
    return lines


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """`rows`: per suite × concurrency × temperature × arm, tokens/s, speedup vs plain, τ, divergence;
    `across_suites`: per arm × concurrency × temperature, the geometric-mean speedup."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["suite"], record["concurrency"], record["temperature"], record["arm"]),
                          []).append(record)
    rows = []
    for (suite, concurrency, temperature, arm), group in groups.items():
        new_tokens = sum(r["new_tokens"] for r in group)
        seconds = group[0]["run_seconds"]
        forwards = sum(r["target_forwards"] for r in group)
        diverged = [r["diverged"] for r in group if r["diverged"] is not None]
        rows.append({"suite": suite, "concurrency": concurrency, "temperature": temperature, "arm": arm,
                     "requests": len(group), "new_tokens": new_tokens, "seconds": seconds,
                     "tokens_per_second": new_tokens / seconds if seconds > 0 else None,
                     "tau": new_tokens / forwards if forwards else None,
                     "divergence_rate": sum(diverged) / len(diverged) if diverged else None})
    plain = {(r["suite"], r["concurrency"], r["temperature"]): r["tokens_per_second"] for r in rows
             if r["arm"] == metrics.PLAIN}
    for row in rows:
        base = plain.get((row["suite"], row["concurrency"], row["temperature"]))
        row["speedup"] = row["tokens_per_second"] / base if base and row["tokens_per_second"] else None
    across = []
    for arm, concurrency, temperature in dict.fromkeys((r["arm"], r["concurrency"], r["temperature"]) for r in rows):
        mine = [r for r in rows if (r["arm"], r["concurrency"], r["temperature"]) == (arm, concurrency, temperature)]
        across.append({"arm": arm, "concurrency": concurrency, "temperature": temperature, "suites": len(mine),
                       "speedup_geomean": metrics.geometric_mean(r["speedup"] for r in mine),
                       "min_speedup": min((r["speedup"] for r in mine if r["speedup"] is not None), default=None)})
    return {"rows": rows, "across_suites": across}


def across_table(summary: dict) -> str:
    from vlmspec.bench.report import fmt, table

    rows = [[r["arm"], str(r["concurrency"]), fmt(r["temperature"], 1), fmt(r["speedup_geomean"]),
             fmt(r["min_speedup"])] for r in summary["across_suites"] if r["arm"] != metrics.PLAIN]
    return table(["arm", "concurrency", "T", "speedup vs plain batching (geomean)", "lowest suite"], rows)


def render_markdown(summary: dict) -> str:
    from vlmspec.bench.report import fmt, table, tree_text

    machine, target = summary["machine"], summary["target"]
    native = {True: "native bf16", False: "no native bf16", None: ""}[machine.get("native_bf16")]
    arms = [a["name"] for a in summary["arms"]]
    drafters = [a for a in arms if a != metrics.PLAIN]
    rows = []
    for row in summary["rows"]:
        if row["arm"] != metrics.PLAIN:
            continue
        key = (row["suite"], row["concurrency"], row["temperature"])
        cells = [row["suite"], str(row["concurrency"]), fmt(row["temperature"], 1), fmt(row["tokens_per_second"], 1)]
        for arm in drafters:
            mine = next((r for r in summary["rows"] if r["arm"] == arm and
                         (r["suite"], r["concurrency"], r["temperature"]) == key), None)
            cells += [fmt(mine and mine["tokens_per_second"], 1), fmt(mine and mine["speedup"]),
                      fmt(mine and mine["divergence_rate"], percent=True)]
        rows.append(cells)
    header = ["suite", "concurrency", "T", "plain tokens/s"]
    for arm in drafters:
        header += [f"{arm} tokens/s", "× plain", "divergence"]
    trees = ", ".join(f"{a['name']}: {tree_text(a['tree'])}" for a in summary["arms"] if a["tree"])
    return "\n".join([
        "# vlmspec throughput report (batched engine)", "",
        f"Target `{target['name']}` ({target['architecture']}, {target['dtype']}) on {machine['device_name']} "
        f"({machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads, {native}); max new tokens "
        f"{summary['config']['max_new_tokens']}. Trees: {trees or 'none'}.", "",
        "## Across suites", "", across_table(summary), "",
        "## Per suite", "", table(header, rows), "",
        "## Conventions", "", *[f"- **{k}**: {v}" for k, v in summary["conventions"].items()],
        "- **divergence**: requests whose tokens differ from plain batching's (same seed; bf16 near-ties).", "",
        f"Plot: ![{PLOT}]({PLOT})", ""])


def write_plot(summary: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = list(dict.fromkeys(r["suite"] for r in summary["rows"]))
    fig, axes = plt.subplots(1, len(suites), figsize=(3.6 * len(suites) + 1.5, 3.4), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        for arm, temperature in dict.fromkeys((r["arm"], r["temperature"]) for r in summary["rows"]):
            mine = sorted((r for r in summary["rows"] if (r["suite"], r["arm"], r["temperature"]) ==
                           (suite, arm, temperature)), key=lambda r: r["concurrency"])
            ax.plot([r["concurrency"] for r in mine], [r["tokens_per_second"] or 0.0 for r in mine], marker="o",
                    label=f"{arm} T={temperature:g}")
        levels = sorted({r["concurrency"] for r in summary["rows"]})
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrency (max batch)")
        ax.set_ylabel("generated tokens/s")
        ax.set_title(suite, fontsize=9)
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = out / PLOT
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(summary: dict, out: Path, plots: bool = True) -> Path:
    return write_markdown(render_markdown(summary), out, (lambda: write_plot(summary, out)) if plots else None, "Plot")
