"""`vlmspec bench` on a tiny random LLaVA: outputs and their keys, resume, peers, suite validation, and the
metric formulas on hand-made records."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from vlmspec.bench import metrics
from vlmspec.bench.costs import cost_grid, interpolate, measure_costs
from vlmspec.bench.peers import PEERS, Peer
from vlmspec.bench.runner import BenchConfig, encode, run_bench
from vlmspec.bench.suites import read_suite
from vlmspec.cli import main

RECORD_KEYS = {"suite", "id", "category", "arm", "kind", "temperature", "seed", "prompt_tokens", "status", "error",
               "token_ids", "new_tokens", "target_forwards", "seconds", "prefill_seconds", "decode_seconds",
               "draft_seconds", "verify_seconds", "accepted_per_step", "draft_forwards_per_step",
               "tree_nodes_per_step", "tree_depth_per_step", "diverged", "first_divergence"}
ROW_KEYS = {"arm", "kind", "suite", "temperature", "samples", "ok_samples", "status", "error", "new_tokens",
            "decode_seconds", "tokens_per_second", "speedup", "tau", "tau_minus_1_per_step", "acceptance_by_depth",
            "divergence_rate", "draft_share", "verify_share", "c_draft_step", "c_verify_step", "mean_tree_nodes",
            "draft_forwards_per_step", "ideal_speedup", "efficiency"}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("suite")
    (folder / "img").mkdir()
    lines = []
    for i, color in enumerate([(200, 20, 20), (20, 200, 20), (20, 20, 200)]):
        Image.new("RGB", (40, 40), color).save(folder / "img" / f"{i}.png")
        prompt = {"prompt": "<image> the cat sat on the mat . describe the image"} if i % 2 else \
            {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}]}
        lines.append(json.dumps({"id": f"s{i}", "category": "vqa", "images": [f"img/{i}.png"], **prompt}))
    path = folder / "tiny.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def broken_peer(monkeypatch):
    def factory(target, argument):
        peer = Peer("hf-broken", target, {"no_such_generate_argument": object()})
        return peer
    monkeypatch.setitem(PEERS, "hf-broken", factory)


def config(tiny, suite, out, **changes):
    base = dict(target=str(tiny), drafters=("none", "prompt-lookup", "eagle"), suite_files=(str(suite),),
                temperatures=(0.0, 1.0), max_new_tokens=6, dtype="bf16", tree="kind=dynamic,depth=2,topk=2,total=4",
                out=str(out), warmup=1, cost_repeats=1, peers=("hf-generate", "hf-broken"))
    return BenchConfig(**{**base, **changes})


def test_bench_writes_records_summary_report_and_plots(tiny, suite, tmp_path, broken_peer):
    out = run_bench(config(tiny, suite, tmp_path / "run"), progress=False)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 5 * 2                                       # samples × arms × temperatures
    assert all(RECORD_KEYS <= set(r) for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert {"config", "target", "arms", "conventions", "costs", "rows", "across_suites", "versions",
            "machine"} <= set(summary)
    assert all(ROW_KEYS <= set(row) for row in summary["rows"])
    assert {"torch", "transformers", "vlmspec", "python"} <= set(summary["versions"])
    assert isinstance(summary["machine"]["native_bf16"], bool) and "native bf16" in (out / "report.md").read_text()
    plain = [r for r in summary["rows"] if r["arm"] == "none"]
    assert all(r["tau"] == 1.0 and r["speedup"] == pytest.approx(1.0) for r in plain)
    assert summary["costs"]["tiny"]["seconds"]["1"] > 0
    greedy = [r for r in records if r["temperature"] == 0 and r["status"] == "ok"]
    assert all(r["diverged"] is not None for r in greedy)
    sampled = [r for r in records if r["temperature"] > 0 and r["status"] == "ok"]
    assert all((r["diverged"] is None) == (r["kind"] == "peer") for r in sampled)   # same seed: comparable
    broken = [r for r in summary["rows"] if r["arm"] == "hf-broken"]
    assert broken and all(r["status"] == "unsupported" and "no_such_generate_argument" in r["error"]
                          for r in broken)
    report = (out / "report.md").read_text()
    for heading in ("## Across suites", "## Per suite", "## c(k)/c(1)", "## Conventions", "unsupported"):
        assert heading in report
    for plot in ("speedup.png", "acceptance.png", "costs.png"):
        assert (out / plot).stat().st_size > 1000


def test_resume_completes_a_killed_run_without_duplicates(tiny, suite, tmp_path):
    out = tmp_path / "run"
    small = dict(drafters=("none", "prompt-lookup"), temperatures=(0.0,), peers=(), plots=False)
    run_bench(config(tiny, suite, out, limit=1, **small), progress=False)      # "killed" after one sample
    with open(out / "records.jsonl", "a") as handle:
        handle.write('{"suite": "tiny", "id": "s1", "arm"')                   # a torn last line
    with pytest.raises(ValueError, match="--resume"):
        run_bench(config(tiny, suite, out, **small), progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_bench(config(tiny, suite, out, resume=True, max_new_tokens=7, **small), progress=False)
    first = (out / "records.jsonl").read_text().splitlines()[0]
    run_bench(config(tiny, suite, out, resume=True, **small), progress=False)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    keys = [(r["id"], r["arm"], r["temperature"]) for r in records]
    assert len(keys) == len(set(keys)) == 3 * 2
    assert (out / "records.jsonl").read_text().splitlines()[0] == first      # the finished sample was kept


def test_c_of_k_drops_pending_nodes_between_measurements(tiny, suite):
    from vlmspec.target import Target

    target = Target.from_pretrained(tiny, dtype="bf16")
    sample = read_suite(suite)[0]
    costs = measure_costs(target, encode(target, sample), [1, 4, 8], repeats=1, warmup=0)
    assert set(costs) == {1, 4, 8} and all(seconds > 0 for seconds in costs.values())
    assert cost_grid(33)[-1] == 33 and cost_grid(3)[-1] == 16


def test_interpolation_between_measured_k():
    costs = {1: 1.0, 2: 1.2, 4: 1.6}
    assert interpolate(costs, 3) == pytest.approx(1.4)
    assert interpolate(costs, 2) == 1.2
    assert interpolate(costs, 6) == pytest.approx(2.0)                          # last segment's slope


def test_suite_reader_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "category": "c", "prompt": "hi"}\n{"id": "b", oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: bad JSON"):
        read_suite(path)
    path.write_text('{"id": "a", "category": "c", "images": ["missing.png"], "prompt": "hi"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: image not found"):
        read_suite(path)
    path.write_text('{"id": "a", "category": "c"}\n')
    with pytest.raises(ValueError, match="exactly one of 'prompt' or 'messages'"):
        read_suite(path)
    path.write_text('{"id": "a", "category": "c", "prompt": "x"}\n{"id": "a", "category": "c", "prompt": "y"}\n')
    with pytest.raises(ValueError, match="duplicate id"):
        read_suite(path)
    with pytest.raises(ValueError, match="not found"):
        read_suite(tmp_path / "nope.jsonl")


def test_cli_help_and_boundary_errors(tiny, suite, tmp_path, capsys):
    for command in ("bench", "demo"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    assert main(["bench", "--suite-file", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "suite file not found" in capsys.readouterr().err
    assert main(["bench", "--out", str(tmp_path / "o")]) == 2                   # no suites at all
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert main(["bench", "--target", str(tiny), "--suite-file", str(suite), "--device", "cuda",
                     "--out", str(tmp_path / "o")]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert main(["bench", "--suite-file", "x", "--temperatures", "0,hot"]) == 2
    assert main(["bench", "--suite-file", "x", "--drafters", "eagle", "--drafter-option", "eagle:tree=kind=bogus"]) == 2
    assert main(["bench", "--suite-file", "x", "--drafter-option", "eagle:depth=3"]) == 2    # names no arm
    assert "names no arm" in capsys.readouterr().err


# ---------------------------------------------------------------- metrics on hand-made records

def record(arm, sample, new_tokens, forwards, decode_seconds, accepted=None, nodes=None, draft=None, verify=None,
           tokens=None, temperature=0.0, status="ok", depths=None):
    return {"arm": arm, "suite": "s", "id": sample, "temperature": temperature, "status": status, "error": None,
            "new_tokens": new_tokens, "target_forwards": forwards, "decode_seconds": decode_seconds,
            "seconds": decode_seconds, "prefill_seconds": 0.0,
            "accepted_per_step": accepted, "tree_nodes_per_step": nodes,
            "tree_depth_per_step": depths or (None if nodes is None else [3 if n > 1 else 0 for n in nodes]),
            "draft_forwards_per_step": None if accepted is None else [1] * len(accepted),
            "draft_seconds": draft, "verify_seconds": verify, "token_ids": tokens or list(range(new_tokens))}


def test_tau_conventions_and_acceptance_by_depth():
    # sample a: prefill + steps accepting 2, 0, 3 → 1 + 3 + 1 + 4 = 9 tokens in 4 forwards
    a = record("x", "a", 9, 4, 1.0, accepted=[2, 0, 3], nodes=[5, 5, 5], draft=0.1, verify=0.8)
    # sample b: prefill + steps accepting 1, 1 (and a root-only step that drafted nothing)
    b = record("x", "b", 6, 4, 1.0, accepted=[1, 1, 0], nodes=[4, 4, 1], draft=0.1, verify=0.8)
    assert metrics.tau([a, b]) == pytest.approx(15 / 8)                          # totals, prefill included
    assert metrics.tau_minus_1_per_step([a, b]) == pytest.approx(7 / 6)
    # one step accepting 5 drafts, but the first emitted token was EOS: nothing past it is emitted or counted
    cut = record("x", "c", 2, 2, 0.1, accepted=[5], nodes=[6], draft=0.0, verify=0.1)
    assert metrics.tau([cut]) == 1.0 and metrics.tau_minus_1_per_step([cut]) == 0.0
    # drafted steps: 2, 0, 3, 1, 1 → depth1: 4/5; depth2: (2,3)=2 of 4; depth3: 1 of 2
    assert metrics.acceptance_by_depth([a, b]) == pytest.approx([4 / 5, 2 / 4, 1 / 2])
    # a tree that stopped at depth 1 (its node was EOS) and was accepted does not count at depth 2
    eos = record("x", "d", 2, 2, 0.1, accepted=[1], nodes=[2], depths=[1], draft=0.0, verify=0.1)
    assert metrics.acceptance_by_depth([a, b, eos]) == pytest.approx([5 / 6, 2 / 4, 1 / 2])


def test_speedup_pairs_samples_and_excludes_failures():
    plain = [record("none", "a", 10, 10, 2.0), record("none", "b", 10, 10, 2.0)]
    fast = [record("x", "a", 10, 5, 1.0), record("x", "b", 0, 0, 0.0, status="unsupported")]
    # only sample a is shared: (10 / 1) / (10 / 2) = 2
    assert metrics.speedup(fast, plain) == pytest.approx(2.0)
    assert metrics.speedup([record("x", "a", 30, 10, 4.0)], plain) == pytest.approx(30 / 4 / 5)
    assert metrics.geometric_mean([2.0, 0.5, None]) == pytest.approx(1.0)


def test_divergence_efficiency_and_summary_rows():
    plain = [record("none", "a", 4, 4, 1.0, accepted=[0, 0, 0], nodes=[1, 1, 1], draft=0.0, verify=0.9,
                    tokens=[1, 2, 3, 4]),
             record("none", "b", 4, 4, 1.0, accepted=[0, 0, 0], nodes=[1, 1, 1], draft=0.0, verify=0.9,
                    tokens=[5, 6, 7, 8])]
    arm = [record("x", "a", 4, 2, 0.5, accepted=[2], nodes=[3], draft=0.1, verify=0.3, tokens=[1, 2, 3, 4]),
           record("x", "b", 4, 2, 0.5, accepted=[2], nodes=[3], draft=0.1, verify=0.3, tokens=[5, 6, 9, 8])]
    assert metrics.divergence_rate(arm, plain) == 0.5
    assert metrics.first_divergence([5, 6, 9, 8], [5, 6, 7, 8]) == 2
    assert metrics.first_divergence([1, 2], [1, 2, 3]) == 2
    costs = {1: 0.10, 2: 0.11, 4: 0.13}
    row = metrics.summarize_group(arm, plain, costs)
    assert row["tau"] == 2.0 and row["speedup"] == pytest.approx(2.0)
    # ideal = τ·c(1) / (c(3) + c_draft) = 2 · 0.10 / (0.12 + 0.1)
    assert row["ideal_speedup"] == pytest.approx(0.2 / 0.22)
    assert row["efficiency"] == pytest.approx(2.0 / (0.2 / 0.22))
    assert row["draft_share"] == pytest.approx(0.2) and row["verify_share"] == pytest.approx(0.6)
    summary = metrics.summarize(plain + arm, {"s": costs})
    across = {r["arm"]: r for r in summary["across_suites"]}
    assert across["x"]["speedup_geomean"] == pytest.approx(2.0) and across["none"]["tau_mean"] == 1.0
    sampled = [dict(r, temperature=1.0) for r in arm]
    assert metrics.divergence_rate(sampled, plain) == 0.5                 # seeded: the same tokens expected
    assert metrics.divergence_rate([dict(r, kind="peer") for r in sampled], plain) is None
    assert math.isclose(metrics.tokens_per_second(plain), 4.0)


def test_text_assistant_trains_and_serves_as_peer_and_draft_model(tmp_path):
    """The text-only assistant for `hf-assisted:DIR`: trains on the testbed stream with the target's tokenizer and
    runs both as the HF peer and as our draft-model drafter."""
    from vlmspec.bench.assistant import train_text_assistant
    from vlmspec.testbed.model import TINY, build_model, build_processor, corpus, train_tokenizer

    tokenizer = train_tokenizer(TINY.vocab_size, corpus(n=100))
    target = tmp_path / "testbed"
    build_model(TINY, tokenizer).save_pretrained(target)
    build_processor(tokenizer).save_pretrained(target)
    assistant = train_text_assistant(tmp_path / "assistant", target, steps=2, hidden=32, layers=1, batch_size=2,
                                     progress=False)
    assert json.loads((assistant / "assistant.json").read_text())["steps"] == 2
    suite = tmp_path / "suite.jsonl"
    Image.new("RGB", (128, 128), (200, 20, 20)).save(tmp_path / "red.png")
    suite.write_text(json.dumps({"id": "a", "category": "vqa", "images": ["red.png"],
                                 "prompt": "<image> What color is the shape?"}) + "\n")
    out = run_bench(BenchConfig(target=str(target), drafters=("none", "draft-model"), suite_files=(str(suite),),
                                drafter_options=(f"draft-model:model={assistant}",
                                                 "draft-model:tree=kind=chain,depth=3"),
                                peers=(f"hf-assisted:{assistant}",),
                                max_new_tokens=6, out=str(tmp_path / "run"), cost_repeats=1, plots=False),
                    progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert {r["arm"]: r["status"] for r in summary["rows"]} == {"none": "ok", "draft-model": "ok",
                                                                f"hf-assisted:{assistant}": "ok"}
    assert summary["arms"][1]["tree"]["kind"] == "chain" and summary["arms"][1]["tree"]["depth"] == 3
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert all(n <= 4 for r in records if r["arm"] == "draft-model" for n in r["tree_nodes_per_step"])
