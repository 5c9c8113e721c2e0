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

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from vlmspec.drafters.base import DraftBatch, DraftState, Drafter
from vlmspec.drafters.layers import DraftDecoder, draft_layer_config
from vlmspec.drafters.treedraft import draft_trees
from vlmspec.pending import PendingNodes
from vlmspec.tree import Tree, TreeConfig
from vlmspec.verify import ChildScores


@dataclass
class FeatureDraftState(DraftState):
    cache: Any = None                            # the draft KV cache holding this row (a `RowCache`) …
    row: int = 0                                 # … at this row
    root: int = 0                                # the last verified token (the next tree's root)
    length: int = 0                              # committed entries in the draft cache
    next_position: Tensor | None = None          # position of the next committed entry: [] ([3] for M-RoPE)
    context: Tensor | None = None                # [H] context term of every decode-time pair (None: none)
    catchup: Tensor | None = None                # [n, X] draft inputs of verified entries not yet in the cache …
    catchup_positions: Tensor | None = None      # … and their positions [n] ([3, n] for M-RoPE)
    prompt: Callable[[], tuple] | None = None    # the prompt's entries, computed when first needed (`ready`) …
    deferred: list = field(default_factory=list)  # … and the (tokens, features) verified before that


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
    tokens_per_forward: int = 1                  # tree levels per draft forward (FLASH: more, with `head`)

    def head(self, level: int, tokens: Tensor, features: Tensor) -> Tensor:
        """Features of a level between draft forwards (tokens_per_forward > 1): [B, n], [B, n, H] → [B, n, H]."""
        raise NotImplementedError

    def begin(self, target, prefill, first_token: int) -> FeatureDraftState:
        if prefill.input_ids.shape[0] != 1:
            raise ValueError(f"{self.drafter_type} decodes batch 1")
        used = set(self.feature_layers())       # the deferred prompt keeps only these hidden states alive
        prefill = dataclasses.replace(prefill, hidden_states=tuple(
            states if layer in used else None for layer, states in enumerate(prefill.hidden_states)))
        return FeatureDraftState(root=first_token, cache=self.decoder.new_decode_cache(),
                                 prompt=lambda: self.prompt_entries(prefill, first_token))

    def ready(self, state: FeatureDraftState) -> None:
        """Compute the prompt's entries, and the inputs of what was verified since, if not done yet: an answer that
        ends before any drafting (the engine does not draft where answers are about to end) never pays for them."""
        if state.prompt is not None:
            state.catchup, state.catchup_positions, state.context = state.prompt()
            state.prompt = None
            for tokens, features in state.deferred:
                self._extend_catchup(state, tokens, features)
            state.deferred = []

    def new_batch(self) -> "FeatureDraftBatch":
        return FeatureDraftBatch(self)

    def propose(self, state: FeatureDraftState, tree_config: TreeConfig, scores: ChildScores) -> Tree:
        """One row's tree (a batch of one, in the state's own cache)."""
        if state.cache.rows != 1:
            raise ValueError("this state belongs to a batch: propose through its DraftBatch")
        return FeatureDraftBatch(self, state.cache, [state]).propose([tree_config], [scores])[0]

    def accept(self, state: FeatureDraftState, tree: Tree, path: list[int], verified, bonus: int) -> None:
        tokens = torch.tensor([tree.tokens[0, path[1:]].tolist() + [bonus]], device=tree.tokens.device)
        features = self.input_features(verified.hidden_states)[:, path]        # [1, k+1, H] (a copy)
        state.root = bonus
        state.cache.keep(state.row, state.length, [])   # drop the drafted nodes (or its batch-mates' padding)
        if state.prompt is not None:                    # nothing drafted yet: wait for the prompt's entries
            state.deferred.append((tokens, features))
            return
        self._extend_catchup(state, tokens, features)

    def _extend_catchup(self, state: FeatureDraftState, tokens: Tensor, features: Tensor) -> None:
        """Append the inputs of verified tokens [1, n] with the target's features before them [1, n, H] to the
        entries the next step catches up on."""
        context = None if state.context is None else state.context.expand(tokens.shape[1], -1)[None]
        inputs = self.text_inputs(tokens, features, context)[0]                # [k+1, X]
        if state.catchup is None:
            start = state.next_position
        else:                                   # a step without drafting: the last catch-up was not run yet
            start = state.catchup_positions[..., -1] + 1
        positions = start[..., None] + torch.arange(tokens.shape[1], device=tokens.device)
        if state.catchup is not None:
            inputs = torch.cat([state.catchup, inputs])
            positions = torch.cat([state.catchup_positions, positions], dim=-1)
        state.catchup, state.catchup_positions = inputs, positions


