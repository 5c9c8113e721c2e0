"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of the current n-gram in the
prompt and the generated text. No model. Proposals are deterministic, so for sampling each node's draft
distribution is a point mass on its child (verification then stays exact)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmspec.drafters.base import DraftState, Drafter, register_drafter
from vlmspec.tree import Tree, TreeConfig
from vlmspec.verify import SamplingConfig


@dataclass(frozen=True)
class PromptLookupConfig:
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")


@dataclass
class LookupState(DraftState):
    history: list[int] = field(default_factory=list)   # prompt + committed tokens, the root last


def lookup(history: list[int], max_ngram: int, min_ngram: int, count: int) -> list[int]:
    """Up to `count` tokens that followed the latest earlier match of the longest suffix n-gram of `history`."""
    for size in range(min(max_ngram, len(history) - 1), min_ngram - 1, -1):
        suffix = history[-size:]
        for start in range(len(history) - size - 1, -1, -1):
            if history[start:start + size] == suffix:
                return history[start + size:start + size + count]
    return []


@register_drafter
class PromptLookupDrafter(Drafter):
    drafter_type = "prompt-lookup"
    config_class = PromptLookupConfig
    trainable = False

    def begin(self, target, prefill, first_token: int) -> LookupState:
        return LookupState(history=prefill.input_ids[0].tolist() + [first_token])

    def propose(self, state: LookupState, tree_config: TreeConfig, sampling: SamplingConfig,
                generator: torch.Generator | None) -> Tree:
        depth = tree_config.depth if tree_config.kind == "chain" else min(tree_config.depth, tree_config.total_tokens)
        proposal = lookup(state.history, self.config.max_ngram, self.config.min_ngram, depth)
        device = self.target.device
        tokens = torch.tensor([state.history[-1:] + proposal], device=device)       # [1, n]
        parents = torch.arange(-1, len(proposal), device=device)[None]             # [1, n]: a chain
        draft_probs = None
        if not sampling.greedy:
            draft_probs = torch.zeros(1, tokens.shape[1], self.target.vocab_size, dtype=torch.float64, device=device)
            for node, token in enumerate(proposal):
                draft_probs[0, node, token] = 1.0                                  # [1, n, V] point masses
        return Tree(tokens, parents, torch.tensor([tokens.shape[1]], device=device), draft_probs)

    def accept(self, state: LookupState, tree: Tree, path: list[int], verified, bonus: int) -> None:
        state.history += tree.tokens[0, path[1:]].tolist() + [bonus]
