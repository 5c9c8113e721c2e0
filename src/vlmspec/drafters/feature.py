"""The one decode loop of the EAGLE-style feature drafters (eagle, eagle3, lumen, msd, vispec, flash).

Each is an fc over [token embedding ; target feature] feeding one decoder layer whose output approximates the
target's next feature; the target's lm_head turns features into draft logits. An "entry" of the draft's KV cache
is one such input at one position. Decode state: the draft's own one-row cache holds entries built from the
target's TRUE features. Each step first runs the entries verified since the last step (catch-up; at the first
step the whole prompt), keeps them, then drafts the tree level by level as pending nodes fed with the draft's own
predicted features (`treedraft.draft_tree`); after verification the pending nodes are dropped and the accepted
tokens + the bonus, with the target's features before them, become the next catch-up.

The designs differ only in the prompt's entries (`prompt_entries`: EAGLE pairs every prompt token with the feature
before it; the image-aware designs may give image tokens other inputs, or compress an image's run to a few entries,
see `vision.py`), in the input of a text pair (`text_inputs`, with an optional context term such as a global image
vector), and in the positions (EAGLE: the entry's index, 1-D; the image-aware designs: the target's own position
of the entry's token, M-RoPE included). Decode-time entries are text and continue from the last position + 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vlmspec.drafters.base import DraftState, Drafter
from vlmspec.drafters.layers import DraftDecoder, draft_layer_config
from vlmspec.drafters.treedraft import draft_tree
from vlmspec.pending import PendingNodes
from vlmspec.tree import Tree, TreeConfig
from vlmspec.verify import SamplingConfig


@dataclass
class FeatureDraftState(DraftState):
    cache: Any = None
    root: int = 0                                # the last verified token (the next tree's root)
    length: int = 0                              # committed entries in the draft cache
    next_position: Tensor | None = None          # position of the next committed entry: [] ([3] for M-RoPE)
    pending: PendingNodes = field(default_factory=lambda: PendingNodes.empty(1))
    context: Tensor | None = None                # [H] context term of every decode-time pair (None: none)
    catchup: Tensor | None = None                # [n, H] draft inputs of verified entries not yet in the cache …
    catchup_positions: Tensor | None = None      # … and their positions [n] ([3, n] for M-RoPE)


def entry_causal_mask(count: int, dtype: torch.dtype, device, prefix: int = 0) -> Tensor:
    """Additive mask [1, 1, count, prefix + count]: new entries see the whole prefix and earlier new entries."""
    allowed = torch.ones(count, prefix + count, dtype=torch.bool, device=device).tril(diagonal=prefix)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


class FeatureDrafter(Drafter):
    """fc over [token embedding ; feature] → one decoder layer (1-D or, with `mrope`, 3-axis positions) → the
    target's lm_head. Subclasses define `prompt_entries` and may override `text_inputs` and `input_features`."""

    def __init__(self, target, config, mrope: bool = False):
        super().__init__(target, config)
        hidden = target.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        layer_config = draft_layer_config(target.text_config, config.num_heads, config.intermediate_size, mrope=mrope)
        self.decoder = DraftDecoder(layer_config)
        self.num_heads = layer_config.num_attention_heads

    # ------------------------------------------------------------------ model pieces
    def input_features(self, hidden_states) -> Tensor:
        """The draft's feature input from the target's hidden states (a tuple or a layer → tensor dict):
        [..., S, H] → [..., S, H]."""
        return hidden_states[self.resolve_layer(self.config.feature_layer)]

    def draft_logits(self, features: Tensor) -> Tensor:
        return self.target.lm_head(features).float()                           # [..., V]

    def text_inputs(self, tokens: Tensor, features: Tensor, context: Tensor | None) -> Tensor:
        """tokens [B, n], features [B, n, H], an additive context [B, n, H] or None → draft inputs [B, n, H]."""
        embeddings = self.target.embed_tokens(tokens).to(features.dtype)      # [B, n, H]
        inputs = self.fc(torch.cat([embeddings, features], dim=-1))
        return inputs if context is None else inputs + context.to(inputs.dtype)

    def prompt_entries(self, prefill, first_token: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """The prompt's draft entries (the prompt followed by the first emitted token): inputs [M, H], positions
        [M] ([3, M] for M-RoPE), and the context term of every later pair [H] (None: none)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ decoding
    def begin(self, target, prefill, first_token: int) -> FeatureDraftState:
        if prefill.input_ids.shape[0] != 1:
            raise ValueError(f"{self.drafter_type} decodes batch 1")
        inputs, positions, context = self.prompt_entries(prefill, first_token)
        return FeatureDraftState(root=first_token, cache=self.decoder.new_decode_cache(),
                                 pending=PendingNodes.empty(1, inputs.device), context=context,
                                 catchup=inputs, catchup_positions=positions)

    def _catch_up(self, state: FeatureDraftState) -> Tensor:
        """Run the verified entries into the cache (one forward); returns the last one's predicted feature [H]."""
        count = state.catchup.shape[0]
        mask = entry_causal_mask(count, state.catchup.dtype, state.catchup.device, prefix=state.length)
        positions = state.catchup_positions                                    # [n] or [3, n]
        out = self.decoder(state.catchup[None], positions.unsqueeze(-2), mask, state.cache)[0]   # [n, H]
        state.forwards += 1
        state.length += count
        state.next_position = positions[..., -1] + 1             # the last entry is text: every axis alike
        state.catchup = state.catchup_positions = None
        return out[-1]

    def _run_nodes(self, state: FeatureDraftState, tokens: list[int], features: Tensor, parents: list[int]) -> Tensor:
        """Feed pairs (tokens, features [n, H]) as pending nodes under `parents` (pending indices, -1: off the
        committed prefix) in one forward; returns predicted features [n, H]."""
        device = features.device
        token_tensor = torch.tensor([tokens], device=device)                   # [1, n]
        depths = state.pending.add(token_tensor, torch.tensor([parents], device=device))
        mask = state.pending.attention_mask(state.length, len(tokens), features.dtype)
        context = None if state.context is None else state.context.expand(len(tokens), -1)[None]
        x = self.text_inputs(token_tensor, features[None], context)            # [1, n, H]
        state.forwards += 1
        positions = state.next_position[..., None, None] + depths              # [1, n] or [3, 1, n]
        return self.decoder(x, positions, mask, state.cache)[0]

    def propose(self, state: FeatureDraftState, tree_config: TreeConfig, sampling: SamplingConfig,
                generator: torch.Generator | None) -> Tree:
        """EAGLE-2 drafting: one draft forward per tree level (flash overrides this)."""
        root_feature = self._catch_up(state)
        return draft_tree(self.tree_builder(tree_config, state.root, sampling, generator), root_feature,
                          self.draft_logits,
                          lambda tokens, features, parents: self._run_nodes(state, tokens, features, parents), sampling)

    def accept(self, state: FeatureDraftState, tree: Tree, path: list[int], verified, bonus: int) -> None:
        state.cache.keep(0, state.length, [])                                  # drop the drafted nodes
        state.pending.clear()
        tokens = torch.tensor([tree.tokens[0, path[1:]].tolist() + [bonus]], device=tree.tokens.device)
        features = self.input_features(verified.hidden_states)[:, path]        # [1, k+1, H]
        context = None if state.context is None else state.context.expand(tokens.shape[1], -1)[None]
        inputs = self.text_inputs(tokens, features, context)[0]                # [k+1, H]
        if state.catchup is None:
            start = state.next_position
        else:                                   # a step without drafting: the last catch-up was not run yet
            start = state.catchup_positions[..., -1] + 1
        positions = start[..., None] + torch.arange(tokens.shape[1], device=tokens.device)
        if state.catchup is not None:
            inputs = torch.cat([state.catchup, inputs])
            positions = torch.cat([state.catchup_positions, positions], dim=-1)
        state.catchup, state.catchup_positions = inputs, positions
        state.root = bonus
