"""`vlmspec tune` on a tiny random LLaVA: each candidate tree is benched as given, the ranking follows the bench
summaries, `--save` copies the checkpoint with the winner as its recommended tree, a rerun resumes without
benching again, and bad input fails before any model runs."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmspec import Target, build_drafter, save_drafter
from vlmspec.bench import tune as tune_module
from vlmspec.bench.runner import BenchConfig, tree_arm_name
from vlmspec.cli import main
from vlmspec.drafters import recommended_tree
from vlmspec.testing import save_tiny_model
from vlmspec.tree import TreeConfig

TREES = ("kind=chain,depth=2", "kind=dynamic,depth=2,topk=2,total=4,min_prob=0.02")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tune")
    tiny = save_tiny_model(folder / "model", "llava", lm_head_scale=10.0)
    checkpoint = save_drafter(build_drafter("eagle", Target.from_pretrained(tiny)), folder / "eagle",
                              tree=TreeConfig(kind="chain", depth=3))
    Image.new("RGB", (40, 40), (200, 20, 20)).save(folder / "red.png")
    suite = folder / "suite.jsonl"
    suite.write_text("".join(json.dumps({"id": f"s{i}", "category": "vqa", "images": ["red.png"],
                                         "prompt": f"<image> the cat sat on the mat {i} . describe"}) + "\n"
                             for i in range(2)))
    return tiny, checkpoint, suite


def run(setup, out, *extra) -> int:
    tiny, checkpoint, suite = setup
    return main(["tune", "--target", str(tiny), "--drafter", str(checkpoint), "--suite-file", str(suite),
                 "--trees", ";".join(TREES), "--max-new-tokens", "6", "--cost-repeats", "1", "--out", str(out),
                 "--quiet", *extra])


def test_tune_ranks_the_trees_and_saves_the_winner(setup, tmp_path, capsys, monkeypatch):
    _, checkpoint, _ = setup
    assert run(setup, tmp_path / "out", "--save", str(tmp_path / "saved")) == 0
    ranked = json.loads((tmp_path / "out" / "tune.json").read_text())["trees"]
    assert sorted(row["tree"] for row in ranked) == sorted(TREES)
    assert ranked[0]["speedup"] >= ranked[1]["speedup"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())   # one bench, an arm per tree
    assert [a["name"] for a in summary["arms"]] == ["none"] + [tree_arm_name(str(checkpoint), t) for t in TREES]
    for row in ranked:                                   # each tree ran as given; the numbers are the bench's
        name = tree_arm_name(str(checkpoint), row["tree"])
        assert next(a for a in summary["arms"] if a["name"] == name)["tree"] == TreeConfig.parse(row["tree"]).to_dict()
        across = next(r for r in summary["across_suites"] if r["arm"] == name)
        assert (row["speedup"], row["tau"]) == (across["speedup_geomean"], across["tau_mean"])
    records = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    chain = [r for r in records if r["arm"] == tree_arm_name(str(checkpoint), TREES[0])]
    assert chain and all(n <= 3 for r in chain for n in r["tree_nodes_per_step"])      # chain depth 2: 3 nodes
    best = TreeConfig.parse(ranked[0]["tree"]).to_dict()
    assert recommended_tree(tmp_path / "saved").to_dict() == best != recommended_tree(checkpoint).to_dict()
    assert (tmp_path / "saved" / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["acceptance"]     # for --tree auto
    chain_arm = next(r for r in summary["across_suites"] if r["arm"] == tree_arm_name(str(checkpoint), TREES[0]))
    assert saved["by_depth"] == chain_arm["acceptance_by_depth"] and saved["by_rank"][0] == saved["by_depth"][0]
    assert f"fastest: --tree {ranked[0]['tree']}" in capsys.readouterr().out

    def no_generation(*args, **kwargs):
        raise AssertionError("a finished sample was generated again")
    monkeypatch.setattr("vlmspec.bench.runner.run_sample", no_generation)
    assert run(setup, tmp_path / "out") == 0                # resumes: every sample is done
    assert [row["tree"] for row in json.loads((tmp_path / "out" / "tune.json").read_text())["trees"]] == \
        [row["tree"] for row in ranked]
    assert run(setup, tmp_path / "out", "--max-new-tokens", "5") == 2     # … but never with other settings
    assert "cannot resume" in capsys.readouterr().err


def test_bad_input_fails_before_benching(setup, tmp_path, capsys, monkeypatch):
    tiny, checkpoint, suite = setup
    monkeypatch.setattr("vlmspec.bench.runner.run_bench", lambda *a, **k: pytest.fail("benched"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    base = ["tune", "--target", str(tiny), "--suite-file", str(suite), "--out", str(tmp_path / "o")]
    cases = {"no drafter tree": (base + ["--drafter", "none"], "needs a drafter"),
             "bad tree": (base + ["--drafter", str(checkpoint), "--trees", "kind=bush"], "tree kind"),
             "untrained save": (base + ["--drafter", "eagle", "--save", str(tmp_path / "s")], "untrained"),
             "full save folder": (base + ["--drafter", str(checkpoint), "--save", str(tmp_path / "full")],
                                  "not an empty folder")}
    for case, (args, message) in cases.items():
        assert main(args) == 2, case
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (case, err)
    with pytest.raises(ValueError, match="one temperature"):
        tune_module.tune(str(tiny), str(checkpoint), TREES, tmp_path / "o", temperatures=(0.0, 1.0))
    bench = dict(target=str(tiny), drafters=("none", "eagle"), suite_files=(str(suite),))
    for bad in ({"trees": TREES, "tree": TREES[0]}, {"trees": (TREES[0], TREES[0])},
                {"trees": TREES, "drafter_options": (f"eagle:tree={TREES[0]}",)}):
        with pytest.raises(ValueError, match="tree"):
            BenchConfig(**bench, **bad)
