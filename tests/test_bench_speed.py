"""The bench's end-to-end latency columns and its acceptance on image-grounded tokens: computed from the per-sample
records (a small run on a tiny random LLaVA, and hand-made records)."""

from __future__ import annotations

import json
import statistics

import pytest
from PIL import Image

from vlmspec.bench import metrics
from vlmspec.bench.grounding import ground_truth_words, grounded_mask
from vlmspec.bench.runner import BenchConfig, run_bench
from vlmspec.testing import build_tokenizer


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("suite")
    lines = []
    for i, (color, name) in enumerate([((200, 20, 20), "red"), ((20, 200, 20), "green")]):
        Image.new("RGB", (40, 40), color).save(folder / f"{i}.png")
        lines.append(json.dumps({"id": f"s{i}", "category": "vqa", "images": [f"{i}.png"],
                                 "prompt": "<image> the cat sat on the mat . what color ?", "reference": name}))
    lines.append(json.dumps({"id": "t", "category": "chat", "prompt": "the cat sat", "reference": "red"}))
    path = folder / "tiny.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_end_to_end_columns_and_grounded_acceptance_come_from_the_records(tiny, suite, tmp_path):
    out = run_bench(BenchConfig(target=str(tiny), drafters=("none", "eagle"), suite_files=(str(suite),),
                                max_new_tokens=8, dtype="fp32", tree="kind=chain,depth=3", out=str(tmp_path / "run"),
                                warmup=0, cost_repeats=1, plots=False), progress=False)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    by_arm = {arm: [r for r in records if r["arm"] == arm] for arm in ("none", "eagle")}
    rows = {r["arm"]: r for r in summary["rows"]}
    for arm, mine in by_arm.items():
        e2e = sum(r["new_tokens"] for r in mine) / sum(r["seconds"] for r in mine)
        assert rows[arm]["e2e_tokens_per_second"] == pytest.approx(e2e)
        assert rows[arm]["ttft_seconds"] == pytest.approx(statistics.median(r["prefill_seconds"] for r in mine))
        assert all(r["token_sources"] == token_sources(r["accepted_per_step"], r["new_tokens"]) for r in mine)
    plain = sum(r["new_tokens"] for r in by_arm["none"]) / sum(r["seconds"] for r in by_arm["none"])
    assert rows["eagle"]["e2e_speedup"] == pytest.approx(rows["eagle"]["e2e_tokens_per_second"] / plain)
    assert rows["none"]["e2e_speedup"] == pytest.approx(1.0)
    # ground truth only for image samples: the text-only sample has no mask, image samples one flag per token
    assert all((r["grounded"] is None) == (r["id"] == "t") for r in records)
    assert all(len(r["grounded"]) == len(r["token_ids"]) for r in records if r["grounded"] is not None)
    expected = metrics.grounded_acceptance(by_arm["eagle"])
    assert {k: rows["eagle"][k] for k in expected} == expected
    assert rows["none"]["grounded_accept_rate"] in (None, 0.0) and rows["none"]["rest_accept_rate"] == 0.0
    report = (out / "report.md").read_text()
    assert "e2e speedup" in report and "TTFT ms" in report and "## Acceptance on image-grounded tokens" in report


def record(arm, sample, new_tokens, seconds, prefill, sources=None, grounded=None):
    return {"arm": arm, "suite": "s", "id": sample, "temperature": 0.0, "status": "ok", "new_tokens": new_tokens,
            "seconds": seconds, "prefill_seconds": prefill, "decode_seconds": seconds - prefill,
            "token_sources": sources, "grounded": grounded}


def test_end_to_end_speedup_includes_the_prefill():
    plain = [record("none", "a", 10, 2.0, 1.0), record("none", "b", 10, 3.0, 1.0)]
    fast = [record("x", "a", 10, 1.5, 1.0), record("x", "b", 10, 2.0, 1.5)]
    # decode: (20 / 1.0) / (20 / 3.0) = 3; end to end: (20 / 3.5) / (20 / 5.0)
    assert metrics.speedup(fast, plain) == pytest.approx(3.0)
    assert metrics.speedup(fast, plain, metrics.end_to_end_tokens_per_second) == pytest.approx(5.0 / 3.5)
    assert metrics.time_to_first_token(fast) == pytest.approx(1.25)
    assert metrics.time_to_first_token([]) is None


