"""EAGLE-3: the draft's feature input fuses a low, a mid and a high target layer (one linear map of their
concatenation, each layer RMS-normalised first) instead of the last state alone, and it is trained with a
training-time test: several unrolled steps on its own predicted features (`LossConfig.steps`), mostly by
cross-entropy on the logits, so its output space is free to differ from the target's last state.

Decoding is EAGLE-2's (`EagleDrafter`): verified pairs carry the fused true features, drafted nodes carry the
draft's own output (which the unrolled training taught it to consume).

Two layouts of the draft layer:
- `fc` (the default, what the shipped drafters use): `fc([embedding ; fused feature])` → a standard decoder layer
  → final norm; each fused layer is RMS-normalised before the fusion.
- `speculators`: EAGLE-3 as vLLM and SGLang run it and the `speculators` format stores it: the fusion reads the raw
  target states, the layer's attention reads `[norm(embedding) ; norm(hidden)]` 2H-wide (`Eagle3Decoder`), the
  fed-back feature is the pre-norm state, and the draft has its own lm_head over a draft vocabulary of
  `draft_vocab` target tokens (0: all of them). Only this layout exports (`vlmspec export`, to vLLM or SGLang);
  it trains by cross-entropy on the logits alone (its features are not the target's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from vlmspec.drafters.base import register_drafter
from vlmspec.drafters.eagle import EagleDrafter
from vlmspec.drafters.eagle3_layer import Eagle3Decoder
from vlmspec.drafters.layers import draft_layer_config

LAYOUTS = ("fc", "speculators")


@dataclass(frozen=True)
class Eagle3Config:
    layers: tuple[int, ...] = ()   # target hidden-state indices to fuse (0 = input embeddings); (): low/mid/high
    num_heads: int = 0             # 0: the target's
    intermediate_size: int = 0     # 0: the target's
    layout: str = "fc"             # "fc" or "speculators" (see the module docstring)
    num_kv_heads: int = 0          # speculators layout: key/value heads (0: num_heads)
    norm_before_residual: bool = False   # speculators layout: the residual starts from the normalised hidden input
    draft_vocab: int = 0           # speculators layout: draft vocabulary size (0: the target's whole vocabulary)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", parse_layers(self.layers))
        if self.layout not in LAYOUTS:
            raise ValueError(f"eagle3 layout must be one of {', '.join(LAYOUTS)}; got {self.layout!r}")
        if self.draft_vocab < 0 or self.num_kv_heads < 0:
            raise ValueError("eagle3 draft_vocab and num_kv_heads must be >= 0")
        if self.layout == "fc" and (self.draft_vocab or self.norm_before_residual or self.num_kv_heads):
            raise ValueError("eagle3 options draft_vocab, norm_before_residual and num_kv_heads need "
                             "layout=speculators")


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

    def __init__(self, target, config: Eagle3Config):
        super().__init__(target, config)
        if config.layout == "speculators":
            self._use_speculators_layout(target, config)

    def _use_speculators_layout(self, target, config: Eagle3Config) -> None:
        """Swap the fc layout's parts for EAGLE-3's: no per-layer norms and no fc over [embedding ; feature]."""
        del self.fc, self.layer_norms
        hidden, vocab = target.hidden_size, config.draft_vocab or target.vocab_size
        if vocab > target.vocab_size:
            raise ValueError(f"draft_vocab {vocab} is larger than the target's vocabulary ({target.vocab_size})")
        layer_config = draft_layer_config(target.text_config, config.num_heads, config.intermediate_size)
        heads = layer_config.num_attention_heads
        if heads % (config.num_kv_heads or heads):
            raise ValueError(f"{heads} attention heads are not divisible by num_kv_heads={config.num_kv_heads}")
        layer_config.num_key_value_heads = config.num_kv_heads or heads
        self.decoder = Eagle3Decoder(layer_config, config.norm_before_residual)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        # draft id → target id; the first `vocab` ids until a frequency count or an imported d2t sets them
        self.register_buffer("draft_ids", torch.arange(vocab))
        with torch.no_grad():
            self.lm_head.weight.copy_(target.lm_head.weight[:vocab].float())

    @property
    def speculators_layout(self) -> bool:
        return self.config.layout == "speculators"

    def set_draft_vocabulary(self, token_ids: Tensor) -> None:
        """Make `token_ids` (target ids, sorted) the draft vocabulary; the lm_head restarts from their target rows."""
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).sort().values
        if not self.speculators_layout or token_ids.shape != self.draft_ids.shape:
            raise ValueError(f"a draft vocabulary of {token_ids.numel()} tokens needs layout=speculators with "
                             f"draft_vocab={token_ids.numel()}")
        if token_ids.unique().numel() != token_ids.numel() or not 0 <= int(token_ids[0]) <= int(token_ids[-1]) \
                < self.target.vocab_size:
            raise ValueError("draft vocabulary ids must be distinct target token ids")
        self.draft_ids.copy_(token_ids.to(self.draft_ids.device))
        with torch.no_grad():
            rows = self.target.lm_head.weight[token_ids.to(self.target.device)]
            self.lm_head.weight.copy_(rows.to(self.lm_head.weight))

    def prepare_training(self, data) -> None:
        """A reduced draft vocabulary becomes the most frequent answer tokens of the training data (ties: lower
        id first), as speculators and SpecForge choose theirs."""
        if not self.speculators_layout or self.draft_ids.numel() == self.target.vocab_size:
            return
        counts = data.answer_token_counts(self.target.vocab_size)
        order = sorted(range(len(counts)), key=lambda token: (-int(counts[token]), token))
        self.set_draft_vocabulary(torch.tensor(order[: self.draft_ids.numel()]))

    def input_features(self, hidden_states: Sequence[Tensor] | dict[int, Tensor]) -> Tensor:
        if not self.speculators_layout:
            return super().input_features(hidden_states)
        dtype = self.fuse.weight.dtype
        return self.fuse(torch.cat([hidden_states[layer].to(dtype) for layer in self.layers], dim=-1))  # [..., S, H]

    def text_inputs(self, tokens: Tensor, features: Tensor, context: Tensor | None) -> Tensor:
        """Speculators layout: the layer's input is [embedding ; feature] itself, [B, n, 2H] (`Eagle3Decoder`)."""
        if not self.speculators_layout:
            return super().text_inputs(tokens, features, context)
        return torch.cat([self.target.embed_tokens(tokens).to(features.dtype), features], dim=-1)

    def vocab_logits(self, features: Tensor) -> Tensor:
        """Speculators layout: pre-norm features [..., H] → logits over the draft vocabulary [..., draft_vocab]."""
        return self.lm_head(self.decoder.norm(features)).float()

    def draft_logits(self, features: Tensor) -> Tensor:
        if not self.speculators_layout:
            return super().draft_logits(features)
        logits = self.vocab_logits(features)                                   # [..., Vd]
        if logits.shape[-1] == self.target.vocab_size:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.target.vocab_size), float("-inf"))
        full[..., self.draft_ids] = logits                                      # [..., V]: -inf off the draft vocab
        return full

    def target_vocab_logits(self, features: Tensor) -> Tensor:
        """The target's logits of its last (post-norm) states [..., H], restricted to the draft vocabulary."""
        logits = self.target.lm_head(features).float()                          # [..., V]
        return logits if logits.shape[-1] == self.draft_ids.numel() else logits[..., self.draft_ids]

    def default_loss_config(self):
        from vlmspec.train.losses import LossConfig

        if self.speculators_layout:
            return LossConfig(steps=3, feature_weight=0.0, logit_weight=1.0)
        return LossConfig(steps=3, feature_weight=0.1, logit_weight=1.0)

    def training_loss(self, batch, config) -> tuple[Tensor, dict[str, float]]:
        from vlmspec.train.losses import pair_targets, unrolled_loss

        if not self.speculators_layout:
            return super().training_loss(batch, config)
        if config.feature_weight:
            raise ValueError("eagle3 layout=speculators feeds back its own pre-norm states, not the target's "
                             "features: train it with feature_weight=0 (its default)")
        if config.sampled_token and self.draft_ids.numel() != self.target.vocab_size:
            raise ValueError("sampled_token is not available with a reduced draft vocabulary")
        pairs = pair_targets(batch, self.target.num_layers)
        features = self.input_features(batch.hidden_states)[:, :-1]           # [B, n, H]: fused f_i of pair i
        return unrolled_loss(self, self.decoder.new_cache, self.vocab_logits, pairs, features, config,
                             target_logits_fn=self.target_vocab_logits)
