"""Resolve the user-facing names (`--target`, `--drafter`, `--tree`) into a ready `Generator`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from vlmspec.drafters import available_drafters, build_drafter, load_drafter, recommended_tree
from vlmspec.drafters.base import Drafter
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


def open_generator(target: str, drafter: str = "none", tree: str | None = None, dtype: str | None = None,
                   drafter_options: Sequence[str] = ()) -> Generator:
    tree_config = TreeConfig.parse(tree) if tree else None
    loaded = Target.from_pretrained(target, dtype=dtype)
    draft, recommended = open_drafter(drafter, loaded, drafter_options)
    return Generator(loaded, draft, tree_config or recommended or TreeConfig())
