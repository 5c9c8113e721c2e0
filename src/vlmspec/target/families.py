"""Model-family adapters: the few things that differ between HF model classes.

A family registers itself for one or more HF class names. The default behaviour fits any decoder whose text
positions are 1-D (LLaVA-1.5, Idefics3/SmolVLM, plain causal LMs); Qwen2-VL's M-RoPE overrides the position hooks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from vlmspec.hardware import fast_dtype
from vlmspec.inputs import Messages

if TYPE_CHECKING:
    from vlmspec.target.base import TargetState

_FAMILIES: dict[str, type["Family"]] = {}


def register_family(cls: type["Family"]) -> type["Family"]:
    for name in cls.architectures:
        _FAMILIES[name] = cls
    return cls


def supported_architectures() -> list[str]:
    return sorted(_FAMILIES)


def family_for(model: torch.nn.Module) -> "Family":
    name = type(model).__name__
    if name not in _FAMILIES:
        raise ValueError(f"unsupported model class {name}; supported: {', '.join(supported_architectures())}")
    return _FAMILIES[name]()


class Family:
    """Defaults for a decoder with 1-D positions and an optional `config.image_token_id`."""

    architectures: ClassVar[tuple[str, ...]] = ()
    auto_class: ClassVar[str] = "AutoModelForImageTextToText"

    def image_token_id(self, model: torch.nn.Module) -> int | None:
        return getattr(model.config, "image_token_id", None)

    def encode(self, processor: Any, images: list, messages: Messages) -> dict[str, Tensor]:
        tokenizer = getattr(processor, "tokenizer", processor)
        template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
        if template:
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = plain_prompt(messages, getattr(processor, "image_token", "<image>"))
        if images:
            return dict(processor(images=images, text=text, return_tensors="pt"))
        return dict(tokenizer(text, return_tensors="pt"))

    def load_processor(self, path: Path) -> Any:
        """The processor (or tokenizer) saved beside a checkpoint."""
        import transformers

        if self.auto_class == "AutoModelForCausalLM":
            return transformers.AutoTokenizer.from_pretrained(path)
        return transformers.AutoProcessor.from_pretrained(path)

    def new_cache(self, model: torch.nn.Module):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    def prefill_positions(self, model: torch.nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """Explicit prefill positions and the family's position offset; None = let the model number 0…S-1."""
        return None, None

    def node_positions(self, state: "TargetState", depths: Tensor) -> Tensor:
        """Positions of pending nodes: each row's prefix length plus depth below it. [B, n]"""
        return torch.tensor(state.lengths, device=depths.device)[:, None] + depths


def plain_prompt(messages: Messages, image_token: str) -> str:
    """Fallback when a checkpoint has no chat template: the turns' text with image tokens in place."""
    lines = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            lines.append(content)
        else:
            lines.append("".join(image_token if part["type"] == "image" else part["text"] for part in content))
    return "\n".join(lines)


@register_family
class LlavaFamily(Family):
    architectures = ("LlavaForConditionalGeneration",)


@register_family
class Idefics3Family(Family):
    """Idefics3 / SmolVLM: images are split into tiles, each a run of image tokens between marker tokens."""

    architectures = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")


@register_family
class CausalLMFamily(Family):
    """Text-only decoders (as targets, or as independent draft models)."""

    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                     "GPT2LMHeadModel", "Gemma2ForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM")
    auto_class = "AutoModelForCausalLM"

    def image_token_id(self, model: torch.nn.Module) -> int | None:
        return None


def load_model_and_processor(path: Path, dtype: torch.dtype | str | None, device_map: str | dict | None = None,
                             max_memory: dict | None = None):
    """`from_pretrained` on a local directory, with the family's auto class; clear errors for bad checkpoints.
    `device_map` / `max_memory` are HF's placement options (None: HF's default, one device)."""
    import transformers

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path / 'config.json'}: {error}") from None
    architectures = config.get("architectures") or []
    family = next((_FAMILIES[name] for name in architectures if name in _FAMILIES), None)
    if family is None:
        raise ValueError(f"{path}: unsupported architecture {architectures}; supported: "
                         f"{', '.join(supported_architectures())}")
    auto_model = getattr(transformers, family.auto_class)
    placement = {key: value for key, value in (("device_map", device_map), ("max_memory", max_memory))
                 if value is not None}
    try:
        model = auto_model.from_pretrained(path, dtype=resolve_dtype(dtype) or "auto", **placement)
    except ImportError as error:
        if not placement:
            raise
        raise ValueError(f"cannot place the target with device_map={device_map!r}: {error}") from None  # accelerate
    return model, family().load_processor(path)


def resolve_dtype(dtype: torch.dtype | str | None, device: str | torch.device = "cpu") -> torch.dtype | None:
    """None or `checkpoint` (the checkpoint's own dtype: None), a torch dtype, or a name: fp32/float32,
    bf16/bfloat16, fp16/float16, or `fast` (bf16 where `device` computes bf16 natively, else fp32;
    `vlmspec.hardware`)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "checkpoint":
        return None
    if dtype == "fast":
        return fast_dtype(device)
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fast, checkpoint, {', '.join(names)}")
    return names[dtype]


# Families in their own modules register on import (they subclass `Family`, so they come last).
from vlmspec.target import llava_next, qwen2_vl  # noqa: E402,F401
