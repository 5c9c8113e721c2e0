"""The one generation loop. Plain decoding is the same loop with no drafter: every tree is just its root.

One step: drafter.propose → tree → target.verify → verify_greedy / verify_sampling → target.commit →
drafter.accept → stats. The prefill is a target forward too and emits the first token.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from vlmspec.drafters.base import Drafter
from vlmspec.inputs import Messages
from vlmspec.target import Target
from vlmspec.tree import Tree, TreeConfig
from vlmspec.verify import SamplingConfig, target_probs, verify_greedy, verify_sampling


@dataclass
class GenerationStats:
    """Counters of one generation. τ = new_tokens / target_forwards (prefill included; plain decoding: τ = 1).
    `accepted_by_depth[d-1]` = steps where a depth-d node was accepted / steps where depth d-1 was."""

    new_tokens: int = 0
    target_forwards: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    prefill_seconds: float = 0.0
    seconds: float = 0.0
    accepted_per_step: list[int] = field(default_factory=list)
    draft_forwards_per_step: list[int] = field(default_factory=list)
    tree_nodes_per_step: list[int] = field(default_factory=list)
    tree_depth_per_step: list[int] = field(default_factory=list)

    @property
    def tau(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def decode_seconds(self) -> float:
        return self.seconds - self.prefill_seconds

    @property
    def accepted_by_depth(self) -> list[float]:
        return acceptance_by_depth(self.accepted_per_step, self.tree_depth_per_step)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tau": self.tau, "decode_seconds": self.decode_seconds,
                "accepted_by_depth": self.accepted_by_depth}


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    stats: GenerationStats

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "stats": self.stats.to_dict()}


class Generator:
    """Speculative (or, with `drafter=None`, plain) generation with a target and a drafter."""

    def __init__(self, target: Target, drafter: Drafter | None = None, tree: TreeConfig | None = None):
        self.target = target
        self.drafter = drafter
        self.tree = tree or TreeConfig()

    def generate(self, images: Sequence[Image.Image | str | Path] | None = None, prompt: str | None = None,
                 messages: Messages | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: Sequence[str] = ()) -> GenerationResult:
        """Generate a reply; see `stream` for the arguments."""
        *_, result = self.stream(images, prompt, messages, max_new_tokens, temperature, top_p, top_k, seed, stop)
        return result

    def stream(self, images: Sequence[Image.Image | str | Path] | None = None, prompt: str | None = None,
               messages: Messages | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               stop: Sequence[str] = ()) -> Iterator[str | GenerationResult]:
        """Yield text pieces as tokens are committed, then the `GenerationResult`.

        `prompt` marks images with `<image>` (none: images first); `messages` are HF chat messages. Generation
        ends at an EOS token (kept in `token_ids`), a `stop` string, or `max_new_tokens`."""
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k)
        check_max_new_tokens(max_new_tokens)
        inputs = self.target.encode(images, prompt, messages)
        return self.stream_inputs(inputs, max_new_tokens, sampling, seed, stop)

    def stream_inputs(self, inputs: dict[str, torch.Tensor], max_new_tokens: int, sampling: SamplingConfig,
                      seed: int | None = None, stop: Sequence[str] = ()) -> Iterator[str | GenerationResult]:
        """`stream` on already encoded inputs (`Target.encode`)."""
        tokenizer = self.target.tokenizer
        token_ids: list[int] = []
        text = ""
        for _ in self._steps(inputs, max_new_tokens, sampling, seed, stop, token_ids):
            full = tokenizer.decode(token_ids, skip_special_tokens=True)
            if full.endswith("\ufffd"):        # an incomplete UTF-8 sequence: wait for the next token
                continue
            if len(full) > len(text) and full.startswith(text):
                yield full[len(text):]
            text = full
        yield GenerationResult(token_ids=token_ids, text=tokenizer.decode(token_ids, skip_special_tokens=True),
                               stats=self._stats)

    @torch.no_grad()
    def _steps(self, inputs: dict[str, torch.Tensor], max_new_tokens: int, sampling: SamplingConfig,
               seed: int | None, stop: Sequence[str], out: list[int]) -> Iterator[None]:
        """Run the loop, appending committed tokens to `out` and yielding after each target forward."""
        target, drafter = self.target, self.drafter
        generator = torch.Generator(device=target.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        max_new_tokens = min(max_new_tokens, target.context_length - inputs["input_ids"].shape[1])
        eos = target.eos_token_ids
        stats = self._stats = GenerationStats()
        tokenizer = target.tokenizer
        start = time.perf_counter()

        state, prefill = target.prefill(inputs)
        stats.target_forwards = 1
        token = choose_token(prefill.logits[0], sampling, generator)
        draft_state = drafter.begin(target, prefill, token) if drafter is not None else None
        stats.prefill_seconds = time.perf_counter() - start
        done = self._emit([token], out, eos, stop, max_new_tokens, tokenizer)
        stats.new_tokens, stats.seconds = len(out), time.perf_counter() - start
        paused = time.perf_counter()
        yield
        start += time.perf_counter() - paused          # time spent by the consumer between steps is not ours
        while not done:
            tick = time.perf_counter()
            forwards_before = getattr(draft_state, "forwards", 0)
            if drafter is None:
                tree = Tree.root_only(torch.tensor([token], device=target.device))
            else:
                tree = drafter.propose(draft_state, self.tree, sampling, generator)
            tock = time.perf_counter()
            verified = target.verify(state, tree)
            if sampling.greedy:
                result = verify_greedy(tree, verified.logits)
            else:
                result = verify_sampling(tree, verified.logits, sampling, generator)
            accepted = int(result.num_accepted[0])
            path = result.accepted[0, : accepted + 1].tolist()
            target.commit(state, path)
            bonus = int(result.bonus[0])
            new_tokens = tree.tokens[0, path[1:]].tolist() + [bonus]
            verify_end = time.perf_counter()
            done = self._emit(new_tokens, out, eos, stop, max_new_tokens, tokenizer)
            accept_start = time.perf_counter()
            if drafter is not None and not done:
                drafter.accept(draft_state, tree, path, verified, bonus)
            end = time.perf_counter()
            stats.target_forwards += 1
            stats.draft_seconds += (tock - tick) + (end - accept_start)
            stats.verify_seconds += verify_end - tock
            stats.accepted_per_step.append(accepted)
            stats.draft_forwards_per_step.append(getattr(draft_state, "forwards", 0) - forwards_before)
            stats.tree_nodes_per_step.append(int(tree.num_nodes[0]))
            stats.tree_depth_per_step.append(int(tree.depths()[0].max()))
            stats.new_tokens, stats.seconds = len(out), end - start
            token = bonus
            paused = time.perf_counter()
            yield
            start += time.perf_counter() - paused

    @staticmethod
    def _emit(tokens: list[int], out: list[int], eos: set[int], stop: Sequence[str], max_new_tokens: int,
              tokenizer: Any) -> bool:
        """Append tokens up to an EOS, a stop string or the budget; return True when generation is over."""
        for token in tokens:
            out.append(token)
            if token in eos or len(out) >= max_new_tokens:
                return True
            if stop:
                tail = tokenizer.decode(out[-32:], skip_special_tokens=True)
                if any(s in tail for s in stop):
                    return True
        return False


def acceptance_by_depth(accepted: Sequence[int], depths: Sequence[int]) -> list[float]:
    """rate[d-1] = (steps whose depth-d node was accepted) / (steps whose depth d-1 was accepted and whose tree
    reached depth d), from per-step accepted counts and tree depths (a tree stops below EOS and unlikely nodes)."""
    rates = []
    for depth in range(1, max(depths, default=0) + 1):
        reached = sum(a >= depth - 1 and d >= depth for a, d in zip(accepted, depths))
        rates.append(sum(a >= depth for a in accepted) / reached if reached else 0.0)
    return rates


def choose_token(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> int:
    """The target's own choice from logits [V]: argmax, or an exact sample of the warped distribution."""
    if sampling.greedy:
        return int(logits.argmax())
    probs = target_probs(logits.double(), sampling)                           # [V]
    return int(torch.multinomial(probs, 1, generator=generator))


def check_max_new_tokens(max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
