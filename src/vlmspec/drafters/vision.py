"""Shared machinery of the image-aware feature drafters (`msd`, `vispec`, `flash`).

All three are EAGLE-style: draft input "pair" i is (token x_{i+1}, the target's feature f_i before it) at the
target's position of x_{i+1}; the draft's output approximates f_{i+1}, whose lm_head logits predict x_{i+2}.
They differ only in what the draft sees at image tokens:

- a design may give image pairs a **fixed input** that does not depend on the (token, feature) pair (msd: the
  target's projected visual embedding through the draft's own projection), and
- a design may **compress** each run of image pairs (one run per image; Idefics3 may give one run per tile) to a
  few entries (vispec: learned queries over the visual embeddings; flash: latent-aware pooling) — the draft's KV
  cache then holds fewer entries than the target's, so every entry carries an explicit position;
- a design may add a **context** term to every text pair (vispec: the gated global image vector).

`Layout` is that bookkeeping as a value: for every draft entry, the pair it stands for (-1 for a compressed
visual entry or padding) and its position. The same layout code builds the decode-time prompt (batch 1) and the
training batch, so training and inference feed the draft exactly the same entries.

Positions: an entry's position is the target's position of its token, in the target's form: `[B, n]`, or for
Qwen2-VL / Qwen2.5-VL the 3-axis M-RoPE `[3, B, n]` (temporal, height, width; an image's tokens lie on its grid),
which the draft layer rotates as the target does (`layers.DraftDecoder`). Compressed entries take the positions
(every axis) of pairs spread evenly over their run: query j of q gets the position of the run's pair
`start + (j * length) // q` (the first query sits at the run's start). Decode-time entries (verified tokens and
tree nodes) are text: they continue from the position after the last committed entry, every axis alike — for
M-RoPE exactly the target's own `length + rope_delta` (`target/qwen2_vl.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmspec.drafters.feature import FeatureDrafter
from vlmspec.target.base import image_spans


# ---------------------------------------------------------------------------------------------- modules
def rms_norm(hidden: int, eps: float = 1e-6) -> nn.Module:
    """transformers' Llama RMSNorm (computes in fp32 and casts back: safe under bf16 autocast)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm(hidden, eps=eps)


