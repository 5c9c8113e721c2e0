"""One request of the batched engine: its settings, its own choice rule (`Sampler`), its output so far and its stream.

A `Request` is both the engine's per-row record (what the scheduler reads and writes between steps) and the
caller's handle (`stream`, `events`, `result`, their async forms). The engine puts a `Chunk` on the request's
queue after every step that emitted tokens, and the `GenerationResult` last. Without a running engine thread,
reading a handle drives the engine (`Engine.step`) until the handle has something to return.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Sequence

import torch

from vlmspec.verify import Sampler, SamplingConfig

if TYPE_CHECKING:
    from vlmspec.engine import Engine


@dataclass
class GenerationStats:
    """Counters of one generation. τ = new_tokens / target_forwards (prefill included; plain decoding: τ = 1).
    `accepted_by_depth[d-1]` = steps where a depth-d node was accepted / steps where depth d-1 was.
    `token_sources[i]`: d >= 1 if emitted token i was an accepted draft token at depth d, 0 if it was the
    target's own token (the prefill's token or a step's bonus). Times are the seconds of the engine steps this
    request took part in (a batched step counts whole for every row in it); waiting to be admitted is excluded."""

    new_tokens: int = 0
    prompt_tokens: int = 0
    target_forwards: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    prefill_seconds: float = 0.0
    seconds: float = 0.0
    accepted_per_step: list[int] = field(default_factory=list)
    draft_forwards_per_step: list[int] = field(default_factory=list)
    tree_nodes_per_step: list[int] = field(default_factory=list)
    tree_depth_per_step: list[int] = field(default_factory=list)
    batch_size_per_step: list[int] = field(default_factory=list)
    token_sources: list[int] = field(default_factory=list)

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
    finish_reason: str = "stop"          # "stop" (EOS or a stop string), "length" (budget), "cancelled", "error"

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "stats": self.stats.to_dict()}


@dataclass(frozen=True)
class Chunk:
    """What one engine step added to a request: the new text piece ("" while a UTF-8 sequence is incomplete),
    the new token ids, and each token's source (d >= 1: accepted draft token at depth d; 0: the target's own)."""

    text: str
    token_ids: list[int]
    sources: list[int]


class RequestCancelled(RuntimeError):
    """`result()` of a request that was cancelled before it finished."""


def acceptance_by_depth(accepted: Sequence[int], depths: Sequence[int]) -> list[float]:
    """rate[d-1] = (steps whose depth-d node was accepted) / (steps whose depth d-1 was accepted and whose tree
    reached depth d), from per-step accepted counts and tree depths (a tree stops below EOS and unlikely nodes)."""
    rates = []
    for depth in range(1, max(depths, default=0) + 1):
        reached = sum(a >= depth - 1 and d >= depth for a, d in zip(accepted, depths))
        rates.append(sum(a >= depth for a in accepted) / reached if reached else 0.0)
    return rates


_END = object()


class Request:
    """A request's settings and decode state (engine side) and its stream (caller side)."""

    def __init__(self, engine: "Engine", request_id: int, inputs: dict, max_new_tokens: int,
                 sampling: SamplingConfig, seed: int | None, stop: Sequence[str]):
        self.engine = engine
        self.id = request_id
        self.inputs = inputs
        self.prompt_tokens = int(inputs["input_ids"].shape[1])
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.sampler = Sampler(sampling, seed)
        self.stop = tuple(stop)
        self.token_ids: list[int] = []
        self.stats = GenerationStats(prompt_tokens=self.prompt_tokens)
        self.finish_reason: str | None = None
        self.error: str | None = None             # why the engine failed this request (finish_reason "error")
        self.cancel_requested = False
        self.root_token = -1                     # the last verified token: the next tree's root
        self.drafted = False                     # a step of this request has drafted (the drafter caught up)
        self.draft_state: Any = None
        self._text = ""
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None   # set by `aevents`
        self._finished = threading.Event()          # set once the result and the end are published
        self._end_read = False                      # `events` has read the end of the stream
        self._result: GenerationResult | None = None

    # ------------------------------------------------------------------ engine side
    def child_scores(self, logits: torch.Tensor, depth: int) -> torch.Tensor:
        """What the children of tree nodes at `depth` are chosen by (`ChildScores`): they are answer position
        len(token_ids) + depth (the root, depth 0, is the last emitted token)."""
        return self.target_scores(logits, [depth] * logits.shape[0])

    def target_scores(self, logits: torch.Tensor, depths: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The target's logits [n, V] after nodes of these tree depths → what the request chooses by."""
        if self.sampling.greedy:
            return logits
        if isinstance(depths, torch.Tensor):
            depths = depths.tolist()                                             # one host read, not one per node
        return self.sampler.scores(logits, [len(self.token_ids) + depth for depth in depths])

    def emit(self, tokens: list[int], sources: list[int], eos: set[int], tokenizer: Any) -> None:
        """Append tokens up to an EOS, a stop string or the budget (setting `finish_reason`), and publish them."""
        taken = 0
        for token in tokens:
            self.token_ids.append(token)
            taken += 1
            if token in eos:
                self.finish_reason = "stop"
            elif len(self.token_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
            elif self.stop and any(s in tokenizer.decode(self.token_ids[-32:], skip_special_tokens=True)
                                   for s in self.stop):
                self.finish_reason = "stop"
            if self.finish_reason:
                break
        self.stats.token_sources += sources[:taken]
        self.stats.new_tokens = len(self.token_ids)
        full = tokenizer.decode(self.token_ids, skip_special_tokens=True)
        piece = ""
        if not full.endswith("\ufffd"):          # an incomplete UTF-8 sequence: wait for the next token
            if len(full) > len(self._text) and full.startswith(self._text):
                piece = full[len(self._text):]
            self._text = full
        self._publish(Chunk(piece, tokens[:taken], sources[:taken]))

    def finish(self, tokenizer: Any, reason: str | None = None) -> None:
        """Close the stream with the result (`reason` overrides, e.g. "cancelled")."""
        self.finish_reason = reason or self.finish_reason or "stop"
        self._result = GenerationResult(token_ids=self.token_ids,
                                        text=tokenizer.decode(self.token_ids, skip_special_tokens=True),
                                        stats=self.stats, finish_reason=self.finish_reason)
        self.draft_state = None
        self._publish(self._result)
        self._publish(_END)
        self._finished.set()

    def _publish(self, item: Any) -> None:
        with self._lock:
            if self._async is None:
                self._queue.put(item)
                return
            loop, async_queue = self._async
        try:
            loop.call_soon_threadsafe(async_queue.put_nowait, item)
        except RuntimeError:                     # the reader's event loop has closed: nobody is listening
            pass

    # ------------------------------------------------------------------ caller side
    @property
    def done(self) -> bool:
        """The request has its result (a reader may not have read it yet)."""
        return self._result is not None

    def events(self) -> Iterator[Chunk | GenerationResult]:
        """`Chunk`s as steps commit tokens, then the `GenerationResult`."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if self._end_read:
                    return
                if self.engine.drive_until(self):
                    continue
                item = self._queue.get()         # the engine's thread delivers
            if item is _END:
                self._end_read = True
                return
            yield item

    def stream(self) -> Iterator[str | GenerationResult]:
        """Text pieces as tokens are committed, then the `GenerationResult` (what `Generator.stream` yields)."""
        for item in self.events():
            if isinstance(item, GenerationResult):
                yield item
            elif item.text:
                yield item.text

    async def aevents(self) -> AsyncIterator[Chunk | GenerationResult]:
        """`events` for asyncio code; needs the engine's thread (`Engine.start`)."""
        if not self.engine.running_in_thread:
            raise RuntimeError("async streaming needs a started engine (Engine.start())")
        async_queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            while not self._queue.empty():
                async_queue.put_nowait(self._queue.get_nowait())
            self._async = (asyncio.get_running_loop(), async_queue)
        while True:
            item = await async_queue.get()
            if item is _END:
                return
            yield item

    async def astream(self) -> AsyncIterator[str | GenerationResult]:
        async for item in self.aevents():
            if isinstance(item, GenerationResult):
                yield item
            elif item.text:
                yield item.text

    def result(self) -> GenerationResult:
        """Wait for the end of the request; raises `RequestCancelled` if it was cancelled, RuntimeError if the
        engine failed it."""
        while not self._finished.is_set():      # without reading the stream: another reader may have it
            if not self.engine.drive_until(self):
                self._finished.wait()
        if self._result.finish_reason == "error":
            raise RuntimeError(f"request {self.id} failed in the engine: {self.error}")
        if self._result.finish_reason == "cancelled":
            raise RequestCancelled(f"request {self.id} was cancelled")
        return self._result

    def cancel(self) -> None:
        self.engine.cancel(self)
