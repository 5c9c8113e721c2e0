"""Drafters: the interface and registry (`base`), shared layers, and one file per design."""

from vlmspec.drafters import draft_model, eagle, prompt_lookup  # noqa: F401  (register the built-in drafters)
from vlmspec.drafters.base import (Drafter, available_drafters, build_drafter, load_drafter, recommended_tree,
                                   save_drafter)

__all__ = ["Drafter", "available_drafters", "build_drafter", "load_drafter", "recommended_tree", "save_drafter"]
