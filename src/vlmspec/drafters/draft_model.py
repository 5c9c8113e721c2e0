"""An independent small HF model as the drafter (a causal LM, or a VLM with the target's processor layout),
sharing the target's tokenizer. It drafts the tree level by level as pending nodes in its own cache, through the
same `Target` adapter the target uses; after verification it keeps the part of the accepted path it already ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmspec.drafters.base import DraftState, Drafter, register_drafter
from vlmspec.target import Target, TargetState
from vlmspec.tree import Tree, TreeConfig
from vlmspec.verify import ChildScores


@dataclass(frozen=True)
class DraftModelConfig:
    model: str = ""        # a local checkpoint directory of the draft model

    def __post_init__(self):
        if not self.model:
            raise ValueError("draft-model needs model=DIR, a checkpoint directory sharing the target's tokenizer")


@dataclass
class DraftModelState(DraftState):
    model_state: TargetState | None = None
    tokens: list[int] = field(default_factory=list)   # verified tokens not yet in the draft cache, root last


@register_drafter
class DraftModelDrafter(Drafter):
    drafter_type = "draft-model"
    config_class = DraftModelConfig
    trainable = False

    def __init__(self, target: Target, config: DraftModelConfig):
        super().__init__(target, config)
        self.draft = Target.from_pretrained(config.model, dtype=target.dtype)
        self.add_module("draft_model", self.draft.model)
        if len(self.draft.tokenizer) != len(target.tokenizer):
            raise ValueError(f"draft model {config.model} has a tokenizer of {len(self.draft.tokenizer)} tokens, "
                             f"the target {len(target.tokenizer)}: they must share one tokenizer")

    def state_dict(self, *args, **kwargs):   # the draft model lives in its own directory, not in the checkpoint
        return {}

    def begin(self, target: Target, prefill, first_token: int) -> DraftModelState:
        inputs = prefill.inputs if self.draft.supports_images else {"input_ids": prefill.input_ids}
        model_state, _ = self.draft.prefill(inputs)
        return DraftModelState(model_state=model_state, tokens=[first_token], forwards=1)

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits [n, V_draft] → the target's vocabulary (padding rows of either head are cut or -inf)."""
        vocab = self.target.vocab_size
        if logits.shape[-1] >= vocab:
            return logits[..., :vocab]
        pad = logits.new_full((*logits.shape[:-1], vocab - logits.shape[-1]), float("-inf"))
        return torch.cat([logits, pad], dim=-1)

    def propose(self, state: DraftModelState, tree_config: TreeConfig, scores: ChildScores) -> Tree:
        device = self.target.device
        count = len(state.tokens)
        out = self.draft.extend(state.model_state, torch.tensor([state.tokens], device=device),
                                torch.arange(-1, count - 1, device=device)[None])
        self.draft.commit(state.model_state, list(range(count)))
        state.forwards += 1
        root, state.tokens = state.tokens[-1], []
        builder = self.tree_builder(tree_config, root)
        node_pending = {0: -1}
        logits = out.logits[0, -1:]                                                 # [1, V]
        frontier = builder.frontier()
        while True:
            builder.expand(scores(self._logits(logits), builder.depth(frontier[0])))
            frontier = builder.frontier()
            if not frontier:
                break
            base = len(state.model_state.pending)
            tokens = torch.tensor([[builder.token(n) for n in frontier]], device=device)
            parents = torch.tensor([[node_pending[builder.parent(n)] for n in frontier]], device=device)
            logits = self.draft.extend(state.model_state, tokens, parents).logits[0]      # [F, V]
            state.forwards += 1
            node_pending.update({node: base + offset for offset, node in enumerate(frontier)})
        return builder.build()

    def accept(self, state: DraftModelState, tree: Tree, path: list[int], verified, bonus: int) -> None:
        accepted = tree.tokens[0, path[1:]].tolist()
        kept = state.model_state.pending.follow(accepted)
        self.draft.commit(state.model_state, kept)
        state.tokens += accepted[len(kept):] + [bonus]      # a step without drafting left its tokens here
