"""EAGLE-2: one decoder layer over [token embedding ; target feature] predicts the next target feature; the
target's lm_head turns features into draft logits; the tree is expanded dynamically (see `tree.TreeBuilder`).

Alignment: the draft input at sequence position t is the pair (f_{t-1}, x_t) — the target's feature after token
t-1 and token t — and its output approximates f_t, whose lm_head logits predict x_{t+1}. Image positions are
treated like any other position (the text-only baseline of the image-aware designs).

Decoding is `feature.FeatureDrafter`'s loop (shared with the image-aware designs): the prompt's entries are its
pairs at positions 0 … S−1 (1-D, the entry's index), each step catches up on the verified pairs
((f_root, a_1), …, (f_{a_k}, bonus)) and drafts the tree on the draft's own predicted features.

Training (`training_loss`): see `vlmspec.train.losses` — the same forward over whole sequences, with the pairs'
true features at step 1 and its own predictions at unrolled steps. Subclasses change what a "feature" is
(`input_features`, e.g. a fusion of several target layers) and may add an input term (`image_context`: per
prompt pair and for every later pair, added after the fc, e.g. a global image vector).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vlmspec.drafters.base import register_drafter
from vlmspec.drafters.feature import FeatureDrafter

if TYPE_CHECKING:
    from vlmspec.train.losses import LossConfig


@dataclass(frozen=True)
class EagleConfig:
    feature_layer: int = -1        # which target hidden state is the feature (-1: the last, post-norm)
    num_heads: int = 0             # 0: the target's
    intermediate_size: int = 0     # 0: the target's


@register_drafter
class EagleDrafter(FeatureDrafter):
    drafter_type = "eagle"
    config_class = EagleConfig

    def __init__(self, target, config: EagleConfig):
        super().__init__(target, config)
        self.resolve_layer(getattr(config, "feature_layer", -1))               # a clear error if out of range

    # ------------------------------------------------------------------ model
    def forward(self, tokens: Tensor, features: Tensor, positions: Tensor, mask: Tensor | None,
                cache=None, extra: Tensor | None = None) -> Tensor:
        """tokens [B, n], features [B, n, H] (the target feature before each token), optional `extra` [B, n, H]
        added to the fused input → predicted features [B, n, H]."""
        return self.decoder(self.text_inputs(tokens, features, extra), positions, mask, cache)

    def image_context(self, prefill) -> tuple[Tensor | None, Tensor | None]:
        """(input term of each prompt pair [1, S, H], of every later pair [H]); None where there is none."""
        return None, None

    def prompt_entries(self, prefill, first_token: int) -> tuple[Tensor, Tensor, Tensor | None]:
        features = self.input_features(prefill.hidden_states)                   # [1, S, H]
        first = torch.tensor([[first_token]], device=prefill.input_ids.device)
        tokens = torch.cat([prefill.input_ids[:, 1:], first], dim=1)            # [1, S]
        extra, context = self.image_context(prefill)
        positions = torch.arange(tokens.shape[1], device=tokens.device)         # [S]
        return self.text_inputs(tokens, features, extra)[0], positions, context

    # ------------------------------------------------------------------ training
    def feature_layers(self) -> list[int]:
        return sorted({self.resolve_layer(self.config.feature_layer), self.target.num_layers})

    def training_extra(self, batch) -> Tensor | None:
        """The `extra` input term of every pair of a batch [B, n, H] (None: none); see the subclasses."""
        return None

    def training_loss(self, batch, config: "LossConfig") -> tuple[Tensor, dict[str, float]]:
        from vlmspec.train.losses import pair_targets, unrolled_loss

        pairs = pair_targets(batch, self.target.num_layers)
        features = self.input_features(batch.hidden_states)[:, :-1]           # [B, n, H]: f_i of pair i
        extra = self.training_extra(batch)

        def step(tokens, inputs, positions, mask, cache):
            return self(tokens, inputs, positions, mask, cache, extra)

        return unrolled_loss(step, self.decoder.new_cache, self.draft_logits, pairs, features, config)
