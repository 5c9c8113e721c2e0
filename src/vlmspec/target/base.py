"""The target: an unmodified Hugging Face model driven through prefill → extend/verify(tree) → commit(path).

No modeling code is copied and nothing is set on the model: each call passes input ids, a 4D additive attention
mask, explicit position ids and a cache object that lives in an explicit `TargetState`. Family differences
(processor call, image-token ids, position scheme) live in small `Family` adapters (see `families.py`).

Cache layout during a step: `[committed prefix (state.length tokens) | pending nodes]`. Pending nodes are
appended by `extend` (a whole verify tree, or a draft model's tree level by level); each attends to the whole
prefix and to its ancestors-or-self among the pending nodes. `commit(keep)` compacts the kept pending nodes (an
accepted root-to-node path) right after the prefix and drops the rest.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from vlmspec.inputs import Messages, resolve_prompt
from vlmspec.pending import PendingNodes

if TYPE_CHECKING:
    from vlmspec.target.families import Family
    from vlmspec.tree import Tree


@dataclass
class TargetState:
    """Decode state of one sequence batch (batch 1 in the engine): the KV cache and the pending nodes."""

    cache: Any
    length: int                                      # committed tokens in the cache
    pending: PendingNodes                            # uncommitted nodes after the prefix
    position_offset: Tensor | None = None            # family-specific (M-RoPE delta), None for 1-D positions


@dataclass
class PrefillOutput:
    logits: Tensor                                   # [B, V] logits for the token after the prompt
    hidden_states: tuple[Tensor, ...]                # (layers+1) × [B, S, H]; [0] = input embeddings incl. visual
    input_ids: Tensor                                # [B, S]
    image_mask: Tensor                               # [B, S] bool: positions holding projected visual embeddings
    image_spans: list[list[tuple[int, int]]]         # per sequence: [start, end) of each run of image tokens
    positions: Tensor                                # [B, S] ([3, B, S] for M-RoPE)
    inputs: dict[str, Tensor]                        # the model inputs the prefill ran on


@dataclass
class NodesOutput:
    logits: Tensor                                   # [B, n, V]: logits for the token after each node
    hidden_states: tuple[Tensor, ...]                # (layers+1) × [B, n, H]
    positions: Tensor                                # [B, n] ([3, B, n] for M-RoPE)


def image_spans(image_mask: Tensor) -> list[list[tuple[int, int]]]:
    """[B, S] bool → per sequence, the [start, end) runs of True."""
    spans = []
    for row in image_mask.tolist():
        runs, start = [], None
        for index, flag in enumerate(row + [False]):
            if flag and start is None:
                start = index
            elif not flag and start is not None:
                runs.append((start, index))
                start = None
        spans.append(runs)
    return spans


class Target:
    """A HF causal LM or VLM ready for tree verification. `Target(model, processor)` or `Target.from_pretrained`."""

    def __init__(self, model: torch.nn.Module, processor: Any):
        from vlmspec.target.families import family_for

        self.model = model.eval()
        self.processor = processor
        self.family: Family = family_for(model)
        self.config = model.config
        self.text_config = model.config.get_text_config(decoder=True)
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path, dtype: torch.dtype | str | None = None) -> "Target":
        """Load a local checkpoint directory, or `testbed` (the shipped model). `dtype=None` keeps the checkpoint's;
        `"fast"` is bf16 on a CPU that computes bf16 natively, else fp32 (`vlmspec.hardware`)."""
        from vlmspec.target.families import load_model_and_processor

        path = resolve_target_path(name_or_dir)
        model, processor = load_model_and_processor(path, dtype)
        return cls(model, processor)

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    @property
    def embed_tokens(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    @property
    def context_length(self) -> int:
        return int(getattr(self.text_config, "max_position_embeddings", 1 << 30))

    @property
    def supports_images(self) -> bool:
        return self.family.image_token_id(self.model) is not None

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.text_config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            ids.update([value] if isinstance(value, int) else (value or []))
        return ids

    def fingerprint(self) -> str:
        """Hash of the target's text config and (a stride of) its embedding weights: identifies a trained target."""
        digest = hashlib.sha256()
        keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        digest.update(json.dumps({k: getattr(self.text_config, k, None) for k in keys}, sort_keys=True).encode())
        digest.update(self.architecture.encode())
        weight = self.embed_tokens.weight.detach()
        rows = weight[:: max(1, weight.shape[0] // 256)]
        digest.update(rows.float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    # ------------------------------------------------------------------ inputs
    def encode(self, images: Sequence[Any] | None = None, prompt: str | None = None,
               messages: Messages | None = None) -> dict[str, Tensor]:
        """Images + prompt/messages → model inputs (token ids, pixel values, …) on the model's device."""
        loaded, messages = resolve_prompt(images, prompt, messages)
        if loaded and not self.supports_images:
            raise ValueError(f"the target {self.architecture} is text-only but {len(loaded)} image(s) were given")
        inputs = self.family.encode(self.processor, loaded, messages)
        length = inputs["input_ids"].shape[1]
        if length >= self.context_length:
            raise ValueError(f"the prompt is {length} tokens, longer than the target's context of "
                             f"{self.context_length} tokens")
        return {key: value.to(self.device) if isinstance(value, Tensor) else value for key, value in inputs.items()}

    # ------------------------------------------------------------------ forward passes
    @torch.no_grad()
    def prefill(self, inputs: dict[str, Tensor]) -> tuple[TargetState, PrefillOutput]:
        """Run the prompt (vision once) into a new cache; returns the state and what drafters need."""
        input_ids = inputs["input_ids"]                                    # [B, S]
        batch = input_ids.shape[0]
        cache = self.family.new_cache(self.model)
        positions, offset = self.family.prefill_positions(self.model, inputs)
        kwargs = dict(inputs)
        if positions is not None:
            kwargs["position_ids"] = positions
        outputs = self.model(**kwargs, **{self._cache_kwarg: cache}, use_cache=True, output_hidden_states=True,
                             logits_to_keep=1)
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(batch, -1)
        image_token = self.family.image_token_id(self.model)
        image_mask = input_ids == image_token if image_token is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        state = TargetState(cache=cache, length=input_ids.shape[1], pending=PendingNodes.empty(batch, input_ids.device),
                            position_offset=offset)
        result = PrefillOutput(logits=outputs.logits[:, -1].float(), hidden_states=tuple(outputs.hidden_states),
                               input_ids=input_ids, image_mask=image_mask, image_spans=image_spans(image_mask),
                               positions=positions, inputs=inputs)
        return state, result

    @torch.no_grad()
    def extend(self, state: TargetState, tokens: Tensor, parents: Tensor) -> NodesOutput:
        """Append `tokens` [B, n] as pending nodes; `parents` [B, n] index the pending list (existing + new, a
        parent before its child), -1 for a node hanging directly off the committed prefix."""
        depths = state.pending.add(tokens, parents)                           # [B, n]
        positions = self.family.node_positions(state, depths)
        mask = state.pending.attention_mask(state.length, tokens.shape[1], self.dtype)  # [B, 1, n, length + P]
        outputs = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                             **{self._cache_kwarg: state.cache}, use_cache=True, output_hidden_states=True)
        return NodesOutput(logits=outputs.logits.float(), hidden_states=tuple(outputs.hidden_states),
                           positions=positions)

    def verify(self, state: TargetState, tree: "Tree") -> NodesOutput:
        """Score a whole draft tree in one forward: logits for the token after every node."""
        if len(state.pending):
            raise ValueError("verify needs a state with no pending nodes; commit first")
        return self.extend(state, tree.tokens, tree.parents)

    def commit(self, state: TargetState, keep: Sequence[int]) -> None:
        """Keep pending nodes `keep` (a root-first path, indices into the pending list) after the prefix."""
        from vlmspec.target.cache import compact_cache

        if state.pending.tokens.shape[0] != 1:
            raise ValueError("commit supports batch 1")
        compact_cache(state.cache, start=state.length, keep=list(keep))
        state.length += len(keep)
        state.pending.clear()


def resolve_target_path(name_or_dir: str | Path) -> Path:
    """`testbed` → the shipped model; an existing directory → itself; anything else is a clear error."""
    path = Path(name_or_dir)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a model directory (no config.json)")
        return path
    if str(name_or_dir) == "testbed":
        from vlmspec.testbed import shipped_path

        return shipped_path()
    raise ValueError(f"target {str(name_or_dir)!r} is neither a model directory nor 'testbed'")
