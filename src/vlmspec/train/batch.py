"""What drafter training consumes: collected target features for a batch of sequences."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TrainBatch:
    """A right-padded batch of collected sequences (see `train/collect.py`).

    Alignment: `hidden_states[l][b, t]` is the target's layer-`l` state after token t (index 0 = the input
    embeddings, projected visual embeddings included; `num_layers` = the last, post-norm: lm_head of it gives
    the target's logits for token t+1)."""

    input_ids: Tensor                       # [B, S] long
    attention_mask: Tensor                  # [B, S] bool: real (non-padding) tokens
    loss_mask: Tensor                       # [B, S] bool: t where token t+1 is an answer token to predict
    hidden_states: dict[int, Tensor]        # layer → [B, S, H]
    image_mask: Tensor                      # [B, S] bool: positions holding visual embeddings
    image_spans: list[list[tuple[int, int]]]  # per sequence: [start, end) of each run of image tokens
    positions: Tensor                       # [B, S] ([3, B, S] for M-RoPE targets)

    @classmethod
    def from_prefill(cls, prefill, layers, loss_mask: Tensor | None = None) -> "TrainBatch":
        """A batch from a target prefill over a whole sequence (`Target.prefill` output); `loss_mask` [B, S]
        defaults to every position but the last."""
        ids = prefill.input_ids
        if loss_mask is None:
            loss_mask = torch.ones_like(ids, dtype=torch.bool)
            loss_mask[:, -1] = False
        return cls(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool), loss_mask=loss_mask,
                   hidden_states={layer: prefill.hidden_states[layer] for layer in layers},
                   image_mask=prefill.image_mask, image_spans=prefill.image_spans, positions=prefill.positions)