class FeatureDraftBatch(DraftBatch):
    """The feature-drafter states of a batch's rows, sharing one draft KV cache (row r = the batch's row r): one
    catch-up forward and one forward per drafted level (or per k levels) for all rows together."""

    def __init__(self, drafter: FeatureDrafter, cache=None, states: list[FeatureDraftState] | None = None):
        super().__init__(drafter)
        self.cache = cache if cache is not None else drafter.decoder.new_decode_cache(rows=0)
        self.states = states if states is not None else []
        self.pending = PendingNodes.empty(len(self.states))

    def add(self, state: FeatureDraftState) -> None:
        if state.length:
            raise ValueError("a draft state joins a batch before its first step")
        state.cache, state.row = self.cache, self.cache.add_empty_row()
        self.states.append(state)

    def remove(self, row: int) -> None:
        last = len(self.states) - 1
        self.cache.move_row(last, row)
        self.states[last].row = row
        super().remove(row)

    def propose(self, tree_configs: Sequence[TreeConfig | None], scores: Sequence[ChildScores]) -> list[Tree | None]:
        drafter = self.drafter
        drafting = [config is not None for config in tree_configs]
        if not any(drafting):
            return [None] * len(self.states)
        roots = self._catch_up(drafting)
        builders = [drafter.tree_builder(config, state.root) if config is not None else None
                    for state, config in zip(self.states, tree_configs)]
        self.pending = PendingNodes.empty(len(self.states), next(drafter.decoder.parameters()).device)
        return draft_trees(builders, roots, drafter.draft_logits, self._run_level, scores,
                           drafter.tokens_per_forward, drafter.head)

    def _catch_up(self, drafting: list[bool]) -> list[Tensor | None]:
        """Run the drafting rows' verified entries into their cache rows (one forward for all rows); returns each
        drafting row's last predicted feature [H] (the root's), None for the others."""
        states = self.states
        for state, go in zip(states, drafting):
            if go:
                self.drafter.ready(state)
        counts = [state.catchup.shape[0] if go else 0 for state, go in zip(states, drafting)]
        width = max(counts)
        sample = next(state.catchup for state, go in zip(states, drafting) if go)
        lengths = [state.length for state in states]
        x = sample.new_zeros(len(states), width, sample.shape[-1])                                  # [B, n, X]
        positions = torch.zeros(*sample_axes(states), len(states), width, dtype=torch.long, device=sample.device)
        for row, (state, count) in enumerate(zip(states, counts)):
            if count:
                x[row, :count] = state.catchup
                positions[..., row, :count] = state.catchup_positions
        mask = catch_up_mask(lengths, width, x.dtype, x.device)                                   # [B, 1, n, span]
        out = self.drafter.decoder(x, positions, mask, self.cache)                               # [B, n, H]
        roots: list[Tensor | None] = []
        for row, (state, count) in enumerate(zip(states, counts)):
            self.cache.keep(row, state.length, range(count))
            if not count:
                roots.append(None)
                continue
            state.forwards += 1
            state.length += count
            state.next_position = state.catchup_positions[..., -1] + 1   # the last entry is text: every axis alike
            state.catchup = state.catchup_positions = None
            roots.append(out[row, count - 1])
        return roots

    def _run_level(self, tokens: list[list[int]], features: list[Tensor | None],
                   parents: list[list[int]]) -> tuple[list[Tensor], int]:
        """Feed each row's nodes (tokens, parent features [n_r, H], parents: pending indices) as pending nodes in
        one forward, every row padded to the same count; returns predicted features per row [n_r, H]."""
        states, drafter = self.states, self.drafter
        width = max(len(row) for row in tokens)
        sample = next(feature for feature in features if feature is not None)
        device = sample.device
        token_tensor = torch.tensor([row + [0] * (width - len(row)) for row in tokens], device=device)      # [B, n]
        parent_tensor = torch.tensor([row + [-1] * (width - len(row)) for row in parents], device=device)  # [B, n]
        inputs = sample.new_zeros(len(states), width, sample.shape[-1])                             # [B, n, H]
        context = None
        if any(state.context is not None for state in states):
            context = sample.new_zeros(len(states), width, sample.shape[-1])
        for row, (state, row_tokens, row_features) in enumerate(zip(states, tokens, features)):
            if row_tokens:
                inputs[row, : len(row_tokens)] = row_features
                state.forwards += 1
            if context is not None and state.context is not None:
                context[row] = state.context
        depths = self.pending.add(token_tensor, parent_tensor)                                      # [B, n]
        mask = self.pending.attention_mask([state.length for state in states], width, inputs.dtype)
        starts = torch.stack([state.next_position if state.next_position is not None
                              else torch.zeros(sample_axes(states), dtype=torch.long, device=device)
                              for state in states], dim=-1)                                         # [B] or [3, B]
        x = drafter.text_inputs(token_tensor, inputs, context)                                      # [B, n, X]
        out = drafter.decoder(x, starts[..., None] + depths, mask, self.cache)                     # [B, n, H]
        return [out[row, : len(row_tokens)] for row, row_tokens in enumerate(tokens)], width


def sample_axes(states: Sequence[FeatureDraftState]) -> tuple[int, ...]:
    """() for 1-D positions, (3,) for M-RoPE: the leading axes of the states' positions."""
    for state in states:
        positions = state.catchup_positions if state.catchup_positions is not None else state.next_position
        if positions is not None:
            return tuple(positions.shape[:-1]) if state.catchup_positions is not None else tuple(positions.shape)
    return ()


def catch_up_mask(committed: Sequence[int], width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive mask [B, 1, width, max(committed) + width]: row b's new entry i sees row b's committed prefix
    (committed[b] entries) and its new entries up to i."""
    span = max(committed) + width
    lengths = torch.tensor(committed, device=device)                          # [B]
    column = torch.arange(span, device=device)                                # [span]
    entry = torch.arange(width, device=device)                                # [n]
    prefix = column[None, None, :] < lengths[:, None, None]                   # [B, 1, span]
    new = column[None, None, :] - lengths[:, None, None]                      # [B, 1, span]: index among new entries
    visible = prefix | ((new >= 0) & (new <= entry[None, :, None]))           # [B, n, span]
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
    return mask[:, None]
