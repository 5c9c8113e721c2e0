"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of the current n-gram in the
prompt and the generated text. No model, and no scores: the proposal is the same for greedy and sampled
requests (verification emits the target's own choice either way)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmspec.drafters.base import DraftState, Drafter, register_drafter
from vlmspec.tree import Tree, TreeConfig
from vlmspec.verify import ChildScores


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

    def propose(self, state: LookupState, tree_config: TreeConfig, scores: ChildScores) -> Tree:
        depth = tree_config.depth if tree_config.kind == "chain" else min(tree_config.depth, tree_config.total_tokens)
        proposal = lookup(state.history, self.config.max_ngram, self.config.min_ngram, depth)
        device = self.target.device
        tokens = torch.tensor([state.history[-1:] + proposal], device=device)       # [1, n]
        parents = torch.arange(-1, len(proposal), device=device)[None]             # [1, n]: a chain
        return Tree(tokens, parents, torch.tensor([tokens.shape[1]], device=device))

    def accept(self, state: LookupState, tree: Tree, path: list[int], verified, bonus: int) -> None:
        state.history += tree.tokens[0, path[1:]].tolist() + [bonus]
