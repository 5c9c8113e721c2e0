"""Every drafter shipped as `testbed:<type>`: it loads against the shipped testbed (same fingerprint, its
recommended tree), its fp32 greedy output equals the target's own `generate` on evaluation-seed prompts, and it is
trained (τ well above an untrained drafter's ≈ 1 on a long answer). Skipped when nothing is shipped."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from vlmspec import Generator, Target
from vlmspec.drafters import load_drafter
from vlmspec.drafters.base import recommended_tree
from vlmspec.testbed import SHIPPED_DIR, SHIPPED_DRAFTERS_DIR, data
from vlmspec.testing import compare_greedy

SHIPPED = sorted(p.name for p in SHIPPED_DRAFTERS_DIR.iterdir() if (p / "config.json").is_file()) \
    if SHIPPED_DRAFTERS_DIR.is_dir() else []
MAX_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def testbed():
    if not (SHIPPED_DIR / "model.safetensors").is_file():
        pytest.skip("shipped testbed weights missing")
    return Target.from_pretrained("testbed", dtype=torch.float32)


def prompts():
    """A long image answer, a short image answer and a text-only answer, all from evaluation seeds."""
    picks = []
    for name in ("describe", "vqa", "text_chat"):
        sample = data.make_sample(name, data.SUITE_DEFAULTS[name][1], 1)
        picks.append((name, [r.image for r in sample.images], sample.messages()))
    return picks


def test_something_is_shipped():
    assert SHIPPED, f"no drafter in {SHIPPED_DRAFTERS_DIR}"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_drafter_is_lossless_and_trained(testbed, name):
    config = json.loads((SHIPPED_DRAFTERS_DIR / name / "config.json").read_text())
    assert config["drafter_type"] == name and config["target"]["fingerprint"] == testbed.fingerprint()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # a fingerprint mismatch would warn
        drafter = load_drafter(f"testbed:{name}", testbed)
    generator = Generator(testbed, drafter, recommended_tree(f"testbed:{name}"))
    for suite, images, messages in prompts():
        inputs = testbed.encode(images, messages=messages)
        with torch.no_grad():
            out = testbed.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        expected = out[0, inputs["input_ids"].shape[1]:].tolist()
        result = generator.generate(images, messages=messages, max_new_tokens=MAX_NEW_TOKENS)
        assert compare_greedy(testbed.model, inputs, result.token_ids, expected) != "different", (name, suite)
        if suite == "describe":
            assert result.stats.tau >= 2.0, (name, result.stats.tau)
