"""Layers shared by the feature drafters: a decoder layer of the target's width with its own small KV cache.

The layer is transformers' own `LlamaDecoderLayer` (not a copy), driven like the target: an explicit 4D additive
mask, explicit positions and a cache object, so tree drafting and training share one forward.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn


def draft_layer_config(text_config, num_heads: int = 0, intermediate_size: int = 0):
    """A one-layer Llama config of the target's width (heads / MLP size overridable)."""
    from transformers import LlamaConfig

    heads = num_heads or text_config.num_attention_heads
    hidden = text_config.hidden_size
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
    rope = getattr(text_config, "rope_parameters", None)
    if rope and "mrope_section" in rope:      # Qwen2-VL's 3-axis split: the draft layer's positions are 1-D
        rope = {key: value for key, value in rope.items() if key != "mrope_section"}
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate_size or text_config.intermediate_size,
                         num_attention_heads=heads, num_key_value_heads=heads, num_hidden_layers=1,
                         max_position_embeddings=getattr(text_config, "max_position_embeddings", 4096),
                         rms_norm_eps=getattr(text_config, "rms_norm_eps", 1e-6),
                         rope_parameters=rope)
    config._attn_implementation = "sdpa"
    return config


class DraftDecoder(nn.Module):
    """x [B, n, H] → one decoder layer (rotary positions, tree mask, optional cache) → final norm → [B, n, H]."""

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
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor | None, cache=None) -> Tensor:
        position_embeddings = self.rotary(x, positions)
        x = self.layer(x, attention_mask=mask, position_ids=positions, position_embeddings=position_embeddings,
                       use_cache=cache is not None, **{self._cache_kwarg: cache})
        return self.norm(x)


def causal_mask(length: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """Additive causal mask [1, 1, length, length] for training over whole sequences."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return torch.zeros(length, length, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
