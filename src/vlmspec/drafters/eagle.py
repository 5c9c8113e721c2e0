"""EAGLE-2: one decoder layer over [token embedding ; target feature] predicts the next target feature; the
target's lm_head turns features into draft logits; the tree is expanded dynamically (see `tree.TreeBuilder`).

Alignment: the draft input at sequence position t is the pair (f_{t-1}, x_t) — the target's feature after token
t-1 and token t — and its output approximates f_t, whose lm_head logits predict x_{t+1}. Image positions are
treated like any other position (the text-only baseline of the image-aware designs).

Decode state: the draft's own KV cache holds pairs whose features are the target's true features. Each step
first runs the pairs verified since the last step (catch-up: (f_root, a_1), …, (f_{a_k}, bonus)), commits them,
then drafts the tree as pending nodes fed with the draft's own predicted features; after verification the
pending nodes are dropped.

Training (`training_loss`): see `vlmspec.train.losses` — the same forward over whole sequences, with the pairs'
true features at step 1 and its own predictions at unrolled steps. Subclasses change what a "feature" is
(`input_features`, e.g. a fusion of several target layers) and may add an input term (`extra`, added after the
fc, e.g. a global image vector); the decode loop below serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from vlmspec.drafters.base import DraftState, Drafter, register_drafter
from vlmspec.drafters.layers import DraftDecoder, draft_layer_config
from vlmspec.pending import PendingNodes
from vlmspec.target.cache import compact_cache
from vlmspec.train.losses import LossConfig, pair_targets, unrolled_loss
from vlmspec.drafters.treedraft import draft_tree
from vlmspec.tree import Tree, TreeConfig
from vlmspec.verify import SamplingConfig


@dataclass(frozen=True)
class EagleConfig:
    feature_layer: int = -1        # which target hidden state is the feature (-1: the last, post-norm)
    num_heads: int = 0             # 0: the target's
    intermediate_size: int = 0     # 0: the target's


@dataclass
class FeatureDraftState(DraftState):
    cache: object = None
    length: int = 0                                    # committed pairs in the draft cache
    pending: PendingNodes = field(default_factory=lambda: PendingNodes.empty(1))
    tokens: list[int] = field(default_factory=list)   # verified tokens not yet in the draft cache …
    features: Tensor | None = None                     # … and the target features before them [n, H]
    extra: Tensor | None = None                        # input term of those pairs [n, H] (None: node_extra)
    node_extra: Tensor | None = None                   # input term of every later pair [H] (None: nothing)


@register_drafter
class EagleDrafter(Drafter):
    drafter_type = "eagle"
    config_class = EagleConfig

    def __init__(self, target, config: EagleConfig):
        super().__init__(target, config)
        hidden = target.hidden_size
        self.resolve_layer(getattr(config, "feature_layer", -1))                # a clear error if out of range
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.decoder = DraftDecoder(draft_layer_config(target.text_config, config.num_heads, config.intermediate_size))

    # ------------------------------------------------------------------ model
    def forward(self, tokens: Tensor, features: Tensor, positions: Tensor, mask: Tensor | None,
                cache=None, extra: Tensor | None = None) -> Tensor:
        """tokens [B, n], features [B, n, H] (the target feature before each token), optional `extra` [B, n, H]
        added to the fused input → predicted features [B, n, H]."""
        embeddings = self.target.embed_tokens(tokens).to(features.dtype)       # [B, n, H]
        fused = self.fc(torch.cat([embeddings, features], dim=-1))             # [B, n, H]
        if extra is not None:
            fused = fused + extra.to(fused.dtype)
        return self.decoder(fused, positions, mask, cache)

    def input_features(self, hidden_states: Sequence[Tensor] | dict[int, Tensor]) -> Tensor:
        """The draft's feature input from the target's hidden states (a tuple or a layer → tensor dict):
        [..., S, H] → [..., S, H]."""
        return hidden_states[self.resolve_layer(self.config.feature_layer)]

    # ------------------------------------------------------------------ training
    def feature_layers(self) -> list[int]:
        return sorted({self.resolve_layer(self.config.feature_layer), self.target.num_layers})

    def training_extra(self, batch) -> Tensor | None:
        """The `extra` input term of every pair of a batch [B, n, H] (None: none); see the subclasses."""
        return None

    def training_loss(self, batch, config: LossConfig) -> tuple[Tensor, dict[str, float]]:
        pairs = pair_targets(batch, self.target.num_layers)
        features = self.input_features(batch.hidden_states)[:, :-1]           # [B, n, H]: f_i of pair i
        extra = self.training_extra(batch)

        def step(tokens, inputs, positions, mask, cache):
            return self(tokens, inputs, positions, mask, cache, extra)

        return unrolled_loss(step, self.decoder.new_cache, self.draft_logits, pairs, features, config)

    def draft_logits(self, features: Tensor) -> Tensor:
        return self.target.lm_head(features).float()                           # [..., V]

    # ------------------------------------------------------------------ decoding
    def begin(self, target, prefill, first_token: int) -> FeatureDraftState:
        features = self.input_features(prefill.hidden_states)[0]                # [S, H]
        tokens = prefill.input_ids[0, 1:].tolist() + [first_token]
        return FeatureDraftState(cache=self.decoder.new_cache(), tokens=tokens, features=features,
                                 pending=PendingNodes.empty(1, features.device))

    def _run_pending(self, state: FeatureDraftState, tokens: list[int], features: Tensor,
                     parents: list[int], extra: Tensor | None = None) -> Tensor:
        """Feed pairs as pending nodes (features [n, H], extra [n, H] or [H]); returns predicted features [n, H]."""
        device = features.device
        token_tensor = torch.tensor([tokens], device=device)
        depths = state.pending.add(token_tensor, torch.tensor([parents], device=device))
        mask = state.pending.attention_mask(state.length, len(tokens), features.dtype)
        state.forwards += 1
        if extra is not None:
            extra = extra.expand(len(tokens), -1)[None]                         # [1, n, H]
        return self(token_tensor, features[None], state.length + depths, mask, state.cache, extra)[0]

    def propose(self, state: FeatureDraftState, tree_config: TreeConfig, sampling: SamplingConfig,
                generator: torch.Generator | None) -> Tree:
        count = len(state.tokens)
        extra = state.extra if state.extra is not None else state.node_extra
        out = self._run_pending(state, state.tokens, state.features, [i - 1 for i in range(count)], extra)
        compact_cache(state.cache, state.length, list(range(count)))           # catch-up pairs are true: keep
        state.length += count
        state.pending.clear()
        return draft_tree(self.tree_builder(tree_config, state.tokens[-1], sampling, generator), out[-1],
                          self.draft_logits,
                          lambda tokens, features, parents: self._run_pending(state, tokens, features, parents,
                                                                              state.node_extra), sampling)

    def accept(self, state: FeatureDraftState, tree: Tree, path: list[int], verified, bonus: int) -> None:
        compact_cache(state.cache, state.length, [])                           # drop the drafted nodes
        state.pending.clear()
        state.tokens = tree.tokens[0, path[1:]].tolist() + [bonus]
        state.features = self.input_features(verified.hidden_states)[0, path]                # [k+1, H]
        state.extra = None
