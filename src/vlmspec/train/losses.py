"""Drafter training losses: the options (`LossConfig`) and the shared pieces every drafter's `training_loss` uses.

The contract (see `Drafter.training_loss` in `drafters/base.py`):

    loss, metrics = drafter.training_loss(batch, config)   # batch: TrainBatch, config: LossConfig
    loss.backward()

`loss` is a scalar; `metrics` maps names to floats and always holds `loss` and the per-depth draft top-1
accuracy `acc@1`, `acc@2`, … (one per unrolled step): the share of answer positions where the argmax of the draft
logits equals the argmax of the target's logits (what greedy verification accepts), with the draft running on its
own predicted features for the last d−1 positions of its chain (depth d).

Alignment of a feature drafter (EAGLE and its descendants). `batch.hidden_states[l][b, t]` is the target's state
after token t; `f_t` below is the last (post-norm) state, whose lm_head logits predict token t+1. Draft "pair" i
(i = 0 … S−2) is (feature before token i+1, token i+1), i.e. (f_i, x_{i+1}) at draft position i; its output
approximates f_{i+1}, whose logits predict x_{i+2}. Pair i is trained where `batch.loss_mask[:, i + 1]` (x_{i+2}
is an answer token). `pair_targets(batch, last_layer)` returns these shifted views.

Training-time test (`steps` = k, EAGLE-3): step 1 runs every pair on the true features; step j ≥ 2 runs every
pair again with the feature input replaced by the draft's own step-(j−1) output of the previous pair, attending
exactly as at decode time: to the true pairs up to i−j+1 and to its own chain (the step-m copies of pairs
i−j+m, m = 2 … j). All steps share one KV cache of k·n entries; `ttt_mask` builds the mask. Step j at pair i is
the draft at tree depth j, so its accuracy is `acc@j`.

Loss of one step, over the valid pairs (mean over pairs):

    feature_weight · smooth_l1(predicted, f_{i+1})
  + logit_weight   · soft_cross_entropy(lm_head(predicted), softmax(lm_head(f_{i+1})))
  + ranking_weight · ranking_loss(…, top ranking_topk of the target)            (ViSpec)

steps are weighted step_decay^(j−1) and normalised to sum 1. Options on top:

- `feature_noise` a: uniform noise U(−a, a) on the true input features of step 1 (EAGLE).
- `self_correction`: a second full pass whose inputs are the draft's own step-1 predictions (detached, shifted by
  one pair) under a causal mask, trained against the same targets (ViSpec's pass against shortcut learning:
  the draft cannot just copy the target's feature when it never sees it). Metric `acc@sc`.
- `sampled_token` (Seedream 4.0 / Hyper-Bagel): the token of each answer pair is sampled from the target's
  distribution at that position (softmax of lm_head(f_i), T = 1) instead of taken from the data; the target's
  next feature is only known when the sample equals the data token, so the other pairs (and chains through them)
  leave the loss. The effect: the draft is trained on the tokens the target itself would sample, in proportion.
- `kv_consistency_weight` (Seedream): MSE between the draft-cache keys/values of a pair computed from predicted
  features (steps ≥ 2) and from the true features (step 1, detached). Needs `steps >= 2`.

Randomness (noise, sampled tokens) comes from torch's global generator, which the trainer checkpoints.

Several processes (`train/parallel.py`): each term is a mean over this process's pairs; `step_loss` (and the KV
term) weight it by `distributed.global_share` of its pair count, so that once DDP/FSDP average the gradients over
the processes every term is its mean over the global batch's pairs, as in one process (where the weight is 1).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmspec.train.batch import TrainBatch
from vlmspec.train.distributed import global_share

# step(tokens [B, n], features [B, n, H], positions [B, n], mask [B|1, 1, n, K], cache) -> predicted [B, n, H]
StepFn = Callable[[Tensor, Tensor, Tensor, Tensor, object], Tensor]


@dataclass(frozen=True)
class LossConfig:
    """Loss options of drafter training (`vlmspec train --loss key=value,…`). Validated on construction."""

    feature_weight: float = 1.0          # smooth-L1 regression of the next target feature
    logit_weight: float = 0.1            # soft cross-entropy against the target's logits
    steps: int = 1                       # training-time test: unrolled draft steps on its own features (EAGLE-3)
    step_decay: float = 0.8              # weight of step j ∝ step_decay^(j-1)
    feature_noise: float = 0.0           # U(-a, a) noise on the true input features (EAGLE)
    ranking_weight: float = 0.0          # ViSpec top-k ranking loss
    ranking_topk: int = 5                # k of the ranking loss
    self_correction: bool = False        # ViSpec second pass on the draft's own predictions
    sampled_token: bool = False          # Seedream: condition on a token sampled from the target
    kv_consistency_weight: float = 0.0   # Seedream KV-consistency loss (needs steps >= 2)

    def __post_init__(self) -> None:
        for name in ("feature_weight", "logit_weight", "feature_noise", "ranking_weight", "kv_consistency_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"loss option {name} must be a number >= 0, got {value!r}")
        for name in ("steps", "ranking_topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"loss option {name} must be an integer >= 1, got {value!r}")
        if not 0 < self.step_decay <= 1:
            raise ValueError(f"loss option step_decay must be in (0, 1], got {self.step_decay!r}")
        if self.kv_consistency_weight > 0 and self.steps < 2:
            raise ValueError("loss option kv_consistency_weight needs steps >= 2 (it compares unrolled steps "
                             "with the first)")
        if self.feature_weight == 0 and self.logit_weight == 0 and self.ranking_weight == 0:
            raise ValueError("all loss weights are 0: nothing to train")

    @classmethod
    def parse(cls, text: str | None, base: "LossConfig | None" = None) -> "LossConfig":
        """`key=value,…` (e.g. `steps=3,logit_weight=0.5,self_correction=true`) on top of `base`."""
        base = base or cls()
        if not text:
            return base
        kinds = {f.name: type(getattr(base, f.name)) for f in fields(cls)}
        changes: dict[str, object] = {}
        for item in text.split(","):
            if not item.strip():
                continue
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in kinds:
                raise ValueError(f"bad loss option {item!r}; expected key=value with key in {', '.join(kinds)}")
            kind = kinds[key]
            try:
                if kind is bool:
                    if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(value)
                    changes[key] = value.strip().lower() in ("true", "1", "yes")
                else:
                    changes[key] = kind(value)
            except ValueError:
                raise ValueError(f"loss option {key} expects a {kind.__name__}, got {value!r}") from None
        return replace(base, **changes)


# ---------------------------------------------------------------------------------------------- alignment
@dataclass
class PairTargets:
    """Shifted views of a batch for a feature drafter; n = S − 1 pairs (see the module docstring)."""

    tokens: Tensor          # [B, n] long: x_{i+1}
    positions: Tensor       # [B, n] long: draft positions 0 … n−1
    valid: Tensor           # [B, n] bool: pair i is trained (x_{i+2} is an answer token)
    next_features: Tensor   # [B, n, H]: f_{i+1}, the target's last state after token i+1
    answer_input: Tensor    # [B, n] bool: x_{i+1} is itself an answer token (sampled_token may replace it)
    last_features: Tensor   # [B, n, H]: f_i, whose lm_head logits are the target's distribution of x_{i+1}


def pair_targets(batch: TrainBatch, last_layer: int) -> PairTargets:
    """The pair view of `batch`; `last_layer` = the target's `num_layers` (its post-norm state)."""
    ids = batch.input_ids                                                         # [B, S]
    if ids.shape[1] < 2:
        raise ValueError("training sequences need at least 2 tokens")
    count = ids.shape[1] - 1
    positions = torch.arange(count, device=ids.device).expand(ids.shape[0], -1)
    return PairTargets(tokens=ids[:, 1:], positions=positions,
                       valid=batch.loss_mask[:, 1:] & batch.attention_mask[:, 1:],
                       next_features=batch.hidden_states[last_layer][:, 1:],
                       answer_input=batch.loss_mask[:, :-1] & batch.attention_mask[:, 1:],
                       last_features=batch.hidden_states[last_layer][:, :-1])


