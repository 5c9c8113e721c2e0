"""MSD: decoupled text and visual inputs.

At text positions the draft consumes the EAGLE pair, fc([token embedding ; target feature]); at image positions
it consumes the target's projected visual embedding (`hidden_states[0]` there, what the target's own first layer
sees) through its own projection, and no target feature: a visual token's meaning lives in its embedding, not in
a placeholder token id. Any number of images and image tokens (runs come from the target's image mask). Decoding
is EAGLE-2's (one draft forward per tree level); image tokens only occur in the prompt.

Training: the same forward over whole sequences (`train.losses.unrolled_loss`; unrolled steps never replace the
input of an image entry). MSD's curriculum — text-only data first, then a linear ramp of the multimodal share —
is the trainer's stage schedule (`vlmspec train` stages); `msd` expects to be trained with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from vlmspec.drafters.base import register_drafter
from vlmspec.drafters.vision import Layout, Pairs, VisualFeatureDrafter


@dataclass(frozen=True)
class MsdConfig:
    feature_layer: int = -1        # which target hidden state is the text feature (-1: the last, post-norm)
    num_heads: int = 0             # 0: the target's
    intermediate_size: int = 0     # 0: the target's


@register_drafter
class MsdDrafter(VisualFeatureDrafter):
    drafter_type = "msd"
    config_class = MsdConfig

    def __init__(self, target, config: MsdConfig):
        super().__init__(target, config)
        self.visual_proj = nn.Linear(target.hidden_size, target.hidden_size, bias=False)

    def fixed_inputs(self, pairs: Pairs, layout: Layout) -> tuple[Tensor, Tensor]:
        visual = layout.gather(pairs.visual)                                    # [B, M, H]
        return self.visual_proj(visual), layout.gather(pairs.image_mask) & layout.real
