"""`--tree auto`: the expected-throughput model on fixed costs (deterministic choices), the cost probe's cache, and the
resolution of `--tree auto|recommended|explicit` at load (lossless: only the tree's shape changes)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vlmspec import Generator, Target, build_drafter, save_drafter
from vlmspec import probe
from vlmspec.autotree import SLACK, AcceptanceProfile, candidates, choose_tree, evaluate, expected_shape, monotone, \
    profile_from_summary, with_min_prob
from vlmspec.budget import arm_name
from vlmspec.runtime import checkpoint_profile, check_tree, resolve_tree, tree_picker
from vlmspec.tree import TreeConfig

FLAT = {1: 1.0, 64: 1.0}
PERFECT = AcceptanceProfile(by_depth=(1.0,), by_rank=(1.0,))


def linear(slope: float) -> dict[int, float]:
    return {1: 1.0, 64: 1.0 + slope * 63}


def chains(*depths: int) -> list[TreeConfig]:
    return [TreeConfig(kind="chain", depth=d) for d in depths]


def test_chain_choice_by_hand():
    half = AcceptanceProfile(by_depth=(0.5,))
    # E[tokens] of chain D = 1 + 0.5 + … + 0.5^D; c(n) = 1 + 0.5 (n − 1) → chain 1: 1.5 / 1.5 = 1.0 token/s,
    # chain 2: 1.75 / 2.0, chain 3: 1.875 / 2.5
    choice = choose_tree({1: 1.0, 2: 1.5, 4: 2.5}, 0.0, half, trees=chains(1, 2, 3))
    assert choice.tree.kind == "chain" and choice.tree.depth == 1
    assert choice.expected_tokens_per_step == pytest.approx(1.5) and choice.expected_speedup == pytest.approx(1.0)
    # with flat costs the deepest chain wins; the extra node is free, so min_prob is 0
    flat = choose_tree(FLAT, 0.0, half, trees=chains(1, 2, 3))
    assert flat.tree.depth == 3 and flat.tree.min_prob == 0.0
    assert flat.expected_speedup == pytest.approx(1.875)
    # draft forwards cost: (D + 1) · c_draft per step, so an expensive drafter prefers the short chain
    assert choose_tree(FLAT, 1.0, half, trees=chains(1, 2, 3)).tree.depth == 1


def test_dynamic_expected_shape_by_hand():
    profile = AcceptanceProfile(by_depth=(0.8,), by_rank=(0.8, 0.9))
    # m(1) = 0.8, m(2) = 0.2 − 0.2 · (1 − 0.9) / (1 − 0.8) = 0.1
    # level 1: 0.8, 0.1; level 2: 0.64, 0.08, 0.08, 0.01
    chances, levels = expected_shape(TreeConfig(kind="dynamic", depth=2, topk=2, total_tokens=4), profile)
    assert chances == pytest.approx([0.8, 0.64, 0.1, 0.08]) and levels == 2
    wide = TreeConfig(kind="dynamic", depth=2, topk=2, total_tokens=6)
    assert expected_shape(wide, profile)[0] == pytest.approx([0.8, 0.64, 0.1, 0.08, 0.08, 0.01])
    pruned, _ = expected_shape(TreeConfig(kind="dynamic", depth=2, topk=2, total_tokens=6, min_prob=0.5), profile)
    assert pruned == pytest.approx([0.8, 0.64, 0.1, 0.08])      # 0.1 < min_prob gets no children
    flash = AcceptanceProfile(by_depth=(0.8,), tokens_per_forward=2)
    slow, fast = (evaluate(TreeConfig(kind="chain", depth=4), FLAT, 1.0, p) for p in (profile, flash))
    assert fast.seconds_per_token < slow.seconds_per_token      # 2 draft forwards for 4 levels instead of 4


def test_fixed_costs_give_a_known_tree_deterministically():
    # perfect acceptance, free verify width, free drafts: the deepest chain; width adds nothing when C(1) = 1
    choice = choose_tree(FLAT, 0.0, PERFECT)
    assert choice.tree == TreeConfig(kind="chain", depth=12, min_prob=0.0)
    # an unsure first choice that the second often rescues: a small, shallow top-2 tree
    profile = AcceptanceProfile(by_depth=(0.6,), by_rank=(0.6, 0.8, 0.9, 0.95))
    costs = {1: 1.0, 2: 1.05, 4: 1.1, 8: 1.3, 16: 1.7, 32: 2.6, 64: 4.5}
    first, again = choose_tree(costs, 0.05, profile), choose_tree(dict(reversed(costs.items())), 0.05, profile)
    assert first == again
    assert first.tree == TreeConfig(kind="dynamic", depth=2, topk=2, total_tokens=4, min_prob=0.088)
    # within SLACK of the best expectation, and no tree that close has fewer nodes
    rates = [with_min_prob(evaluate(t, costs, 0.05, profile), costs, 0.05, profile, 1) for t in candidates()]
    best = max(c.expected_speedup for c in rates)
    assert first.expected_speedup >= (1 - SLACK) * best
    assert all(c.verified_nodes >= first.verified_nodes for c in rates if c.expected_speedup >= (1 - SLACK) * best)


def test_higher_cost_slope_gives_a_smaller_tree():
    profile = AcceptanceProfile(by_depth=(0.9, 0.85, 0.8), by_rank=(0.9, 0.95, 0.97))
    cheap, steep = (choose_tree(linear(s), 0.02, profile) for s in (0.01, 0.3))
    assert steep.verified_nodes < cheap.verified_nodes
    assert steep.tree.min_prob > cheap.tree.min_prob


def test_node_cost_gives_a_smaller_narrower_tree():
    # width rescues many misses, verify is nearly free: without a drafting cost per node a wide tree wins
    profile = AcceptanceProfile(by_depth=(0.7, 0.7, 0.7), by_rank=(0.7, 0.9, 0.95, 0.97))
    free = choose_tree(linear(0.005), 0.02, profile)
    dear = choose_tree(linear(0.005), 0.02, dataclasses.replace(profile, draft_node_ratio=0.05))
    assert free.tree.kind == "dynamic" and dear.verified_nodes < free.verified_nodes
    perfect = choose_tree(FLAT, 0.0, dataclasses.replace(PERFECT, draft_node_ratio=0.1))
    assert perfect.tree.kind == "chain" and perfect.tree.depth < 12
    assert perfect.expected_speedup < choose_tree(FLAT, 0.0, PERFECT).expected_speedup


def test_batch_growth_gives_a_smaller_tree():
    # a GPU-like c(k): flat to 16 tokens, then linear; at batch 16 every extra node costs a full token's share
    costs = {1: 1.0, 16: 1.0, 32: 2.0, 256: 16.0}
    profile = AcceptanceProfile(by_depth=(0.9, 0.85, 0.8), by_rank=(0.9, 0.95, 0.97))
    alone, loaded = (choose_tree(costs, 0.02, profile, batch=b) for b in (1, 16))
    assert loaded.verified_nodes < alone.verified_nodes


def test_profile_round_trip_and_errors():
    profile = AcceptanceProfile(by_depth=(0.9, 0.8), by_rank=(0.9, 0.95), draft_cost_ratio=0.1, source="x")
    assert AcceptanceProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
    for bad in ({"by_depth": ()}, {"by_depth": (1.2,)}, {"by_depth": (0.9,), "by_rank": (0.9, 0.8)},
                {"by_depth": (0.9,), "tokens_per_forward": 0}):
        with pytest.raises(ValueError):
            AcceptanceProfile(**bad)
    with pytest.raises(ValueError, match="unknown"):
        AcceptanceProfile.from_dict({"by_depth": [0.9], "colour": 1})
    with pytest.raises(ValueError, match="costs"):
        choose_tree({}, 0.0, profile)


def test_model_caps_rates_and_smooths_costs():
    profile = AcceptanceProfile(by_depth=(1.0, 0.8), by_rank=(0.9, 1.0, 1.0))
    assert profile.depth_rate(1) == 0.98 and profile.depth_rate(7) == pytest.approx(0.9)   # cap; mean past d=2
    # C(3) = 1 measured: the third choice still removes at most RANK_GAIN² of the misses
    assert profile.rank_mass(2, 1) + profile.rank_mass(2, 2) + profile.rank_mass(2, 3) < 1.0
    assert monotone({1: 1.0, 2: 1.5, 4: 1.3, 8: 2.0}) == {1: 1.0, 2: 1.3, 4: 1.3, 8: 2.0}


def test_profile_from_a_tune_summary():
    def arm(tree):
        return {"name": f"d [{tree}]", "tree": TreeConfig.parse(tree).to_dict()}

    trees = ["kind=chain,depth=3", "kind=dynamic,depth=4,topk=2,total=8", "kind=dynamic,depth=4,topk=4,total=8"]
    depth1 = [0.9, 0.95, 0.97]
    summary = {"config": {"temperatures": [0.0]}, "arms": [{"name": "none", "tree": None}] + [arm(t) for t in trees],
               "across_suites": [{"arm": f"d [{t}]", "temperature": 0.0, "acceptance_by_depth": [a, 0.8, 0.7]}
                                 for t, a in zip(trees, depth1)],
               "rows": [{"arm": f"d [{trees[0]}]", "suite": "s", "temperature": 0.0, "c_draft_step": 0.4,
                         "draft_forwards_per_step": 3.0, "mean_tree_nodes": 4.0}],
               "costs": {"s": {"seconds": {"1": 1.0}}}}
    profile = profile_from_summary(summary, "d")
    assert profile.by_depth == (0.9, 0.8, 0.7)
    assert profile.by_rank == (0.9, 0.95, 0.95, 0.97)            # k = 3 unmeasured: holds k = 2's
    assert profile.draft_cost_ratio == pytest.approx(0.1) and profile.draft_node_ratio is None   # one shape
    # c_draft per step = 0.1 · (forwards + 1) + 0.02 · drafted nodes in every arm: the fit recovers both
    shapes = [(3.0, 4.0), (1.0, 9.0), (2.0, 9.0)]                # (draft forwards, tree nodes incl. the root)
    summary["rows"] = [{"arm": f"d [{t}]", "suite": "s", "temperature": 0.0, "draft_forwards_per_step": f,
                        "mean_tree_nodes": n, "c_draft_step": 0.1 * (f + 1) + 0.02 * (n - 1)}
                       for t, (f, n) in zip(trees, shapes)]
    fitted = profile_from_summary(summary, "d")
    assert fitted.draft_cost_ratio == pytest.approx(0.1) and fitted.draft_node_ratio == pytest.approx(0.02)
    with pytest.raises(ValueError, match="chain"):
        profile_from_summary({**summary, "arms": [arm(trees[1])]}, "d")


# ---------------------------------------------------------------- probe and load-time resolution

def test_probe_caches_per_machine_target_and_dtype(tiny, tmp_path, monkeypatch):
    calls = []
    real = probe.measure_target_costs
    monkeypatch.setattr(probe, "measure_target_costs", lambda target: calls.append(target.dtype) or real(target))
    path = tmp_path / "costs.json"
    target = Target.from_pretrained(tiny, dtype="fp32")
    first = probe.target_costs(target, path)
    assert sorted(first) == list(probe.PROBE_KS) and all(v > 0 for v in first.values())
    assert probe.target_costs(target, path) == first and len(calls) == 1           # a cache hit measures nothing
    probe.target_costs(Target.from_pretrained(tiny, dtype="bf16"), path)
    assert len(calls) == 2 and len(json.loads(path.read_text())) == 2              # another dtype: another entry
    monkeypatch.setenv("VLMSPEC_CACHE", str(tmp_path / "env"))
    assert probe.cache_path() == tmp_path / "env" / "costs.json"


def test_tree_auto_resolves_at_load_and_stays_lossless(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(probe, "target_costs", lambda target: {1: 1.0, 2: 1.02, 4: 1.05, 8: 1.1, 16: 1.3,
                                                               64: 2.5})
    target = Target.from_pretrained(tiny, dtype="fp32")
    drafter = build_drafter("eagle", target, seed=0)
    checkpoint = save_drafter(drafter, tmp_path / "eagle", tree=TreeConfig(kind="chain", depth=2))
    recommended = TreeConfig(kind="chain", depth=2)
    assert checkpoint_profile(str(checkpoint)) is None                          # untuned, untrained: no profile
    assert resolve_tree(None, target, str(checkpoint), drafter, recommended) == recommended   # no profile: its own
    profile = AcceptanceProfile(by_depth=(0.9, 0.8), by_rank=(0.9, 0.95, 0.97), draft_cost_ratio=0.05)
    meta = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**meta, "acceptance": profile.to_dict()}))
    auto = resolve_tree("auto", target, str(checkpoint), drafter, recommended)
    assert auto == choose_tree(probe.target_costs(target), 0.05, profile).tree != recommended
    assert resolve_tree(None, target, str(checkpoint), drafter, recommended) == auto           # the default
    assert resolve_tree("recommended", target, str(checkpoint), drafter, recommended) == recommended
    assert resolve_tree("kind=chain,depth=3", target, "eagle", drafter, None) == TreeConfig(kind="chain", depth=3)
    assert resolve_tree(None, target, "eagle", drafter, None) == TreeConfig()   # untrained type: the default
    pick = tree_picker(None, target, str(checkpoint), drafter)                  # under load: re-picked per batch
    assert pick(1) == auto and pick(16) == choose_tree(probe.target_costs(target), 0.05, profile, batch=16).tree
    assert tree_picker("recommended", target, str(checkpoint), drafter) is None
    assert tree_picker(None, target, str(checkpoint), None) is None
    with pytest.raises(ValueError, match="tree kind"):
        check_tree("kind=bush")
    prompt = "the cat sat on the mat"
    plain = Generator(target, None).generate(prompt=prompt, max_new_tokens=12)
    assert Generator(target, drafter, auto).generate(prompt=prompt, max_new_tokens=12).token_ids == plain.token_ids
    prompts = [prompt, "a red circle", "two blue squares on a mat"]
    generator = Generator(target, drafter, auto, pick_tree=pick)
    batch = generator.generate_batch([{"prompt": p, "max_new_tokens": 12} for p in prompts], max_batch=3)
    assert [r.token_ids for r in batch] == [Generator(target, None).generate(prompt=p, max_new_tokens=12).token_ids
                                            for p in prompts]
    assert pick(4) != auto and arm_name(pick(4)) in generator.budget.rates()[4]   # batch 3 ran the tree picked for it


def test_tune_shows_the_tree_auto_resolved_to():
    from vlmspec.bench.tune import DEFAULT_TREES, table, tree_flag

    tree = TreeConfig(kind="dynamic", depth=5, topk=2, total_tokens=8, min_prob=0.086)
    assert TreeConfig.parse(tree_flag(tree)) == tree
    rows = [{"tree": "auto", "resolved": tree.to_dict(), "speedup": 1.5, "tau": 2.0}]
    assert f"| auto: {tree_flag(tree)} | **1.50** |" in table(rows)
    assert DEFAULT_TREES[0] == "auto" and all(check_tree(t) is None for t in DEFAULT_TREES)