# ---------------------------------------------------------------------------------------------- loss terms
def smooth_l1(predicted: Tensor, target: Tensor) -> Tensor:
    """[N, H], [N, H] → scalar, the elementwise mean (as EAGLE)."""
    return F.smooth_l1_loss(predicted.float(), target.float())


def soft_cross_entropy(draft_logits: Tensor, target_logits: Tensor) -> Tensor:
    """[N, V], [N, V] → scalar: E_target[−log draft] averaged over N (target side detached)."""
    target_probs = target_logits.detach().float().softmax(-1)
    return -(target_probs * draft_logits.float().log_softmax(-1)).sum(-1).mean()


def ranking_loss(draft_logits: Tensor, target_logits: Tensor, k: int) -> Tensor:
    """Plackett–Luce (ListMLE) loss of the target's top-k order under the draft logits, over the whole vocabulary.

    For the target's top tokens t_1 … t_k: −Σ_a [d(t_a) − logsumexp(d over V minus {t_1 … t_{a−1}})], / k.
    [N, V], [N, V] → scalar."""
    k = min(k, target_logits.shape[-1])
    draft = draft_logits.float()
    top = target_logits.detach().topk(k, dim=-1).indices                       # [N, k]
    chosen = draft.gather(-1, top)                                             # [N, k]
    excluded = torch.zeros_like(draft, dtype=torch.bool)
    total = draft.new_zeros(())
    for a in range(k):
        denominator = draft.masked_fill(excluded, float("-inf")).logsumexp(-1)  # [N]
        total = total + (denominator - chosen[:, a]).mean()
        excluded = excluded.scatter(-1, top[:, a : a + 1], True)   # a new mask: the old one is saved for backward
    return total / k


