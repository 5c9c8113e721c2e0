"""How a request chooses its tokens, and the verification of a draft tree against the target. Pure tensor code.

Choosing (`Sampler`): greedy takes the argmax of the target's logits. Sampling takes the argmax of the warped
logits plus Gumbel noise that the request's seed fixes for each answer position (the Gumbel-max trick: an exact
sample of the warped distribution, and independent across positions because the noise is). So every token is a
function of the target's logits, the seed and the position, and never of what was drafted: the drafter perturbs
its own logits with the same noise, so it guesses the sample the target will take, and a seeded request gives the
same tokens with any drafter, tree or batch as plain decoding does (up to floating-point rounding of the target).

Verification (one step, per sequence b), on scores = what the row chooses by (logits, or warped logits + noise):
- `scores[b, i]`: the scores of the token AFTER node i (from the target's logits in the verify pass).
- **accepted**: the draft tokens the target keeps: a root-to-node path of the tree, root excluded; node i's child
  is accepted iff i is and the child's token is the argmax of scores[b, i].
- **bonus**: the token the target itself emits after the accepted path (always exactly one): the argmax of the
  scores at the deepest accepted node.
- Emitted tokens of the step = accepted tokens then the bonus: each is exactly the target's own choice given
  everything emitted before it, whatever the tree.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Callable, Sequence

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


# (draft logits [F, V] after frontier nodes at tree depth d, d) -> the scores their children are chosen by
ChildScores = Callable[[Tensor, int], Tensor]


def greedy_scores(logits: Tensor, depth: int) -> Tensor:
    """The `ChildScores` of a greedy request: the draft logits themselves."""
    return logits


class Sampler:
    """One request's choice of tokens. `scores(logits, positions)` gives what it takes the argmax of: the logits
    themselves (greedy), or warp_logits(logits) in float64 plus Gumbel noise g_n [V] for answer position n (the
    n-th generated token, 0 first). g_n comes from a generator seeded with a hash of (seed, n): the same for the
    target and the drafter, the same in any batch, drawn once per position. `seed` None draws a random seed."""

    def __init__(self, config: SamplingConfig, seed: int | None = None):
        self.config = config
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self._noise: dict[int, Tensor] = {}       # position -> g_n [V], the positions still ahead

    def scores(self, logits: Tensor, positions: Sequence[int]) -> Tensor:
        """logits [n, V] → scores [n, V]; `positions[i]`: the answer position of the token after row i."""
        if self.config.greedy:
            return logits
        if positions:
            for stale in [n for n in self._noise if n < min(positions)]:   # positions behind the answer: done
                del self._noise[stale]
        noise = torch.stack([self.noise(n, logits.shape[-1], logits.device) for n in positions])   # [n, V]
        return warp_logits(logits.double(), self.config) + noise

    def noise(self, position: int, vocab: int, device: torch.device) -> Tensor:
        """g_n [V] float64: standard Gumbel noise of answer position `position`."""
        if position not in self._noise:
            generator = torch.Generator(device=device).manual_seed(mix64(self.seed, position))
            uniform = torch.rand(vocab, generator=generator, dtype=torch.float64, device=device)   # [V] in [0, 1)
            self._noise[position] = -torch.log(-torch.log(uniform))                             # u = 0 gives -inf
        return self._noise[position]


def mix64(seed: int, position: int) -> int:
    """A 64-bit generator seed from (seed, position): splitmix64's finaliser over seed and position, so nearby
    pairs give unrelated seeds (torch's CPU generator keeps only the low 32 bits: those differ too)."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) % 2 ** 64
    for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = ((x ^ (x >> shift)) * multiplier) % 2 ** 64
    return x ^ (x >> 31)


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


def verify(tree: Tree, scores: Tensor) -> VerifyResult:
    """Child c of node i is accepted iff i is accepted and tokens[c] == argmax scores[b, i] (the first such child
    in draw order, should tokens repeat); bonus = the argmax at the deepest accepted node. scores: [B, N, V] (the
    target's logits, or `Sampler.scores` of them). Vectorised over the batch, one iteration per depth."""
    B, N, _ = scores.shape
    batch = torch.arange(B, device=tree.tokens.device)  # [B]
    best = scores.argmax(dim=-1)  # [B, N] the target's token after each node
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
