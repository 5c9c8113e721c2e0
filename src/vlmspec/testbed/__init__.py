"""The testbed: a small LLaVA VLM trained here from scratch and shipped as package data, plus its suites.

`SHIPPED_DIR` is the folder of the shipped model (config, processor, tokenizer, chat template, bf16
`model.safetensors`); `SHIPPED_DRAFTERS_DIR/<type>` holds the trained drafters shipped as `testbed:<type>`;
`shipped_path()` returns it or raises a clear `ValueError` when the weights are missing.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED_DRAFTERS_DIR = Path(__file__).resolve().parent / "drafters"   # testbed:<type> → SHIPPED_DRAFTERS_DIR/<type>


def shipped_path() -> Path:
    """The shipped testbed model folder; ValueError when the package was installed without its weights."""
    if not (SHIPPED_DIR / "model.safetensors").is_file() or not (SHIPPED_DIR / "config.json").is_file():
        raise ValueError(
            f"the shipped testbed weights are missing from {SHIPPED_DIR}; "
            "reinstall vlmspec with its package data or build them with `vlmspec testbed build --out DIR`"
        )
    return SHIPPED_DIR
