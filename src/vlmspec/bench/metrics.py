"""Summary metrics, exactly as DESIGN defines them; pure functions on records (dicts from records.jsonl).

A record is one sample × arm × temperature. Totals are over a suite's samples; an arm's speedup pairs it with the
plain arm on the same samples. τ conventions, both reported:

- `tau` (DESIGN): new tokens / target forwards, the prefill included. Plain decoding has τ = 1 exactly.
- `tau_minus_1_per_step` (the ViSpec paper's τ − 1): mean draft tokens emitted per verify step (prefill excluded,
  bonus token excluded).

Two speedups, both totals over the suite's shared samples: `speedup` (DESIGN: decode tokens/s, prefill excluded)
and `e2e_speedup` (new tokens / seconds with the prefill included: what a user waits for); `ttft_seconds` is the
median time to first token.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any, Callable, Iterable

from vlmspec.bench.costs import interpolate
from vlmspec.engine import acceptance_by_depth as engine_acceptance

PLAIN = "none"
Record = dict[str, Any]


def ok(records: Iterable[Record]) -> list[Record]:
    return [r for r in records if r.get("status", "ok") == "ok"]


def tokens_per_second(records: list[Record]) -> float | None:
    """Total new tokens / total decode seconds (prefill excluded)."""
    seconds = sum(r["decode_seconds"] for r in records)
    return sum(r["new_tokens"] for r in records) / seconds if seconds > 0 else None


def end_to_end_tokens_per_second(records: list[Record]) -> float | None:
    """Total new tokens / total seconds, prefill included: the rate a user waiting for whole answers sees."""
    seconds = sum(r["seconds"] for r in records)
    return sum(r["new_tokens"] for r in records) / seconds if seconds > 0 else None


def time_to_first_token(records: list[Record]) -> float | None:
    """Median over samples of the seconds until the first token is committed: the prefill's target forward that
    emits it plus whatever the arm does before committing it (a drafter's catch-up over the prompt), i.e. the
    record's `prefill_seconds`."""
    values = sorted(r["prefill_seconds"] for r in records if r.get("prefill_seconds") is not None)
    return statistics.median(values) if values else None


def tau(records: list[Record]) -> float | None:
    """DESIGN τ over a suite: total new tokens / total target forwards (prefill included); None if not counted."""
    if not records or any(r.get("target_forwards") is None for r in records):
        return None
    forwards = sum(r["target_forwards"] for r in records)
    return sum(r["new_tokens"] for r in records) / forwards if forwards else None


def tau_minus_1_per_step(records: list[Record]) -> float | None:
    """ViSpec's τ − 1: tokens emitted by verify steps, less one bonus token per step, per verify step
    = (new tokens − target forwards) / (target forwards − 1), prefill excluded. Counts emitted tokens only (drafts
    accepted past an EOS or the token budget are not emitted), so it needs no per-step data (peers have it too)."""
    if not records or any(r.get("target_forwards") is None for r in records):
        return None
    steps = sum(r["target_forwards"] - 1 for r in records)
    return (sum(r["new_tokens"] for r in records) - sum(r["target_forwards"] for r in records)) / steps \
        if steps else 0.0


def acceptance_by_depth(records: list[Record]) -> list[float] | None:
    """`engine.acceptance_by_depth` pooled over the steps of all records."""
    if not records or any(r.get("accepted_per_step") is None for r in records):
        return None
    return engine_acceptance([a for r in records for a in r["accepted_per_step"]],
                             [d for r in records for d in r["tree_depth_per_step"]])


def grounded_acceptance(records: list[Record]) -> dict[str, Any]:
    """Acceptance on image-grounded answer tokens vs the rest (`vlmspec.bench.grounding` defines both), over the
    records that have ground-truth words (`grounded` not None) and per-token sources. Rate = accepted draft tokens /
    emitted tokens of that class, the first token excluded (the prefill emits it: no drafter can draft it)."""
    counts = {"grounded": [0, 0], "rest": [0, 0]}               # class -> [emitted, accepted drafts]
    for r in records:
        if r.get("grounded") is None or r.get("token_sources") is None:
            continue
        for flag, source in list(zip(r["grounded"], r["token_sources"]))[1:]:
            cell = counts["grounded" if flag else "rest"]
            cell[0] += 1
            cell[1] += source > 0
    out: dict[str, Any] = {}
    for name, (emitted, accepted) in counts.items():
        out[f"{name}_tokens"] = emitted
        out[f"{name}_accept_rate"] = accepted / emitted if emitted else None
    return out


def speedup(arm: list[Record], plain: list[Record],
            rate: Callable[[list[Record]], float | None] = tokens_per_second) -> float | None:
    """rate of the arm ÷ rate of plain decoding, on the samples both ran; `rate` is decode tokens/s (prefill
    excluded: DESIGN's speedup) or `end_to_end_tokens_per_second` (the end-to-end speedup)."""
    arm_ok = {r["id"]: r for r in ok(arm)}
    plain_ok = {r["id"]: r for r in ok(plain)}
    shared = sorted(arm_ok.keys() & plain_ok.keys())
    if not shared:
        return None
    mine = rate([arm_ok[i] for i in shared])
    base = rate([plain_ok[i] for i in shared])
    return mine / base if mine and base else None


def divergence_rate(arm: list[Record], plain: list[Record]) -> float | None:
    """Fraction of samples whose tokens differ from plain decoding's (same seed; None for a peer's sampled runs,
    which draw their own random streams)."""
    base = {r["id"]: r["token_ids"] for r in ok(plain)}
    pairs = [(r["token_ids"], base[r["id"]]) for r in ok(arm) if r["id"] in base]
    if not pairs or any(r["temperature"] != 0 and r.get("kind") == "peer" for r in arm):
        return None
    return sum(a != b for a, b in pairs) / len(pairs)


def first_divergence(tokens: list[int], reference: list[int]) -> int | None:
    """Index of the first differing token (or where one sequence ends early), None when equal."""
    for index, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return index
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def cost_breakdown(records: list[Record], costs: dict[int, float] | None, tau_value: float | None) -> dict[str, Any]:
    """Shares of decode time, mean c_draft(step), mean c(verify tree) and efficiency's ideal speedup.

    ideal = τ · c(1) / (mean c(verify tree) + mean c_draft(step)); None when steps or costs are unknown."""
    out: dict[str, Any] = {"draft_share": None, "verify_share": None, "c_draft_step": None, "c_verify_step": None,
                           "mean_tree_nodes": None, "draft_forwards_per_step": None, "ideal_speedup": None}
    if not records or any(r.get("draft_seconds") is None or r.get("tree_nodes_per_step") is None for r in records):
        return out
    decode = sum(r["decode_seconds"] for r in records)
    nodes = [n for r in records for n in r["tree_nodes_per_step"]]
    forwards = [f for r in records for f in r["draft_forwards_per_step"]]
    if decode > 0:
        out["draft_share"] = sum(r["draft_seconds"] for r in records) / decode
        out["verify_share"] = sum(r["verify_seconds"] for r in records) / decode
    if nodes:
        out["c_draft_step"] = sum(r["draft_seconds"] for r in records) / len(nodes)
        out["mean_tree_nodes"] = sum(nodes) / len(nodes)
        out["draft_forwards_per_step"] = sum(forwards) / len(forwards) if forwards else 0.0
        if costs:
            out["c_verify_step"] = sum(interpolate(costs, n) for n in nodes) / len(nodes)
            if tau_value is not None:
                out["ideal_speedup"] = tau_value * costs_at_1(costs) / (out["c_verify_step"] + out["c_draft_step"])
    return out


def costs_at_1(costs: dict[int, float]) -> float:
    return interpolate(costs, 1)


def summarize_group(arm: list[Record], plain: list[Record], costs: dict[int, float] | None) -> dict[str, Any]:
    """One summary row for one arm × suite × temperature."""
    good = ok(arm)
    errors = sorted({r.get("error") or "" for r in arm if r.get("status", "ok") != "ok"})
    row: dict[str, Any] = {"samples": len(arm), "ok_samples": len(good),
                           "status": "ok" if good else "unsupported", "error": errors[0] if errors else None}
    tau_value = tau(good)
    row.update(new_tokens=sum(r["new_tokens"] for r in good), decode_seconds=sum(r["decode_seconds"] for r in good),
               tokens_per_second=tokens_per_second(good) if good else None, speedup=speedup(arm, plain),
               e2e_tokens_per_second=end_to_end_tokens_per_second(good) if good else None,
               e2e_speedup=speedup(arm, plain, end_to_end_tokens_per_second),
               ttft_seconds=time_to_first_token(good),
               tau=tau_value, tau_minus_1_per_step=tau_minus_1_per_step(good),
               acceptance_by_depth=acceptance_by_depth(good), divergence_rate=divergence_rate(arm, plain),
               **grounded_acceptance(good))
    row.update(cost_breakdown(good, costs, tau_value))
    ideal = row["ideal_speedup"]
    row["efficiency"] = row["speedup"] / ideal if row["speedup"] is not None and ideal else None
    return row


def geometric_mean(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    if not values or any(v <= 0 for v in values):
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarize(records: list[Record], costs: dict[str, dict[int, float]] | None = None) -> dict[str, Any]:
    """`rows` (arm × suite × temperature) and `across_suites` (arm × temperature: geometric-mean speedup and mean τ
    over the suites where the arm ran, status "partial" when it was unsupported on some suites, and acceptance by
    depth pooled over the steps of all suites)."""
    groups: dict[tuple[str, str, float], list[Record]] = defaultdict(list)
    arms: list[str] = []
    kinds: dict[str, str] = {}
    for record in records:
        groups[(record["arm"], record["suite"], float(record["temperature"]))].append(record)
        if record["arm"] not in arms:
            arms.append(record["arm"])
        kinds[record["arm"]] = record.get("kind", "vlmspec")
    rows = []
    for (arm, suite, temperature), group in groups.items():
        plain = groups.get((PLAIN, suite, temperature), [])
        row = {"arm": arm, "kind": kinds[arm], "suite": suite, "temperature": temperature}
        row.update(summarize_group(group, plain, (costs or {}).get(suite)))
        rows.append(row)
    order = {arm: index for index, arm in enumerate(arms)}
    rows.sort(key=lambda r: (r["temperature"], r["suite"], order[r["arm"]]))
    across = []
    for arm in arms:
        for temperature in sorted({r["temperature"] for r in rows}):
            mine = [r for r in rows if r["arm"] == arm and r["temperature"] == temperature]
            taus = [r["tau"] for r in mine if r["tau"] is not None]
            ran = sum(r["status"] == "ok" for r in mine)
            pooled = ok(r for key, group in groups.items() if key[0] == arm and key[2] == temperature for r in group)
            across.append({"arm": arm, "kind": kinds[arm], "temperature": temperature, "suites": len(mine),
                           "ok_suites": ran, "speedup_geomean": geometric_mean(r["speedup"] for r in mine),
                           "e2e_speedup_geomean": geometric_mean(r["e2e_speedup"] for r in mine),
                           "tau_mean": sum(taus) / len(taus) if taus else None,
                           "acceptance_by_depth": acceptance_by_depth(pooled), **grounded_acceptance(pooled),
                           "status": "ok" if ran == len(mine) else "partial" if ran else "unsupported"})
    return {"rows": rows, "across_suites": across}