def top1_accuracy(draft_logits: Tensor, target_logits: Tensor) -> float:
    if draft_logits.shape[0] == 0:
        return 0.0
    return float((draft_logits.argmax(-1) == target_logits.argmax(-1)).float().mean())


def step_loss(predicted: Tensor, next_features: Tensor, logits_fn: Callable[[Tensor], Tensor],
              config: LossConfig, target_logits_fn: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, float]:
    """Loss of one step on selected pairs: predicted, next_features [N, H] → (scalar, top-1 accuracy).
    `target_logits_fn` maps the target's features to its logits (default: `logits_fn`, the shared lm_head).
    Under several processes the loss is this process's part of the global mean (see the module docstring)."""
    share = global_share(predicted.shape[0])         # first: every rank reduces every term's count, even none
    draft_logits = logits_fn(predicted)                                        # [N, V]
    with torch.no_grad():
        target_logits = (target_logits_fn or logits_fn)(next_features.to(predicted.dtype))   # [N, V]
    loss = predicted.new_zeros((), dtype=torch.float32)
    if predicted.shape[0] == 0:
        return loss + 0.0 * predicted.sum(), 0.0
    if config.feature_weight:
        loss = loss + config.feature_weight * smooth_l1(predicted, next_features)
    if config.logit_weight:
        loss = loss + config.logit_weight * soft_cross_entropy(draft_logits, target_logits)
    if config.ranking_weight:
        loss = loss + config.ranking_weight * ranking_loss(draft_logits, target_logits, config.ranking_topk)
    loss = loss * share
    return loss, top1_accuracy(draft_logits.detach(), target_logits)


