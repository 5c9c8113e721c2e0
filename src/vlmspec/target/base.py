"""The target: an unmodified Hugging Face model driven through prefill → extend/verify(tree) → commit(path).

No modeling code is copied and nothing is set on the model: each call passes input ids, a 4D additive attention
mask, explicit position ids and a cache object that lives in an explicit `TargetState`. Family differences
(processor call, image-token ids, position scheme) live in small `Family` adapters (see `families.py`).

A state holds B rows (one per sequence) in a preallocated `RowCache`; row b's layout during a step is
`[committed prefix (state.lengths[b] tokens) | pending nodes]`. Pending nodes are appended by `extend` (a whole
verify tree, or a draft model's tree level by level; every row gets the same number, short trees are padded);
each attends to its row's whole prefix and to its ancestors-or-self among the pending nodes, at position
prefix length + depth. `commit_rows(paths)` compacts each row's kept pending nodes (an accepted root-to-node
path) right after its prefix, in place, and drops the rest. `prefill` makes a one-row state; the batched engine
prefills each request straight into its batch's state (`prefill(into=…)`) and drops rows with `remove_row`.
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
from vlmspec.target.cache import RowCache

if TYPE_CHECKING:
    from vlmspec.target.families import Family
    from vlmspec.tree import Tree


@dataclass
class TargetState:
    """Decode state of B sequences: the KV cache (one row each), committed lengths and the pending nodes."""

    cache: RowCache
    lengths: list[int]                               # committed tokens per row
    pending: PendingNodes                            # uncommitted nodes after each row's prefix
    position_offset: Tensor | None = None            # [B, 1] family-specific (M-RoPE delta), None for 1-D positions

    @property
    def length(self) -> int:
        """The committed length of a one-row state."""
        if len(self.lengths) != 1:
            raise ValueError(f"length is defined for one row, this state has {len(self.lengths)}")
        return self.lengths[0]

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def add_row(self, cache, length: int, position_offset: Tensor | None, room: int = 0) -> int:
        """Append row 0 of `cache` (its first `length` entries: a prompt's prefill cache) as a new committed row,
        reserving `room` more entries; returns its index."""
        if len(self.pending):
            raise ValueError("rows join a state without pending nodes")
        row = self.cache.add_row(cache, length, room)
        self.lengths.append(length)
        if position_offset is not None:
            offsets = [] if self.position_offset is None else [self.position_offset]
            self.position_offset = torch.cat(offsets + [position_offset])
        self.pending = PendingNodes.empty(self.rows, self.pending.tokens.device)
        return row

    def remove_row(self, row: int) -> None:
        """Drop row `row`; the last row moves into its place (rows stay packed at the front of the cache)."""
        last = self.rows - 1
        self.cache.move_row(last, row)
        self.lengths[row] = self.lengths[last]
        self.lengths.pop()
        if self.position_offset is not None:
            self.position_offset[row] = self.position_offset[last]
            self.position_offset = self.position_offset[:last]
        self.pending = PendingNodes.empty(self.rows, self.pending.tokens.device)

    @classmethod
    def empty(cls, num_layers: int, device: torch.device | str) -> "TargetState":
        return cls(RowCache(num_layers), [], PendingNodes.empty(0, device))


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
    def from_pretrained(cls, name_or_dir: str | Path, dtype: torch.dtype | str | None = None,
                        device_map: str | dict | None = None, max_memory: dict | None = None) -> "Target":
        """Load a local checkpoint directory, or `testbed` (the shipped model). `dtype=None` keeps the checkpoint's;
        `"fast"` is bf16 on a CPU that computes bf16 natively, else fp32 (`vlmspec.hardware`). `device_map` (e.g.
        "auto") and `max_memory` go to HF `from_pretrained` to spread a target too big for one GPU over several."""
        from vlmspec.target.families import load_model_and_processor

        path = resolve_target_path(name_or_dir)
        model, processor = load_model_and_processor(path, dtype, device_map, max_memory)
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
    def prefill(self, inputs: dict[str, Tensor], into: TargetState | None = None,
                room: int = 0) -> tuple[TargetState, PrefillOutput]:
        """Run the prompt (vision once, the model's own causal mask) and keep it as a new row of `into` (a batch's
        state; None: a new one-row state), with `room` more cache entries reserved; returns the state and what
        drafters need."""
        input_ids = inputs["input_ids"]                                    # [1, S]
        batch, length = input_ids.shape
        if batch != 1:
            raise ValueError(f"prefill runs one sequence at a time, got a batch of {batch}")
        prompt_cache = self.family.new_cache(self.model)
        positions, offset = self.family.prefill_positions(self.model, inputs)
        kwargs = dict(inputs)
        if positions is not None:
            kwargs["position_ids"] = positions
        outputs = self.model(**kwargs, **{self._cache_kwarg: prompt_cache}, use_cache=True,
                             output_hidden_states=True, logits_to_keep=1)
        if positions is None:
            positions = torch.arange(length, device=input_ids.device).expand(batch, -1)
        image_token = self.family.image_token_id(self.model)
        image_mask = input_ids == image_token if image_token is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        state = into if into is not None else TargetState.empty(self.num_layers, input_ids.device)
        state.add_row(prompt_cache, length, offset, room)
        result = PrefillOutput(logits=outputs.logits[:, -1].float(), hidden_states=tuple(outputs.hidden_states),
                               input_ids=input_ids, image_mask=image_mask, image_spans=image_spans(image_mask),
                               positions=positions, inputs=inputs)
        return state, result

    @torch.no_grad()
    def extend(self, state: TargetState, tokens: Tensor, parents: Tensor) -> NodesOutput:
        """Append `tokens` [B, n] as pending nodes of the B rows; `parents` [B, n] index each row's pending list
        (existing + new, a parent before its child), -1 for a node hanging directly off the committed prefix."""
        if tokens.shape[0] != state.rows:
            raise ValueError(f"extend got {tokens.shape[0]} rows of nodes for a state of {state.rows} rows")
        depths = state.pending.add(tokens, parents)                           # [B, n]
        positions = self.family.node_positions(state, depths)
        mask = state.pending.attention_mask(state.lengths, tokens.shape[1], self.dtype)  # [B, 1, n, span]
        outputs = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                             **{self._cache_kwarg: state.cache}, use_cache=True, output_hidden_states=True)
        return NodesOutput(logits=outputs.logits.float(), hidden_states=tuple(outputs.hidden_states),
                           positions=positions)

    def verify(self, state: TargetState, tree: "Tree") -> NodesOutput:
        """Score a batch of draft trees (one per row) in one forward: logits for the token after every node."""
        if len(state.pending):
            raise ValueError("verify needs a state with no pending nodes; commit first")
        return self.extend(state, tree.tokens, tree.parents)

    def commit(self, state: TargetState, keep: Sequence[int]) -> None:
        """One-row state: keep pending nodes `keep` (a root-first path, indices into the pending list)."""
        self.commit_rows(state, [keep])

    def commit_rows(self, state: TargetState, paths: Sequence[Sequence[int]]) -> None:
        """Keep, in each row b, the pending nodes `paths[b]` right after its prefix (in place) and drop the rest."""
        if len(paths) != state.rows:
            raise ValueError(f"commit got {len(paths)} paths for {state.rows} rows")
        for row, path in enumerate(paths):
            state.cache.keep(row, state.lengths[row], path)
            state.lengths[row] += len(path)
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
