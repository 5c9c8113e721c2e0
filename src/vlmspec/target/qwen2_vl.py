"""Qwen2-VL and Qwen2.5-VL: 3-axis M-RoPE positions and an input path that does not need torchvision.

Positions. Every token has a (temporal, height, width) position. Text tokens use the same number on all three axes;
an image's tokens lie on its grid, and the text after an image continues from the grid's largest position + 1, so
the last prompt position is `S - 1 + rope_delta` with a per-sequence `rope_delta` (≤ 0). The prefill positions come
from the model's own `get_rope_index`; the delta is kept in `TargetState.position_offset`, and a pending node at
depth d gets `state.lengths[b] + d + rope_delta` on all three axes — exactly what HF assigns to the same tokens fed as
a plain continuation (checked in tests/test_families.py).

Inputs. Current transformers builds the composite `Qwen2VLProcessor` only with its video processor, which needs
torchvision (a multi-GB CUDA torch from the registry). Images need only the image processor (which has a PIL
backend) and the tokenizer, so `QwenImageTextProcessor` holds those two plus the chat template, and `encode` does
what the composite processor does for images: expand each image placeholder to the image's merged patch count and
return `mm_token_type_ids` (1 on image tokens), without which Qwen2.5-VL's own forward and `generate` silently fall
back to 1-D positions. An HF `Qwen2VLProcessor` (where torchvision is installed) works too: only its
`image_processor` and `tokenizer` are used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vlmspec.inputs import Messages
from vlmspec.target.families import Family, register_family

if TYPE_CHECKING:
    from vlmspec.target.base import TargetState

IMAGE_TYPE = 1     # mm_token_type_ids: 0 text, 1 image, 2 video
VIDEO_TYPE = 2


@dataclass
class QwenImageTextProcessor:
    """The image half of Qwen2-VL's processor: an image processor, a tokenizer and the chat template."""

    image_processor: Any
    tokenizer: Any
    chat_template: str | None = None
    image_token: str = "<|image_pad|>"

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "QwenImageTextProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path)
        image_token_id = json.loads((path / "config.json").read_text()).get("image_token_id")
        image_token = (tokenizer.convert_ids_to_tokens(image_token_id) if image_token_id is not None
                       else getattr(tokenizer, "image_token", None) or cls.image_token)
        return cls(image_processor, tokenizer, read_chat_template(path) or tokenizer.chat_template, image_token)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.chat_template:
            (directory / "chat_template.jinja").write_text(self.chat_template)

    def apply_chat_template(self, messages: Messages, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)


def read_chat_template(path: Path) -> str | None:
    """The processor's chat template as HF saves it: chat_template.jinja, or chat_template.json's `chat_template`."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return None


@register_family
class Qwen2VLFamily(Family):
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")

    def load_processor(self, path: Path) -> QwenImageTextProcessor:
        return QwenImageTextProcessor.from_pretrained(path)

    def encode(self, processor: Any, images: list, messages: Messages) -> dict[str, Tensor]:
        tokenizer = processor.tokenizer
        template = getattr(processor, "chat_template", None) or tokenizer.chat_template
        if not template:
            raise ValueError("this Qwen2-VL checkpoint has no chat template (chat_template.jinja/.json)")
        text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)
        image_token = getattr(processor, "image_token", None) or "<|image_pad|>"
        pieces = text.split(image_token)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"the chat template placed {len(pieces) - 1} image token(s) for {len(images)} image(s)")
        vision: dict[str, Tensor] = {}
        if images:
            vision = dict(processor.image_processor(images=images, return_tensors="pt"))
            merge = processor.image_processor.merge_size
            counts = (vision["image_grid_thw"].prod(dim=-1) // merge ** 2).tolist()        # tokens per image
            text = pieces[0] + "".join(image_token * count + piece for count, piece in zip(counts, pieces[1:]))
        encoded = dict(tokenizer(text, return_tensors="pt"))
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        encoded["mm_token_type_ids"] = (encoded["input_ids"] == image_token_id).long() * IMAGE_TYPE  # [1, S]
        return {**encoded, **vision}

    def prefill_positions(self, model: torch.nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """[3, B, S] positions from the model's own `get_rope_index`, and the rope delta [B, 1]."""
        input_ids = inputs["input_ids"]                                                    # [B, S]
        grids = {key: inputs.get(key) for key in ("image_grid_thw", "video_grid_thw")}
        if grids["image_grid_thw"] is None and grids["video_grid_thw"] is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(3, *input_ids.shape)
            return positions, torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)
        token_types = inputs.get("mm_token_type_ids")
        if token_types is None:      # inputs from elsewhere: derive the types from the placeholder ids
            config = model.config
            token_types = ((input_ids == config.image_token_id).long() * IMAGE_TYPE
                           + (input_ids == config.video_token_id).long() * VIDEO_TYPE)
        extra = {key: inputs[key] for key in ("second_per_grid_ts",) if key in inputs}
        positions, delta = model.model.get_rope_index(input_ids, mm_token_type_ids=token_types, **grids,
                                                      attention_mask=inputs.get("attention_mask"), **extra)
        return positions, delta.to(input_ids.device)                                      # [3, B, S], [B, 1]

    def node_positions(self, state: "TargetState", depths: Tensor) -> Tensor:
        """Text continues from the rope delta on all three axes. [3, B, n]"""
        lengths = torch.tensor(state.lengths, device=depths.device)[:, None]              # [B, 1]
        positions = lengths + depths + state.position_offset                              # [B, n]
        return positions[None].expand(3, *positions.shape)