# ---------------------------------------------------------------------------------------------- unrolling
def ttt_mask(count: int, step: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """Additive mask [1, 1, n, step·n] for the queries of step `step` (1-based) over the keys of steps 1 … step.

    Query pair i at step j sees step-1 keys i' ≤ i − j + 1 (true features) and, for m = 2 … j, the step-m key
    i' = i − j + m (its own chain). Step 1 is the plain causal mask."""
    query = torch.arange(count, device=device)[:, None]                       # [n, 1]
    key = torch.arange(count, device=device)[None, :]                         # [1, n]
    blocks = [key <= query - step + 1]
    blocks += [key == query - step + m for m in range(2, step + 1)]
    allowed = torch.cat(blocks, dim=1)                                        # [n, step·n]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def shift_features(predicted: Tensor, first: Tensor, keep: Tensor | None = None) -> Tensor:
    """Inputs of the next step: pair i gets the prediction of pair i−1 (pair 0 keeps `first`'s row 0).
    `keep` [B, n] bool marks pairs whose input stays `first` (e.g. image positions fed true visual features)."""
    shifted = torch.cat([first[:, :1], predicted[:, :-1]], dim=1)            # [B, n, H]
    if keep is not None:
        shifted = torch.where(keep[..., None], first, shifted)
    return shifted


def chain_valid(valid: Tensor, step: int) -> Tensor:
    """[B, n] → pairs whose step-`step` chain exists (i ≥ step − 1) and is valid at every pair of the chain."""
    out = valid.clone()
    for back in range(1, step):
        out[:, back:] &= valid[:, :-back]
        out[:, :back] = False
    return out


def cache_kv(cache) -> list[tuple[Tensor, Tensor]]:
    """(keys, values) [B, heads, L, d] of every layer of an HF dynamic cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def unrolled_loss(step: StepFn, new_cache: Callable[[], object], logits_fn: Callable[[Tensor], Tensor],
                  pairs: PairTargets, features: Tensor, config: LossConfig,
                  keep: Tensor | None = None,
                  target_logits_fn: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
    """The whole loss of a feature drafter whose one forward is `step` (e.g. `EagleDrafter.forward`).

    `features` [B, n, H] are the true input features of the pairs (what decode feeds for verified pairs);
    `logits_fn` maps predicted features to draft logits (the target's lm_head); `keep` marks pairs whose input
    feature is never replaced by a prediction; `target_logits_fn` maps the target's features to its logits where
    the draft has an lm_head of its own (default: `logits_fn`). Applies every `LossConfig` option; returns
    (loss, metrics)."""
    target_logits_fn = target_logits_fn or logits_fn
    tokens, valid = pairs.tokens, pairs.valid
    if config.feature_noise:
        features = features + (torch.rand_like(features) * 2 - 1) * config.feature_noise
    if config.sampled_token:
        tokens, valid = _sampled_tokens(pairs, target_logits_fn)
    count = tokens.shape[1]
    cache = new_cache()
    weights = [config.step_decay ** j for j in range(config.steps)]
    total_weight = sum(weights)
    loss = features.new_zeros((), dtype=torch.float32)
    metrics: dict[str, float] = {}
    inputs, first_predicted = features, None
    for j in range(1, config.steps + 1):
        mask = ttt_mask(count, j, features.dtype, features.device)
        predicted = step(tokens, inputs, pairs.positions, mask, cache)        # [B, n, H]
        if j == 1:
            first_predicted = predicted
        selected = chain_valid(valid, j)                                      # [B, n]
        term, accuracy = step_loss(predicted[selected], pairs.next_features[selected].to(predicted.dtype),
                                   logits_fn, config, target_logits_fn)
        loss = loss + weights[j - 1] / total_weight * term
        metrics[f"acc@{j}"] = accuracy
        if j > 1 and config.kv_consistency_weight:
            kv = kv_consistency(cache, count, j, selected)
            loss = loss + config.kv_consistency_weight * global_share(int(selected.sum())) * kv
            metrics[f"kv@{j}"] = float(kv.detach())
        inputs = shift_features(predicted, features, keep)
    if config.self_correction:
        second = shift_features(first_predicted.detach(), features, keep)
        mask = ttt_mask(count, 1, features.dtype, features.device)
        predicted = step(tokens, second, pairs.positions, mask, new_cache())
        term, accuracy = step_loss(predicted[valid], pairs.next_features[valid].to(predicted.dtype), logits_fn,
                                   config, target_logits_fn)
        loss = loss + term
        metrics["acc@sc"] = accuracy
    metrics["loss"] = float(loss.detach())
    metrics["pairs"] = float(valid.sum())
    return loss, metrics


def kv_consistency(cache, count: int, step: int, selected: Tensor) -> Tensor:
    """MSE between the step-`step` block of the draft cache and the step-1 block (detached) at `selected` pairs."""
    total = None
    for keys, values in cache_kv(cache):
        for tensor in (keys, values):                                          # [B, heads, step·n, d]
            first = tensor[:, :, :count].detach().transpose(1, 2)              # [B, n, heads, d]
            current = tensor[:, :, (step - 1) * count : step * count].transpose(1, 2)
            term = F.mse_loss(current[selected].float(), first[selected].float()) if selected.any() \
                else tensor.new_zeros((), dtype=torch.float32)
            total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def _sampled_tokens(pairs: PairTargets, logits_fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Replace answer-pair tokens by samples of the target's distribution (softmax lm_head(f_i)); pairs whose
    sample differs from the data token lose their (unknown) target."""
    tokens = pairs.tokens.clone()
    where = pairs.answer_input                                                # [B, n]
    if where.any():
        with torch.no_grad():
            probs = logits_fn(pairs.last_features[where]).float().softmax(-1)  # [N, V]
        tokens[where] = torch.multinomial(probs, 1).squeeze(-1)
    valid = pairs.valid & (tokens == pairs.tokens)
    return tokens, valid
