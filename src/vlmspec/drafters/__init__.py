"""Drafters: the interface and registry (`base`), shared layers, and one file per design."""

# importing the drafter modules registers the built-in drafters
from vlmspec.drafters import (draft_model, eagle, eagle3, flash, lumen, msd, prompt_lookup,  # noqa: F401
                              vispec)
from vlmspec.drafters.base import (Drafter, available_drafters, build_drafter, load_drafter, recommended_tree,
                                   save_drafter)

__all__ = ["Drafter", "available_drafters", "build_drafter", "load_drafter", "recommended_tree", "save_drafter"]
