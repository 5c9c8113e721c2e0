"""Peers: what a user would otherwise pick, run through Hugging Face `model.generate` as arms of the same bench.

- `hf-generate`: the target's own `generate` (HF's plain decoding, a reference for the peers' loop overhead);
- `hf-assisted:DIR`: assisted generation with `assistant_model` loaded from DIR (a small LM or VLM sharing the
  target's tokenizer);
- `hf-prompt-lookup[:N]`: prompt-lookup decoding, `prompt_lookup_num_tokens=N` (default 10).

Counting: target forwards are counted by a forward hook on the target's HF model (the assistant is another module,
not counted), so τ = new tokens / target forwards as for our arms. `generate` does not expose its steps: per-step
counts, acceptance by depth, draft/verify shares and efficiency are unknown (null). Prefill: `generate` drafts
before its first target forward and that forward also verifies drafts, so no boundary inside it is the prefill;
instead one target forward on the prompt is timed on its own just before, and decode seconds = generate's
seconds − that.
When `generate` raises, the arm's record is `status: "unsupported"` with the error message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from vlmspec.target import Target

DEFAULT_LOOKUP_TOKENS = 10


@dataclass
class Peer:
    """One `model.generate` configuration. `extra` are the generate kwargs that make it this peer."""

    name: str
    target: Target
    extra: dict[str, Any]

    def run(self, inputs: dict[str, torch.Tensor], max_new_tokens: int, temperature: float,
            seed: int) -> dict[str, Any]:
        """Generate once; the record fields of an arm (token ids, counts, seconds) or an "unsupported" row."""
        model = self.target.model
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
            dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        eos = sorted(self.target.eos_token_ids)
        pad = self.target.tokenizer.pad_token_id
        counter = None
        try:
            prefill = self._prefill_seconds(inputs)
            counter = _ForwardCounter(model)
            torch.manual_seed(seed)
            _sync(self.target.device)
            start = time.perf_counter()
            with torch.inference_mode():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                        pad_token_id=pad if pad is not None else eos[0], **sampling, **self.extra)
            _sync(self.target.device)
            seconds = time.perf_counter() - start
        except Exception as error:  # noqa: BLE001 — any failure of a peer is its result, reported as such
            return unsupported(f"{type(error).__name__}: {error}".strip()[:500])
        finally:
            if counter is not None:
                counter.remove()
        prompt_length = inputs["input_ids"].shape[1]
        token_ids = _cut_at_eos(output[0, prompt_length:].tolist(), set(eos))
        return {"status": "ok", "error": None, "token_ids": token_ids, "new_tokens": len(token_ids),
                "target_forwards": counter.count or None, "seconds": seconds, "prefill_seconds": prefill,
                "decode_seconds": max(seconds - prefill, 0.0), "draft_seconds": None, "verify_seconds": None,
                "accepted_per_step": None, "draft_forwards_per_step": None, "tree_nodes_per_step": None,
                "tree_depth_per_step": None, "token_sources": None}

    @torch.inference_mode()
    def _prefill_seconds(self, inputs: dict[str, torch.Tensor]) -> float:
        """Time of one target forward on the prompt: the prefill `generate` does inside, timed on its own (the
        first forward of `generate` itself may also verify drafts, so it cannot serve as the boundary)."""
        model = self.target.model
        _sync(self.target.device)
        start = time.perf_counter()
        model(**inputs, use_cache=True, logits_to_keep=1)
        _sync(self.target.device)
        return time.perf_counter() - start


def unsupported(error: str) -> dict[str, Any]:
    """The record fields of a run that raised: every measurement unknown."""
    fields = ("token_ids", "new_tokens", "target_forwards", "seconds", "prefill_seconds", "decode_seconds",
              "draft_seconds", "verify_seconds", "accepted_per_step", "draft_forwards_per_step", "tree_nodes_per_step",
              "tree_depth_per_step", "token_sources")
    return {"status": "unsupported", "error": error, **dict.fromkeys(fields)}


class _ForwardCounter:
    """Counts forwards of one module with a removable hook."""

    def __init__(self, module: torch.nn.Module):
        self.count = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.count += 1

    def remove(self) -> None:
        self.handle.remove()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cut_at_eos(token_ids: list[int], eos: set[int]) -> list[int]:
    for index, token in enumerate(token_ids):
        if token in eos:
            return token_ids[: index + 1]
    return token_ids


def _generate(target: Target, argument: str | None) -> Peer:
    if argument:
        raise ValueError("hf-generate takes no argument")
    return Peer("hf-generate", target, {})


def _assisted(target: Target, argument: str | None) -> Peer:
    if not argument:
        raise ValueError("hf-assisted needs a draft model directory: hf-assisted:DIR")
    assistant = Target.from_pretrained(argument, dtype=target.dtype)
    assistant.model.to(target.device)
    return Peer(f"hf-assisted:{argument}", target, {"assistant_model": assistant.model})


def _prompt_lookup(target: Target, argument: str | None) -> Peer:
    try:
        tokens = int(argument) if argument else DEFAULT_LOOKUP_TOKENS
    except ValueError:
        raise ValueError(f"hf-prompt-lookup:N needs an integer N, got {argument!r}") from None
    if tokens < 1:
        raise ValueError(f"hf-prompt-lookup:N needs N >= 1, got {tokens}")
    name = "hf-prompt-lookup" if not argument else f"hf-prompt-lookup:{tokens}"
    return Peer(name, target, {"prompt_lookup_num_tokens": tokens})


PEERS: dict[str, Callable[[Target, str | None], Peer]] = {
    "hf-generate": _generate, "hf-assisted": _assisted, "hf-prompt-lookup": _prompt_lookup}


def open_peer(spec: str, target: Target) -> Peer:
    """`NAME` or `NAME:ARGUMENT` → a ready peer; unknown names are a ValueError listing the known ones."""
    name, _, argument = spec.partition(":")
    if name not in PEERS:
        raise ValueError(f"unknown peer {spec!r}; known: {', '.join(PEERS)} (e.g. hf-assisted:DIR, "
                         f"hf-prompt-lookup:10)")
    return PEERS[name](target, argument or None)
