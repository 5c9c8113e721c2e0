"""Resolve the user-facing names (`--target`, `--drafter`, `--tree`) into a ready `Generator`.

`--tree` takes an explicit tree (`TreeConfig.parse`), `auto` (the tree `vlmspec.autotree` expects to run fastest on
this machine, from the probed c(k) and the checkpoint's acceptance profile) or `recommended` (the checkpoint's own
tree). Unset: `auto` for a checkpoint (its recommended tree when it has no acceptance profile), the default tree
for an untrained drafter. Under load, `auto` is re-picked per batch size (`tree_picker`, for the engine's
`TreeBudget`). Only the tree's shape changes, so every choice is lossless.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Sequence

from vlmspec.autotree import AcceptanceProfile, choose_tree, describe
from vlmspec.drafters import available_drafters, build_drafter, load_drafter, recommended_tree
from vlmspec.drafters.base import Drafter, read_drafter_meta, resolve_drafter_path
from vlmspec.engine import Generator
from vlmspec.target import Target
from vlmspec.tree import TreeConfig


def parse_options(options: Sequence[str]) -> dict[str, object]:
    """["key=value", …] → dict; integers, floats and true/false are converted."""
    parsed: dict[str, object] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise ValueError(f"bad drafter option {option!r}: expected KEY=VALUE")
        for convert in (int, float):
            try:
                parsed[key] = convert(value)
                break
            except ValueError:
                continue
        else:
            parsed[key] = {"true": True, "false": False}.get(value.lower(), value)
    return parsed


def open_drafter(name: str, target: Target, options: Sequence[str] = ()) -> tuple[Drafter | None, TreeConfig | None]:
    """'none' → (None, None); an existing path or testbed:<type> → loaded checkpoint with its recommended tree;
    a registered type → an untrained drafter (options as KEY=VALUE)."""
    if name == "none":
        return None, None
    if Path(name).exists() or name.startswith("testbed:"):
        return load_drafter(name, target), recommended_tree(name)
    if name in available_drafters():
        return build_drafter(name, target, **parse_options(options)), None
    raise ValueError(f"unknown drafter {name!r}: not 'none', a checkpoint directory, testbed:<type>, or one of "
                     f"{', '.join(available_drafters())}")


TREE_WORDS = ("auto", "recommended")
log = logging.getLogger(__name__)


def check_tree(spec: str) -> None:
    """Validate a `--tree` value before any model loads: `auto`, `recommended` or an explicit tree."""
    if spec not in TREE_WORDS:
        try:
            TreeConfig.parse(spec)
        except ValueError as error:
            raise ValueError(f"{error} (or auto, recommended)") from None


def is_checkpoint(name: str) -> bool:
    return name != "none" and (Path(name).exists() or name.startswith("testbed:"))


def checkpoint_profile(name: str) -> AcceptanceProfile | None:
    """The acceptance profile of a checkpoint: its config.json's `acceptance` (written by `vlmspec tune --save`),
    else a depth-only prior from its training's final top-1 accuracy (`train_config.json`: `acc@1` at every depth,
    no gain from width), else None."""
    from vlmspec.drafters import speculators

    directory = resolve_drafter_path(name)
    if speculators.read_config(directory) is not None:      # an engine-format checkpoint records no profile
        return None
    meta = read_drafter_meta(directory)
    if meta.get("acceptance"):
        return AcceptanceProfile.from_dict(meta["acceptance"])
    tokens_per_forward = int(meta.get("config", {}).get("tokens_per_forward", 1) or 1)
    try:
        trained = json.loads((directory / "train_config.json").read_text())
        accuracy = float(trained["final_metrics"]["acc@1"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return AcceptanceProfile(by_depth=(min(max(accuracy, 0.0), 1.0),), tokens_per_forward=tokens_per_forward,
                             source="training acc@1 (no tune profile)")


def auto_tree(target: Target, name: str, drafter: Drafter, batch: int = 1) -> TreeConfig | None:
    """`--tree auto` for drafter `name`; None when the drafter has no acceptance profile. c_draft: the profile's
    draft forward / c(1) ratio times this machine's c(1), else the drafter's parameters over the target's (the
    lm_head it borrows included) times c(1); c_node from the profile's node ratio (`autotree.node_cost`)."""
    from vlmspec.probe import target_costs

    profile = checkpoint_profile(name) if is_checkpoint(name) else None
    if profile is None:
        return None
    costs = target_costs(target)
    ratio = profile.draft_cost_ratio
    if ratio is None:
        own = sum(p.numel() for p in drafter.parameters()) + target.lm_head.weight.numel()
        ratio = own / sum(p.numel() for p in target.model.parameters())
    choice = choose_tree(costs, ratio * costs[min(costs)], profile, batch)
    log.info(describe(choice, [profile.source]))
    return choice.tree


def resolve_tree(spec: str | None, target: Target, name: str, drafter: Drafter | None,
                 recommended: TreeConfig | None) -> TreeConfig:
    """The tree a drafter runs under (see the module docstring); plain decoding gets the default (unused)."""
    if drafter is None:
        return TreeConfig()
    if spec is None:
        spec = "auto"
    if spec == "auto":
        return auto_tree(target, name, drafter) or recommended or TreeConfig()
    if spec == "recommended":
        return recommended or TreeConfig()
    check_tree(spec)
    return TreeConfig.parse(spec)


def tree_picker(spec: str | None, target: Target, name: str,
                drafter: Drafter | None) -> Callable[[int], TreeConfig | None] | None:
    """Under `--tree auto` (the default for a checkpoint): the tree the engine's budget tries at batch size B beside
    the batch-1 tree, the auto tree re-picked for B (`auto_tree(batch=B)`, None without a profile); None for any
    other `--tree`."""
    if drafter is None or (spec or "auto") != "auto":
        return None
    return lambda batch: auto_tree(target, name, drafter, batch)


def open_generator(target: str, drafter: str = "none", tree: str | None = None, dtype: str | None = None,
                   drafter_options: Sequence[str] = ()) -> Generator:
    if tree:
        check_tree(tree)
    loaded = Target.from_pretrained(target, dtype=dtype)
    draft, recommended = open_drafter(drafter, loaded, drafter_options)
    return Generator(loaded, draft, resolve_tree(tree, loaded, drafter, draft, recommended),
                     pick_tree=tree_picker(tree, loaded, drafter, draft))
