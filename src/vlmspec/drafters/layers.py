"""Layers shared by the feature drafters: a decoder layer of the target's width with its own small KV cache.

The layer is transformers' own `LlamaDecoderLayer` (not a copy), driven like the target: an explicit 4D additive
mask, explicit positions and a cache object, so tree drafting and training share one forward.

Positions are 1-D `[B, n]`, or — for a draft layer built with `mrope=True` over a Qwen2-VL / Qwen2.5-VL target —
3-axis M-RoPE positions `[3, B, n]` (temporal, height, width), rotated as the target rotates them: the rotary
frequencies are split into the target's `mrope_section` (over each half of head_dim) and section i takes its
angles from axis i mod 3, the rule of transformers' `Qwen2VLRotaryEmbedding`. 1-D positions always get plain
rotary (equal to M-RoPE with the same number on all three axes).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn


def draft_layer_config(text_config, num_heads: int = 0, intermediate_size: int = 0, mrope: bool = False):
    """A one-layer Llama config of the target's width (heads / MLP size overridable).

    With `mrope` and a target whose rope has an `mrope_section` (Qwen2-VL), the config keeps the sections as
    `config.mrope_section` and the layer takes 3-axis positions; the sections split the target's head_dim, so
    a `num_heads` that changes head_dim is refused. Without `mrope` the layer is 1-D (the sections are dropped)."""
    from transformers import LlamaConfig

    heads = num_heads or text_config.num_attention_heads
    hidden = text_config.hidden_size
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
    rope = dict(getattr(text_config, "rope_parameters", None) or {})
    sections = rope.pop("mrope_section", None)                          # Llama's rope knows no 3-axis split
    if sections is not None and mrope and 2 * sum(sections) != hidden // heads:
        raise ValueError(f"the target's M-RoPE sections {list(sections)} split a head_dim of {2 * sum(sections)}, "
                         f"but the draft layer's head_dim is {hidden // heads} ({heads} heads): leave num_heads "
                         "at 0 (the target's) or pick one with the target's head_dim")
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate_size or text_config.intermediate_size,
                         num_attention_heads=heads, num_key_value_heads=heads, num_hidden_layers=1,
                         max_position_embeddings=getattr(text_config, "max_position_embeddings", 4096),
                         rms_norm_eps=getattr(text_config, "rms_norm_eps", 1e-6),
                         rope_parameters=rope or None)
    config.mrope_section = list(sections) if mrope and sections is not None else None
    config._attn_implementation = "sdpa"
    return config


class DraftDecoder(nn.Module):
    """x [B, n, H] → one decoder layer (rotary positions, tree mask, optional cache) → final norm → [B, n, H].

    positions: [B, n], or [3, B, n] when the config has `mrope_section` (see the module docstring)."""

    def __init__(self, config):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

        super().__init__()
        self.config = config
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(config)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        parameters = inspect.signature(self.layer.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"

    def new_cache(self):
        """A growing cache for training (autograd sees each step's keys as new tensors)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def new_decode_cache(self, rows: int = 1):
        """A preallocated cache written in place, for decoding (`target.cache.RowCache`)."""
        from vlmspec.target.cache import RowCache

        return RowCache(num_layers=1, rows=rows)

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor | None, cache=None) -> Tensor:
        x = self.layer(x, attention_mask=mask, position_ids=positions if positions.dim() == 2 else None,
                       position_embeddings=self.rotary_embeddings(x, positions),
                       use_cache=cache is not None, **{self._cache_kwarg: cache})
        return self.norm(x)

    def rotary_embeddings(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) [B, n, head_dim] of positions [B, n] or, with M-RoPE, [3, B, n]."""
        if positions.dim() == 2:
            return self.rotary(x, positions)
        sections = getattr(self.config, "mrope_section", None)
        if sections is None or positions.shape[0] != len(sections):
            raise ValueError(f"positions of shape {tuple(positions.shape)} need a draft layer with M-RoPE sections "
                             f"for each axis (it has {sections})")
        axes, batch, count = positions.shape
        split = 2 * list(sections)                          # the same sections over both halves of head_dim

        def combine(angles: Tensor) -> Tensor:              # [3B, n, head_dim] → [B, n, head_dim]
            per_axis = angles.view(axes, batch, count, -1).split(split, dim=-1)
            return torch.cat([part[i % axes] for i, part in enumerate(per_axis)], dim=-1)

        cos, sin = self.rotary(x, positions.reshape(axes * batch, count))
        return combine(cos), combine(sin)


def causal_mask(length: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """Additive causal mask [1, 1, length, length] for training over whole sequences."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return torch.zeros(length, length, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
