"""Greedy losslessness in float32: the engine's output equals the target's own `model.generate(do_sample=False)`
for every vision family in `vlmspec.testing.FAMILIES`, every registered drafter (random/untrained, and the target
as its own draft model, which always agrees), chain, static and dynamic trees, one and two images.

Near ties follow DESIGN: a difference is excused only when the first differing position has a top-2 margin
under 1e-4, and more than 5% excused cases fail."""

from __future__ import annotations

import random

import pytest
import torch

from vlmspec import Generator, Target, TreeConfig, available_drafters, build_drafter
from vlmspec.testing import FAMILIES, compare_greedy, random_image, save_tiny_model

VISION_FAMILIES = [name for name in FAMILIES if name != "llama"]
TREES = [TreeConfig("chain", depth=4), TreeConfig("static", depth=3, topk=3, total_tokens=8),
         TreeConfig("dynamic", depth=4, topk=3, total_tokens=10)]
WORDS = "the cat sat on a red mat what color is it describe image two blue circles count top left".split()
CASES_PER_FAMILY = 26
MAX_NEW_TOKENS = 12


def make_case(index: int):
    rng = random.Random(1000 + index)
    num_images = 2 if index % 4 == 3 else 1
    images = [random_image(rng) for _ in range(num_images)]
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 8))]
    prompt = " ".join(["<image>"] * num_images + words) if index % 2 else " ".join(words)   # no marker: images first
    return images, prompt


@pytest.fixture(scope="module", params=VISION_FAMILIES)
def family_target(request, tmp_path_factory):
    torch.manual_seed(0)
    directory = save_tiny_model(tmp_path_factory.mktemp(request.param), request.param, lm_head_scale=8.0, attention_scale=4.0,
                                layers=2)
    return Target.from_pretrained(directory, dtype=torch.float32), directory


def drafter_variants(target: Target, directory) -> list[tuple[str, object]]:
    variants = []
    for name in available_drafters():
        if name == "draft-model":
            variants.append(("draft-model(self)", build_drafter(name, target, model=str(directory))))
        else:
            variants.append((name, build_drafter(name, target, seed=1)))
    return variants


def test_greedy_equality_all_drafters_all_trees(family_target):
    target, directory = family_target
    variants = drafter_variants(target, directory)
    outcomes = {"equal": 0, "near-tie": 0, "different": 0}
    failures = []
    for index in range(CASES_PER_FAMILY):
        images, prompt = make_case(index)
        inputs = target.encode(images, prompt=prompt)
        with torch.no_grad():
            generated = target.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        reference = generated[0, inputs["input_ids"].shape[1]:].tolist()
        name, drafter = variants[index % len(variants)]
        for tree in TREES:
            result = Generator(target, drafter, tree).generate(images, prompt=prompt, max_new_tokens=MAX_NEW_TOKENS)
            outcome = compare_greedy(target.model, inputs, result.token_ids, reference)
            outcomes[outcome] += 1
            if outcome == "different":
                failures.append((index, name, tree.kind, result.token_ids, reference))
    assert not failures, f"greedy outputs differ from model.generate: {failures[:3]}"
    total = sum(outcomes.values())
    assert outcomes["near-tie"] <= 0.05 * total, f"too many excused near-ties: {outcomes}"


def test_every_drafter_every_tree_on_two_images(family_target):
    """Each registered drafter (both variants for draft-model) on a two-image prompt, all tree kinds."""
    target, directory = family_target
    rng = random.Random(7)
    images = [random_image(rng), random_image(rng)]
    prompt = "<image> compare <image> what changed"
    inputs = target.encode(images, prompt=prompt)
    with torch.no_grad():
        reference = target.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    reference = reference[0, inputs["input_ids"].shape[1]:].tolist()
    variants = drafter_variants(target, directory) + [("draft-model(random)", build_drafter(
        "draft-model", target, model=str(save_tiny_model(directory.parent / "other", "llama", seed=5,
                                                         tokenizer=target.tokenizer))))]
    for name, drafter in variants:
        for tree in TREES:
            result = Generator(target, drafter, tree).generate(images, prompt=prompt, max_new_tokens=MAX_NEW_TOKENS)
            outcome = compare_greedy(target.model, inputs, result.token_ids, reference)
            assert outcome != "different", (name, tree, result.token_ids, reference)


def test_self_draft_accepts_everything(family_target):
    """The target as its own draft model agrees at every depth: τ is the chain depth + 1 (up to the token cap)."""
    target, directory = family_target
    drafter = build_drafter("draft-model", target, model=str(directory))
    images, prompt = make_case(1)
    result = Generator(target, drafter, TreeConfig("chain", depth=4)).generate(images, prompt=prompt,
                                                                              max_new_tokens=21)
    stats = result.stats
    assert stats.accepted_by_depth and min(stats.accepted_by_depth) > 0.99, stats.accepted_by_depth
    assert stats.target_forwards == 1 + -(-(len(result.token_ids) - 1) // 5)


def test_plain_decoding_has_tau_one(family_target):
    target, _ = family_target
    images, prompt = make_case(0)
    result = Generator(target).generate(images, prompt=prompt, max_new_tokens=MAX_NEW_TOKENS)
    assert result.stats.tau == 1.0 and result.stats.target_forwards == len(result.token_ids)
