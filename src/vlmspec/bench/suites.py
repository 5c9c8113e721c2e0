"""Benchmark suites: DESIGN-format JSONL files (one sample per line: `id`, `category`, `images` relative to the
file's folder, `prompt` or `messages`, optional `reference`). Every problem is a `ValueError` naming the file and
line, raised before any model runs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SuiteSample:
    suite: str
    id: str
    category: str
    images: tuple[Path, ...]
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = field(default=None, hash=False, compare=False)
    reference: str | None = None


def read_suite(path: str | Path, name: str | None = None) -> list[SuiteSample]:
    """Read and validate a suite file; `name` (default: the file's stem, or its folder's name for suite.jsonl)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"suite file not found: {path}")
    if name is None:
        name = path.parent.name if path.stem == "suite" else path.stem
    samples: list[SuiteSample] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: bad JSON: {error.msg}") from None
        samples.append(_sample(record, name, path.parent, where))
        if samples[-1].id in seen:
            raise ValueError(f"{where}: duplicate id {samples[-1].id!r}")
        seen.add(samples[-1].id)
    if not samples:
        raise ValueError(f"suite file {path} has no samples")
    return samples


def _sample(record: Any, suite: str, folder: Path, where: str) -> SuiteSample:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a sample must be a JSON object")
    for key in ("id", "category"):
        if not isinstance(record.get(key), (str, int)) or str(record.get(key)).strip() == "":
            raise ValueError(f"{where}: missing or empty {key!r}")
    prompt, messages = record.get("prompt"), record.get("messages")
    if (prompt is None) == (messages is None):
        raise ValueError(f"{where}: give exactly one of 'prompt' or 'messages'")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ValueError(f"{where}: 'prompt' must be a non-empty string")
    if messages is not None and (not isinstance(messages, list) or not messages):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of chat messages")
    images = record.get("images", [])
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise ValueError(f"{where}: 'images' must be a list of paths")
    resolved = []
    for image in images:
        image_path = Path(image) if Path(image).is_absolute() else folder / image
        if not image_path.is_file():
            raise ValueError(f"{where}: image not found: {image_path}")
        resolved.append(image_path)
    reference = record.get("reference")
    return SuiteSample(suite=suite, id=str(record["id"]), category=str(record["category"]), images=tuple(resolved),
                       prompt=prompt, messages=messages, reference=None if reference is None else str(reference))


def load_suites(names: list[str] = (), files: list[str | Path] = ()) -> dict[str, list[SuiteSample]]:
    """Testbed suites by name (generated with their documented default n and seed) and suite files, by name."""
    suites: dict[str, list[SuiteSample]] = {}
    if names:
        from vlmspec.testbed.data import default_suite

        for name in names:
            suites[name] = read_suite(default_suite(name), name)
    for file in files:
        samples = read_suite(file)
        name = samples[0].suite
        if name in suites:
            raise ValueError(f"two suites are named {name!r}; rename one of the files")
        suites[name] = samples
    if not suites:
        raise ValueError("no suites: give --suites NAME[,NAME…] or --suite-file FILE")
    return suites
