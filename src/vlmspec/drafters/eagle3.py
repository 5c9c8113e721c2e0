"""EAGLE-3: the draft's feature input fuses a low, a mid and a high target layer (one linear map of their
concatenation, each layer RMS-normalised first) instead of the last state alone, and it is trained with a
training-time test: several unrolled steps on its own predicted features (`LossConfig.steps`), mostly by
cross-entropy on the logits, so its output space is free to differ from the target's last state.

Decoding is EAGLE-2's (`EagleDrafter`): verified pairs carry the fused true features, drafted nodes carry the
draft's own output (which the unrolled training taught it to consume).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from vlmspec.drafters.base import register_drafter
from vlmspec.drafters.eagle import EagleDrafter


@dataclass(frozen=True)
class Eagle3Config:
    layers: tuple[int, ...] = ()   # target hidden-state indices to fuse (0 = input embeddings); (): low/mid/high
    num_heads: int = 0             # 0: the target's
    intermediate_size: int = 0     # 0: the target's

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", parse_layers(self.layers))


def parse_layers(layers) -> tuple[int, ...]:
    """A tuple/list of ints, one int, or "1,4,7" (a CLI option) → tuple of ints; a clear error otherwise."""
    if isinstance(layers, str):
        layers = [part for part in layers.replace(" ", "").split(",") if part]
    elif isinstance(layers, int):
        layers = [layers]
    try:
        return tuple(int(layer) for layer in layers)
    except (TypeError, ValueError):
        raise ValueError(f"layers must be integers like 1,4,7; got {layers!r}") from None


def default_fusion_layers(num_layers: int) -> tuple[int, ...]:
    """Low, mid and high hidden states (EAGLE-3 fuses early, middle and late decoder outputs: here indices 2,
    L/2, L−2 of a deep target; a shallow one (L < 6) gives 1, L/2, L), duplicates removed."""
    if num_layers >= 6:
        return tuple(sorted({2, num_layers // 2, num_layers - 2}))
    return tuple(sorted({1, max(1, num_layers // 2), num_layers}))


def rms_norm(target) -> nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm(target.hidden_size, eps=getattr(target.text_config, "rms_norm_eps", 1e-6))


class FusionDrafter(EagleDrafter):
    """An EAGLE drafter whose feature input is `fuse(concat(norm_l(hidden_states[l]) for l in layers))`."""

    def __init__(self, target, config):
        super().__init__(target, config)
        layers = config.layers or default_fusion_layers(target.num_layers)
        self.layers = [self.resolve_layer(layer) for layer in layers]
        hidden = target.hidden_size
        # Intermediate states are not normalised (RMS ~100 where the last, post-norm state is ~1): each fused
        # layer gets its own RMSNorm first, so no layer swamps the others (or bf16 precision).
        self.layer_norms = nn.ModuleList(rms_norm(target) for _ in self.layers)
        self.fuse = nn.Linear(len(self.layers) * hidden, hidden, bias=False)

    def input_features(self, hidden_states: Sequence[Tensor] | dict[int, Tensor]) -> Tensor:
        dtype = self.fuse.weight.dtype
        parts = [norm(hidden_states[layer].to(dtype)) for norm, layer in zip(self.layer_norms, self.layers)]
        return self.fuse(torch.cat(parts, dim=-1))                                        # [..., S, H]

    def feature_layers(self) -> list[int]:
        return sorted({*self.layers, self.target.num_layers})


@register_drafter
class Eagle3Drafter(FusionDrafter):
    drafter_type = "eagle3"
    config_class = Eagle3Config

    def default_loss_config(self):
        from vlmspec.train.losses import LossConfig

        return LossConfig(steps=3, feature_weight=0.1, logit_weight=1.0)