def token_sources(accepted_per_step, new_tokens):
    """The sources the engine must report: the prefill's token, then per step its accepted drafts (depths 1…a) and
    one bonus, cut where the generation ended (EOS, stop string, budget)."""
    sources = [0]
    for accepted in accepted_per_step:
        sources += [*range(1, accepted + 1), 0]
    return sources[:new_tokens]


def test_token_sources_helper_follows_accepted_then_bonus_and_stops_at_the_cut():
    assert token_sources([2, 0, 3], 7) == [0, 1, 2, 0, 0, 1, 2]
    assert token_sources([], 1) == [0]


def test_grounded_tokens_are_those_of_reference_words():
    assert ground_truth_words("In the top left there is a small red circle.", True) == {"top", "left", "red",
                                                                                         "circle"}
    assert ground_truth_words("red", False) == frozenset()
    tokenizer = build_tokenizer()
    ids = tokenizer.encode("the cat sat on a red mat", add_special_tokens=False)
    mask = grounded_mask(tokenizer, ids, frozenset({"red", "cat"}))
    pieces = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    marked = "".join(piece[len(before):] for piece, before, flag in zip(pieces, [""] + pieces, mask) if flag)
    assert marked.replace(" ", "") == "catred"
    assert grounded_mask(tokenizer, ids, frozenset()) == [0] * len(ids)


def test_grounded_acceptance_skips_the_first_token_and_unmarked_records():
    a = record("x", "a", 5, 1.0, 0.1, sources=[0, 1, 2, 0, 0], grounded=[1, 1, 0, 1, 0])
    b = record("x", "b", 3, 1.0, 0.1, sources=[0, 1, 0], grounded=None)            # no ground truth: skipped
    rates = metrics.grounded_acceptance([a, b])
    # after the first token: grounded (1, 0) → 1 of 2 accepted; rest (2, 0) → 1 of 2
    assert rates == {"grounded_tokens": 2, "grounded_accept_rate": 0.5, "rest_tokens": 2, "rest_accept_rate": 0.5}
    assert metrics.grounded_acceptance([b])["grounded_accept_rate"] is None


def test_concurrency_sweep_writes_table_plot_and_records(tiny, suite, tmp_path):
    """`vlmspec bench --concurrency`: plain and speculative batching on the same requests through the engine."""
    from vlmspec.cli import main

    out = tmp_path / "sweep"
    assert main(["bench", "--target", str(tiny), "--suite-file", str(suite), "--drafters", "none,eagle",
                 "--tree", "kind=chain,depth=2", "--concurrency", "1,2", "--max-new-tokens", "6", "--dtype", "fp32",
                 "--warmup", "0", "--out", str(out), "--quiet"]) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 2 * 2                                     # requests × concurrency levels × arms
    summary = json.loads((out / "summary.json").read_text())
    for row in summary["rows"]:
        mine = [r for r in records if (r["arm"], r["concurrency"]) == (row["arm"], row["concurrency"])]
        assert row["tokens_per_second"] == pytest.approx(sum(r["new_tokens"] for r in mine) / mine[0]["run_seconds"])
    plain = {(r["id"], r["concurrency"]): r["token_ids"] for r in records if r["arm"] == "none"}
    assert all(r["token_ids"] == plain[(r["id"], r["concurrency"])] for r in records)       # lossless at batch 2
    assert {r["concurrency"] for r in summary["across_suites"]} == {1, 2}
    assert "× plain" in (out / "report.md").read_text() and (out / "throughput.png").stat().st_size > 1000
    assert main(["bench", "--suite-file", str(suite), "--concurrency", "0,2", "--out", str(tmp_path / "x")]) == 2
