"""EAGLE-3's draft layer as vLLM and the `speculators` library run it (the `layout="speculators"` of `eagle3`).

Unlike `DraftDecoder` over `fc([embedding ; feature])`, the first layer's attention reads both halves side by
side, each normalised on its own: q/k/v project `[input_layernorm(embedding) ; hidden_norm(hidden)]` (2H wide),
the residual stream starts from the hidden input (or from its normalised form with `norm_before_residual`), the
MLP is the usual H-wide one, and the layer returns the pre-norm state: drafting feeds that back as the next
node's hidden input, and `norm` is applied for the logits only.

Facts from the format's sources (read, not copied): vllm-project/vllm `vllm/model_executor/models/llama_eagle3.py`
(`LlamaDecoderLayer.forward`, `_norm_before_residual` / `_norm_after_residual`, `LlamaModel.forward` returning
`(norm(h), h)`) and vllm-project/speculators `src/speculators/models/eagle3/model_definitions.py`
(`Eagle3FirstLayerMixin`).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from vlmspec.drafters.layers import DraftDecoder


class Eagle3Decoder(DraftDecoder):
    """(embeddings, hidden) [B, n, H] each → one EAGLE-3 first layer → pre-norm state [B, n, H]."""

    def __init__(self, config, norm_before_residual: bool):
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        super().__init__(config)
        attention = self.layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(attention, name)
            setattr(attention, name, nn.Linear(2 * config.hidden_size, old.out_features, bias=old.bias is not None))
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_before_residual = norm_before_residual
        parameters = inspect.signature(attention.forward).parameters
        self._attention_cache_kwarg = "cache" if "cache" in parameters else "past_key_values"

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor | None, cache=None) -> Tensor:
        """x = [embedding ; hidden] [B, n, 2H] → the pre-norm state [B, n, H]."""
        embeddings, hidden = x.chunk(2, dim=-1)
        layer = self.layer
        normed_hidden = self.hidden_norm(hidden)
        residual = normed_hidden if self.norm_before_residual else hidden
        both = torch.cat([layer.input_layernorm(embeddings), normed_hidden], dim=-1)           # [B, n, 2H]
        attended, _ = layer.self_attn(hidden_states=both, attention_mask=mask,
                                      position_embeddings=self.rotary_embeddings(hidden, positions),
                                      **{self._attention_cache_kwarg: cache})
        state = residual + attended                                                   # [B, n, H]
        return state + layer.mlp(layer.post_attention_layernorm(state))

