"""FLASH: latent-aware compression of the visual latents, and a semi-autoregressive head that drafts k tree
levels per draft forward.

- **Compression.** Each image pair is first fused like a text pair, but from the image token's visual embedding
  and the target's latent state before it: u_i = fc([hidden_states[0] ; f_i]). Learned attention pooling
  (`num_compressed` = C queries, keys/values from u) compresses each image run to C draft entries; their keys see
  the target's latents, hence "latent-aware". The entries take the run's place in the draft cache at positions
  spread over the span (see `vision.Layout`).
- **Semi-autoregressive head.** One draft forward (the decoder layer over a batch of pairs) predicts the feature
  after each of its pairs, whose lm_head logits give the next level; then `tokens_per_forward − 1` light heads
  (head j: norm(MLP(fc_j([token embedding ; previous predicted feature])))), with no attention and no cache,
  predict the features of the following levels from the child tokens the tree builder just chose. So one forward
  yields the logits of k consecutive levels.

How the tree is built (k = `tokens_per_forward`, levels counted from the root = 0):
    forward 0: the catch-up forward over the verified entries → feature of the root → lm_head → `expand` level 1.
    For each new level ℓ ≥ 1 that the builder wants expanded (its frontier):
      if ℓ is not a multiple of k: head (ℓ mod k) maps (parent's feature, node's token) → node feature;
      else: one decoder forward over the pending nodes of levels ℓ−k+1 … ℓ that lead to the frontier (inputs:
            parent's feature, own token; tree mask over the committed cache and the pending ancestors) → the
            frontier's features.
      lm_head(frontier features) → `expand` level ℓ + 1.
So a depth-D tree costs 1 + ⌊(D − 1)/k⌋ draft forwards per step (EAGLE-2: D); `state.forwards` counts them.
Chain, static and dynamic trees all go through the same `TreeBuilder` (one `expand` per level).

Training: the decoder step through `train.losses.unrolled_loss` (steps = 1: FLASH's depth comes from its heads),
then head j on the chain of the previous head's (or the decoder's) prediction at the previous pair and the true
token: the draft at depth j + 1, metric `acc@{j+1}`; depth weights step_decay^j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlmspec.drafters.base import register_drafter
from vlmspec.drafters.vision import (AttentionPool, Layout, Pairs, VisualFeatureDrafter, batch_pairs,
                                    build_layout, gather_runs, place_runs, rms_norm)


@dataclass(frozen=True)
class FlashConfig:
    feature_layer: int = -1        # which target hidden state is the text feature (-1: the last, post-norm)
    num_heads: int = 0             # 0: the target's
    intermediate_size: int = 0     # 0: the target's
    num_compressed: int = 4        # C: draft entries per image (run of image tokens)
    tokens_per_forward: int = 2    # k: tree levels drafted per draft forward

    def __post_init__(self):
        for name in ("num_compressed", "tokens_per_forward"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"flash {name} must be an integer >= 1, got {value!r}")


class LevelHead(nn.Module):
    """(token, previous predicted feature) → the next predicted feature, without attention: [B, n] × [B, n, H]."""

    def __init__(self, hidden: int, intermediate: int, eps: float):
        super().__init__()
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.mlp = nn.Sequential(rms_norm(hidden, eps), nn.Linear(hidden, intermediate, bias=False), nn.SiLU(),
                                 nn.Linear(intermediate, hidden, bias=False))
        self.norm = rms_norm(hidden, eps)

    def forward(self, embeddings: Tensor, features: Tensor) -> Tensor:
        x = self.fc(torch.cat([embeddings, features], dim=-1))
        return self.norm(x + self.mlp(x))


@register_drafter
class FlashDrafter(VisualFeatureDrafter):
    drafter_type = "flash"
    config_class = FlashConfig

    def __init__(self, target, config: FlashConfig):
        super().__init__(target, config)
        hidden = target.hidden_size
        self.slots_per_run = config.num_compressed
        self.tokens_per_forward = config.tokens_per_forward      # the decode loop (`treedraft.draft_trees`)
        self.pool = AttentionPool(hidden, config.num_compressed, self.num_heads)
        decoder_config = self.decoder.config
        self.heads = nn.ModuleList(LevelHead(hidden, decoder_config.intermediate_size, decoder_config.rms_norm_eps)
                                   for _ in range(config.tokens_per_forward - 1))

    # ------------------------------------------------------------------ model pieces
    def fixed_inputs(self, pairs: Pairs, layout: Layout) -> tuple[Tensor, Tensor] | None:
        if not any(layout.runs):
            return None
        latents = self.fc(torch.cat([pairs.visual, pairs.features], dim=-1))        # [B, n, H]
        tokens, valid, runs = gather_runs(latents, layout)                          # [R, L, H]
        return place_runs(self.pool(tokens, valid), runs, layout)                   # pool: [R, C, H]

    def head(self, level: int, tokens: Tensor, features: Tensor) -> Tensor:
        """Head `level` (1 … k−1): tokens [B, n], previous features [B, n, H] → features [B, n, H]."""
        embeddings = self.target.embed_tokens(tokens).to(features.dtype)
        return self.heads[level - 1](embeddings, features)

    # ------------------------------------------------------------------ training
    def training_loss(self, batch, config):
        from vlmspec.train.losses import chain_valid, step_loss, unrolled_loss

        if config.steps != 1:
            raise ValueError("flash trains its k-token heads instead of unrolled steps: use the loss option steps=1")
        pairs = batch_pairs(self, batch)
        layout = build_layout(pairs, self.slots_per_run)
        targets = self.entry_targets(batch, layout)
        step, keep = self.entry_step(pairs, layout)
        first: list[Tensor] = []

        def recording_step(tokens, features, positions, mask, cache):
            out = step(tokens, features, positions, mask, cache)
            if not first:
                first.append(out)                       # the decoder's step-1 prediction of every entry
            return out

        loss, metrics = unrolled_loss(recording_step, self.decoder.new_cache, self.draft_logits, targets,
                                      layout.gather(pairs.features), config, keep=keep)
        predicted, total_weight = first[0], 1.0
        for level in range(1, self.config.tokens_per_forward):
            previous = torch.cat([predicted[:, :1], predicted[:, :-1]], dim=1)  # prediction at the previous entry
            predicted = self.head(level, targets.tokens, previous)              # [B, M, H]
            selected = chain_valid(targets.valid, level + 1)
            term, accuracy = step_loss(predicted[selected], targets.next_features[selected].to(predicted.dtype),
                                       self.draft_logits, config)
            weight = config.step_decay ** level
            loss, total_weight = loss + weight * term, total_weight + weight
            metrics[f"acc@{level + 1}"] = accuracy
        loss = loss / total_weight
        metrics["loss"] = float(loss.detach())
        return loss, metrics
