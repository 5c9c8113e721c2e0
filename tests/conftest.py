"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest

from vlmspec.testing import save_tiny_model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random-init LLaVA model directory with sharpened logits (one per test session)."""
    return save_tiny_model(tmp_path_factory.mktemp("model"), "llava", lm_head_scale=10.0)
