"""Verification of a draft tree against the target's logits: greedy and lossless sampling. Pure tensor code.

Definitions (one verify step, per sequence b):

- `target_logits[b, i]`: the target's logits for the token AFTER node i (computed in the verify pass).
- **accepted**: the draft tokens the target keeps: a root-to-node path of the tree, root excluded; node i's child
  can only be accepted once i is.
- **bonus**: the token the target itself emits after the accepted path (always exactly one): the argmax (greedy)
  or a sample of the residual distribution (sampling) at the deepest accepted node.
- Emitted tokens of the step = accepted tokens then the bonus. Lossless: each is the argmax / an exact sample of
  the target's (warped) distribution given everything emitted before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vlmspec.tree import Tree


@dataclass(frozen=True)
class SamplingConfig:
    """Target sampling settings, applied as Hugging Face does: temperature, then top-k, then top-p.
    temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def warp_logits(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """[..., V] logits -> [..., V] logits with -inf at removed tokens. Same semantics as transformers'
    TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper (min_tokens_to_keep=1), in that order."""
    if cfg.greedy:
        raise ValueError("temperature 0 is greedy decoding: there is no warped distribution to sample")
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature  # [..., V]
    if cfg.top_k > 0:
        k = min(cfg.top_k, logits.shape[-1])
        kth_best = logits.topk(k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth_best, -torch.inf)  # [..., V]
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # [..., V] ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [..., V]
        sorted_remove = cumulative <= 1 - cfg.top_p  # [..., V]
        sorted_remove[..., -1:] = False  # keep at least the best token
        remove = sorted_remove.scatter(-1, order, sorted_remove)  # [..., V] back in vocabulary order
        logits = logits.masked_fill(remove, -torch.inf)  # [..., V]
    return logits


def target_probs(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """[..., V] float64: the target's warped sampling distribution, softmax(warp_logits(logits))."""
    return torch.softmax(warp_logits(logits, cfg), dim=-1, dtype=torch.float64)


@dataclass(frozen=True, eq=False)
class VerifyResult:
    """accepted: [B, D+1] long node indices of the accepted path, starting with the root 0, padded with -1
    (D = the largest tree depth in the batch). num_accepted: [B] long, accepted DRAFT tokens (root excluded).
    bonus: [B] long, the token the target emits after the accepted path."""

    accepted: Tensor  # [B, D+1] long
    num_accepted: Tensor  # [B] long
    bonus: Tensor  # [B] long

    def path(self, b: int) -> list[int]:
        """Node indices of sequence b's accepted path, root first (what the caches keep)."""
        return self.accepted[b, : 1 + int(self.num_accepted[b])].tolist()

    def emitted(self, tree: Tree, b: int) -> list[int]:
        """Tokens sequence b emits this step: the accepted draft tokens, then the bonus."""
        path = self.accepted[b, 1 : 1 + int(self.num_accepted[b])]  # [num_accepted[b]]
        return tree.tokens[b, path].tolist() + [int(self.bonus[b])]


def _empty_path(tree: Tree) -> Tensor:
    D = int(tree.depths().max())
    accepted = torch.full((tree.batch_size, D + 1), -1, dtype=torch.long, device=tree.tokens.device)  # [B, D+1]
    accepted[:, 0] = 0
    return accepted


def verify_greedy(tree: Tree, target_logits: Tensor) -> VerifyResult:
    """Greedy verification. Child c of node i is accepted iff i is accepted and tokens[c] == argmax
    target_logits[b, i] (the first such child in draw order, should tokens repeat); bonus = the argmax at the
    deepest accepted node. target_logits: [B, N, V]. Vectorised over the batch, one iteration per depth."""
    B, N, _ = target_logits.shape
    batch = torch.arange(B, device=tree.tokens.device)  # [B]
    best = target_logits.argmax(dim=-1)  # [B, N] the target's token after each node
    accepted = _empty_path(tree)  # [B, D+1]
    node = torch.zeros(B, dtype=torch.long, device=tree.tokens.device)  # [B] deepest accepted node
    num_accepted = torch.zeros_like(node)  # [B]
    for d in range(1, accepted.shape[1]):
        match = (tree.parents == node[:, None]) & (tree.tokens == best[batch, node][:, None])  # [B, N]
        hit = match.any(dim=-1)  # [B] after a miss `node` stays put, so later depths cannot match either
        child = match.long().argmax(dim=-1)  # [B] first matching child
        node = torch.where(hit, child, node)  # [B]
        accepted[:, d] = torch.where(hit, child, accepted[:, d])
        num_accepted += hit
    return VerifyResult(accepted, num_accepted, best[batch, node])


def verify_sampling(tree: Tree, target_logits: Tensor, cfg: SamplingConfig,
                    generator: torch.Generator | None) -> VerifyResult:
    """Lossless verification by recursive rejection sampling over siblings (SpecInfer; Jeon et al. 2024,
    without replacement). At an accepted node i, p = target_probs(target_logits[b, i]) and q = draft_probs[b, i].
    For each child c of i in draw order, with token x: accept c with probability min(1, p[x] / q[x]); on
    rejection p <- normalize(max(p - q, 0)) (kept as is if that is all zero), q[x] <- 0, q <- normalize(q).
    Accepting c moves to c and repeats; when i has no child left, bonus ~ p. Every emitted token is then an
    exact sample of the target's warped distribution, provided the children were drawn without replacement from
    q and whether a child is present does not depend on its own token (see `TreeBuilder`).
    When tree.draft_probs is None the children are taken as deterministic proposals (q = one-hot of the child's
    token), which is the same rule and equally lossless.

    target_logits: [B, N, V]. generator: on target_logits' device. Probabilities are float64. Vectorised over the
    batch: each iteration accepts or rejects one child per unfinished sequence, so at most N iterations.
    """
    B, N, V = target_logits.shape
    device = target_logits.device
    batch = torch.arange(B, device=device)  # [B]
    probs = target_probs(target_logits, cfg)  # [B, N, V] float64
    deterministic = tree.draft_probs is None
    draft = None if deterministic else tree.draft_probs.to(device=device, dtype=torch.float64)  # [B, N, V]
    kids = tree.children_table()  # [B, N, C]
    C = kids.shape[-1]

    accepted = _empty_path(tree)  # [B, D+1]
    node = torch.zeros(B, dtype=torch.long, device=device)  # [B] deepest accepted node
    next_kid = torch.zeros_like(node)  # [B] sibling rank of the next child of `node` to try
    num_accepted = torch.zeros_like(node)  # [B]
    p = probs[:, 0]  # [B, V] residual target distribution at `node`
    q = torch.zeros_like(p) if deterministic else draft[:, 0]  # [B, V] residual draft distribution at `node`
    for _ in range(N):
        child = kids[batch, node, next_kid.clamp(max=C - 1)]  # [B]
        trying = (next_kid < C) & (child >= 0)  # [B] False: finished, bonus ~ p
        if not trying.any():
            break
        child = child.clamp(min=0)  # [B]
        x = tree.tokens[batch, child]  # [B] candidate token
        if deterministic:
            q = torch.nn.functional.one_hot(x, V).to(p.dtype)  # [B, V]
        px = p[batch, x]  # [B]
        qx = q[batch, x]  # [B]
        u = torch.rand(B, generator=generator, dtype=torch.float64, device=device)  # [B]
        accept = trying & (u * qx < px)  # [B] u < p/q without dividing (q[x] = 0 accepts iff p[x] > 0)
        reject = trying & ~accept  # [B]

        residual = (p - q).clamp_min(0)  # [B, V]
        residual_sum = residual.sum(dim=-1, keepdim=True)  # [B, 1]
        p_rejected = torch.where(residual_sum > 0, residual / residual_sum.clamp_min(1e-300), p)  # [B, V]
        q_rejected = q.scatter(-1, x[:, None], 0.0)  # [B, V]
        q_rejected = q_rejected / q_rejected.sum(dim=-1, keepdim=True).clamp_min(1e-300)  # [B, V]

        p = torch.where(accept[:, None], probs[batch, child], torch.where(reject[:, None], p_rejected, p))
        if not deterministic:
            q = torch.where(accept[:, None], draft[batch, child], torch.where(reject[:, None], q_rejected, q))
        node = torch.where(accept, child, node)
        next_kid = torch.where(accept, 0, next_kid + reject.long())
        num_accepted += accept
        accepted[batch[accept], num_accepted[accept]] = child[accept]
    bonus = torch.multinomial(p, 1, generator=generator)[:, 0]  # [B]
    return VerifyResult(accepted, num_accepted, bonus)