class AttentionPool(nn.Module):
    """Learned queries cross-attend to a set of tokens: tokens [N, L, H] (valid [N, L]) → [N, Q, H].

    Used to compress one image's visual tokens to Q entries (vispec, flash) and, with Q = 1, as the attention
    pooling of a global image vector (vispec)."""

    def __init__(self, hidden: int, num_queries: int, num_heads: int):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.queries = nn.Parameter(torch.randn(num_queries, hidden) * hidden ** -0.5)
        self.norm = rms_norm(hidden)
        self.key = nn.Linear(hidden, hidden, bias=False)
        self.value = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)

    def forward(self, tokens: Tensor, valid: Tensor | None = None) -> Tensor:
        count, length, hidden = tokens.shape
        heads, queries = self.num_heads, self.queries.shape[0]
        x = self.norm(tokens)
        split = lambda t: t.view(count, -1, heads, hidden // heads).transpose(1, 2)  # noqa: E731  [N, h, *, d]
        query = split(self.queries.to(x.dtype)[None].expand(count, -1, -1))   # [N, h, Q, d]
        mask = valid[:, None, None, :] if valid is not None else None          # [N, 1, 1, L]
        pooled = F.scaled_dot_product_attention(query, split(self.key(x)), split(self.value(x)), attn_mask=mask)
        return self.out(pooled.transpose(1, 2).reshape(count, queries, hidden))  # [N, Q, H]


class GatedContext(nn.Module):
    """x + gate ⊙ W·context, with the gate initialised to zero: at initialisation the text input is unchanged
    (and a sequence without images, context 0, is unchanged forever: W has no bias)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.gate = nn.Parameter(torch.zeros(hidden))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        return x + self.gate.to(x.dtype) * self.proj(context.to(x.dtype))


# ---------------------------------------------------------------------------------------------- pair view
@dataclass
class Pairs:
    """Pair view of B sequences (n pairs each): pair i = (x_{i+1}, f_i)."""

    tokens: Tensor       # [B, n] long: x_{i+1}
    features: Tensor     # [B, n, H]: f_i, the target's feature before x_{i+1}
    visual: Tensor       # [B, n, H]: hidden_states[0] at x_{i+1} (the projected visual embedding at image tokens)
    image_mask: Tensor   # [B, n] bool: x_{i+1} is an image token
    positions: Tensor    # [B, n] ([3, B, n] for M-RoPE) long: the target's position of x_{i+1}
    real: Tensor         # [B, n] bool: not padding


def prompt_pairs(drafter: "VisualFeatureDrafter", prefill, first_token: int) -> Pairs:
    """Pairs of a prefilled prompt (batch 1) followed by the first emitted token."""
    first = torch.tensor([[first_token]], device=prefill.input_ids.device)
    tokens = torch.cat([prefill.input_ids[:, 1:], first], dim=1)              # [1, S]
    features = drafter.input_features(prefill.hidden_states)                  # [1, S, H]
    first_embedding = drafter.target.embed_tokens(first).to(features.dtype)   # [1, 1, H]
    visual = torch.cat([prefill.hidden_states[0][:, 1:].to(features.dtype), first_embedding], dim=1)
    image_mask = torch.cat([prefill.image_mask[:, 1:], torch.zeros_like(first, dtype=torch.bool)], dim=1)
    positions = prefill.positions                                             # [1, S] or [3, 1, S]
    positions = torch.cat([positions[..., 1:], positions[..., -1:] + 1], dim=-1)   # the first token follows text
    return Pairs(tokens, features, visual, image_mask, positions, torch.ones_like(image_mask))


def batch_pairs(drafter: "VisualFeatureDrafter", batch) -> Pairs:
    """Pairs of a right-padded `TrainBatch` (n = S − 1)."""
    features = drafter.input_features(batch.hidden_states)
    real = batch.attention_mask[:, 1:].bool()
    return Pairs(tokens=batch.input_ids[:, 1:], features=features[:, :-1],
                 visual=batch.hidden_states[0][:, 1:].to(features.dtype),
                 image_mask=batch.image_mask[:, 1:].bool() & real,
                 positions=batch.positions[..., 1:], real=real)


@dataclass
class Layout:
    """Draft entries of B sequences, M entries each (right-padded)."""

    index: Tensor      # [B, M] long: the pair each entry stands for; -1: a compressed visual entry or padding
    positions: Tensor  # [B, M] ([3, B, M] for M-RoPE) long
    real: Tensor       # [B, M] bool: not padding
    runs: list[list[tuple[int, int, int]]] = field(default_factory=list)  # per sequence: (pair start, end, first
                                                                          # entry) of each image run

    @property
    def compressed(self) -> Tensor:
        """[B, M] bool: entries standing for a compressed visual run."""
        return self.real & (self.index < 0)

    def gather(self, pair_tensor: Tensor) -> Tensor:
        """A pair-space tensor [B, n, ...] → entry space [B, M, ...] (compressed/padding entries: row 0's value)."""
        index = self.index.clamp(min=0)
        if pair_tensor.dim() == 3:
            index = index[..., None].expand(-1, -1, pair_tensor.shape[-1])
        return pair_tensor.gather(1, index)


def build_layout(pairs: Pairs, slots_per_run: int | None) -> Layout:
    """One entry per pair, except that (with `slots_per_run`) each run of image pairs becomes that many entries."""
    batch, _ = pairs.tokens.shape
    device = pairs.tokens.device
    if slots_per_run is None:
        index = torch.arange(pairs.tokens.shape[1], device=device).expand(batch, -1)
        index = torch.where(pairs.real, index, torch.full_like(index, -1))
        runs = [[(start, end, start) for start, end in spans] for spans in image_spans(pairs.image_mask)]
        return Layout(index, pairs.positions, pairs.real.clone(), runs)
    rows: list[tuple[list[int], list[int]]] = []     # per sequence: each entry's pair, the pair of its position
    runs_all = []
    lengths = pairs.real.sum(1).tolist()
    for b, spans in enumerate(image_spans(pairs.image_mask)):
        index, source, runs = [], [], []
        cursor = 0
        for start, end in spans + [(lengths[b], lengths[b])]:
            index += range(cursor, start)
            source += range(cursor, start)
            if end > start:
                runs.append((start, end, len(index)))
                length = end - start
                index += [-1] * slots_per_run
                source += [start + (j * length) // slots_per_run for j in range(slots_per_run)]
            cursor = end
        rows.append((index, source))
        runs_all.append(runs)
    width = max(len(index) for index, _ in rows)
    index = torch.full((batch, width), -1, dtype=torch.long)
    source = torch.zeros((batch, width), dtype=torch.long)
    real = torch.zeros((batch, width), dtype=torch.bool)
    for b, (row_index, row_source) in enumerate(rows):
        index[b, : len(row_index)] = torch.tensor(row_index, dtype=torch.long)
        source[b, : len(row_source)] = torch.tensor(row_source, dtype=torch.long)
        real[b, : len(row_index)] = True
    source, real = source.to(device), real.to(device)
    axes = pairs.positions.shape[:-2]                                          # () or (3,)
    positions = pairs.positions.gather(-1, source.expand(*axes, -1, -1)).masked_fill(~real, 0)
    return Layout(index.to(device), positions, real, runs_all)


def gather_runs(values: Tensor, layout: Layout) -> tuple[Tensor, Tensor, list[tuple[int, int, int, int]]]:
    """Pair-space values [B, n, H] of every compressed image run of the layout, right-padded: [R, L, H],
    valid [R, L], and each run's (sequence, pair start, pair end, first entry slot)."""
    runs = [(b, start, end, slot) for b, row in enumerate(layout.runs) for start, end, slot in row]
    width = max((end - start for _, start, end, _ in runs), default=0)
    tokens = values.new_zeros(len(runs), width, values.shape[-1])
    valid = torch.zeros(len(runs), width, dtype=torch.bool, device=values.device)
    for r, (b, start, end, _) in enumerate(runs):
        tokens[r, : end - start] = values[b, start:end]
        valid[r, : end - start] = True
    return tokens, valid, runs


def place_runs(compressed: Tensor, runs: list[tuple[int, int, int, int]], layout: Layout) -> tuple[Tensor, Tensor]:
    """Compressed runs [R, q, H] → fixed entry inputs [B, M, H] (zero elsewhere) and where [B, M] bool."""
    fixed = compressed.new_zeros(*layout.index.shape, compressed.shape[-1])
    for r, (b, _, _, slot) in enumerate(runs):
        fixed[b, slot: slot + compressed.shape[1]] = compressed[r]
    return fixed, layout.compressed


# ---------------------------------------------------------------------------------------------- the drafter
class VisualFeatureDrafter(FeatureDrafter):
    """Base of msd / vispec / flash: `feature.FeatureDrafter` at the target's own (M-RoPE) positions, whose prompt
    entries follow a `Layout`; subclasses define `slots_per_run`, `fixed_inputs` and `pair_context` (see the
    module docstring)."""

    slots_per_run: int | None = None             # entries per image run (None: no compression); set per instance

    def __init__(self, target, config):
        super().__init__(target, config, mrope=True)
        self.resolve_layer(config.feature_layer)

    def feature_layers(self) -> list[int]:
        return sorted({0, self.resolve_layer(self.config.feature_layer), self.target.num_layers})

    def fixed_inputs(self, pairs: Pairs, layout: Layout) -> tuple[Tensor, Tensor] | None:
        """Inputs [B, M, H] of entries that do not depend on (token, feature), and where [B, M] bool."""
        return None

    def pair_context(self, pairs: Pairs, layout: Layout) -> tuple[Tensor | None, Tensor | None]:
        """(context of every entry [B, M, H], context of decode-time pairs [B, H]); None when unused."""
        return None, None

    def entry_inputs(self, pairs: Pairs, layout: Layout):
        """The draft inputs of this layout's entries as a function inputs(tokens [B, M], features [B, M, H]) →
        [B, M, H] of the entries' (token, feature) pairs, with the fixed entries and the context bound in; and
        keep [B, M]: entries whose input never depends on the pair (fixed or padding)."""
        fixed = self.fixed_inputs(pairs, layout)
        context, _ = self.pair_context(pairs, layout)

        def inputs(tokens: Tensor, features: Tensor) -> Tensor:
            x = self.text_inputs(tokens, features, context)                    # [B, M, H]
            if fixed is not None:
                x = torch.where(fixed[1][..., None], fixed[0].to(x.dtype), x)
            return x

        keep = fixed[1] if fixed is not None else torch.zeros_like(layout.real)
        return inputs, keep | ~layout.real

    def entry_step(self, pairs: Pairs, layout: Layout):
        """The draft forward over this layout's entries as step(tokens, features, positions, mask, cache) (what
        `train.losses.unrolled_loss` drives), and keep (see `entry_inputs`)."""
        inputs, keep = self.entry_inputs(pairs, layout)

        def step(tokens, features, positions, mask, cache):
            return self.decoder(inputs(tokens, features), positions, mask, cache)

        return step, keep

    # ------------------------------------------------------------------ decoding
    def prompt_entries(self, prefill, first_token: int) -> tuple[Tensor, Tensor, Tensor | None]:
        pairs = prompt_pairs(self, prefill, first_token)
        layout = build_layout(pairs, self.slots_per_run)
        _, decode_context = self.pair_context(pairs, layout)
        inputs = self.entry_inputs(pairs, layout)[0](layout.gather(pairs.tokens), layout.gather(pairs.features))
        return inputs[0], layout.positions[..., 0, :], None if decode_context is None else decode_context[0]

    # ------------------------------------------------------------------ training
    def training_loss(self, batch, config):
        from vlmspec.train.losses import unrolled_loss

        pairs = batch_pairs(self, batch)
        layout = build_layout(pairs, self.slots_per_run)
        targets = self.entry_targets(batch, layout)
        step, keep = self.entry_step(pairs, layout)
        return unrolled_loss(step, self.decoder.new_cache, self.draft_logits, targets,
                             layout.gather(pairs.features), config, keep=keep)

    def entry_targets(self, batch, layout: Layout):
        """`train.losses.PairTargets` in entry space: compressed and padding entries are never trained."""
        from vlmspec.train.losses import pair_targets

        targets = pair_targets(batch, self.target.num_layers)
        text = layout.index >= 0
        return replace(targets, tokens=layout.gather(targets.tokens), positions=layout.positions,
                       valid=layout.gather(targets.valid) & text,
                       next_features=layout.gather(targets.next_features),
                       answer_input=layout.gather(targets.answer_input) & text,
                       last_features=layout.gather(targets.last_features))
