"""ViSpec: a vision adaptor and a global image vector.

- **Adaptor.** `num_queries` learned queries cross-attend to each image's visual tokens (the target's projected
  visual embeddings, `hidden_states[0]` over one run of image tokens; Idefics3 may give one run per tile) and
  compress them to `num_queries` draft entries. They take the image's place in the draft's KV cache, at positions
  spread evenly over the image's span (query j of q at the run's token `start + (j * length) // q`); the draft's
  cache therefore holds fewer entries than the target's, and positions are kept per entry (see `vision.Layout`).
- **Global image vector.** Each image run is attention-pooled (one learned query) to a vector; every later text
  pair adds `gate ⊙ W·g`, where g is the mean of the vectors of the images before it (at decode time: of all
  images). The gate starts at zero, so an untrained adaptor leaves the text inputs exactly as EAGLE's.
- Decoding is EAGLE-2's (one draft forward per tree level).
- Ablation switches: `compress=false` keeps every visual token as an entry (projected, as `msd`), and
  `global_vector=false` drops the global vector.

Training: `train.losses.unrolled_loss` over the draft's entries (compressed entries are never trained, never
replaced); ViSpec's defaults (`default_loss_config`) turn on the top-k ranking loss and the self-correction pass.
ViSpec's regenerated long answers are the collector's `--regenerate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlmspec.drafters.base import register_drafter
from vlmspec.drafters.vision import (AttentionPool, GatedContext, Layout, Pairs, VisualFeatureDrafter, gather_runs,
                                    place_runs)


@dataclass(frozen=True)
class VispecConfig:
    feature_layer: int = -1        # which target hidden state is the text feature (-1: the last, post-norm)
    num_heads: int = 0             # 0: the target's
    intermediate_size: int = 0     # 0: the target's
    num_queries: int = 4           # draft entries per image (run of image tokens)
    compress: bool = True          # ablation off: every visual token is an entry (through a projection, as msd)
    global_vector: bool = True     # ablation off: no global image vector

    def __post_init__(self):
        if not isinstance(self.num_queries, int) or isinstance(self.num_queries, bool) or self.num_queries < 1:
            raise ValueError(f"vispec num_queries must be an integer >= 1, got {self.num_queries!r}")


@register_drafter
class VispecDrafter(VisualFeatureDrafter):
    drafter_type = "vispec"
    config_class = VispecConfig

    def __init__(self, target, config: VispecConfig):
        super().__init__(target, config)
        hidden = target.hidden_size
        if config.compress:
            self.slots_per_run = config.num_queries
            self.adaptor = AttentionPool(hidden, config.num_queries, self.num_heads)
        else:
            self.visual_proj = nn.Linear(hidden, hidden, bias=False)
        if config.global_vector:
            self.global_pool = AttentionPool(hidden, 1, self.num_heads)
            self.global_fusion = GatedContext(hidden)

    def default_loss_config(self):
        from vlmspec.train.losses import LossConfig

        return LossConfig(ranking_weight=0.1, self_correction=True)

    def text_inputs(self, tokens: Tensor, features: Tensor, context: Tensor | None) -> Tensor:
        x = super().text_inputs(tokens, features, None)                       # [B, n, H]
        return x if context is None else self.global_fusion(x, context)

    def fixed_inputs(self, pairs: Pairs, layout: Layout) -> tuple[Tensor, Tensor] | None:
        if not self.config.compress:
            return self.visual_proj(layout.gather(pairs.visual)), layout.gather(pairs.image_mask) & layout.real
        if not any(layout.runs):
            return None
        tokens, valid, runs = gather_runs(pairs.visual, layout)                 # [R, L, H]
        return place_runs(self.adaptor(tokens, valid), runs, layout)            # adaptor: [R, q, H]

    def pair_context(self, pairs: Pairs, layout: Layout) -> tuple[Tensor | None, Tensor | None]:
        if not self.config.global_vector or not any(layout.runs):
            return None, None
        tokens, valid, runs = gather_runs(pairs.visual, layout)
        vectors = self.global_pool(tokens, valid)[:, 0]                         # [R, H]
        batch, entries = layout.index.shape
        total = vectors.new_zeros(batch, entries, vectors.shape[-1])            # [B, M, H]
        count = vectors.new_zeros(batch, entries, 1)
        for r, (b, start, end, slot) in enumerate(runs):
            after = slot + (self.slots_per_run or end - start)                  # the entries after this image
            total[b, after:] = total[b, after:] + vectors[r]
            count[b, after:] = count[b, after:] + 1
        every = torch.stack([vectors[[r for r, run in enumerate(runs) if run[0] == b]].mean(0) if layout.runs[b]
                             else vectors.new_zeros(vectors.shape[-1]) for b in range(batch)])   # [B, H]
        return total / count.clamp(min=1), every
