"""The one generation loop, for one request or many at once. Plain decoding is the same loop with no drafter:
every tree is just its root.

One engine step, over the B running requests (rows):
    draft_batch.propose → each row's tree (its own tree and choice rule; the feature drafters run each draft level
                          for all rows in one forward)
    target.verify(all rows' trees, stacked)             one target forward
    for each row: verify(tree, the row's scores)         its own settings and seed (`Sampler`)
    target.commit_rows                                    in-place gather of each row's accepted path
    for each row: emit (EOS / stop / budget) → drafter.accept → stats
Between steps the scheduler retires finished or cancelled rows (their cache rows are freed by packing) and
admits waiting requests (continuous batching): an admitted request is prefilled alone (vision once, the model's
own causal mask), emits its first token, and joins the batch as a new cache row.

Why each row stays lossless: a row's tokens are chosen only from its own logits, by its own `Sampler` (argmax, or
argmax of warped logits plus the Gumbel noise its seed fixes per answer position), whatever was drafted; the
batched forward gives each row exactly its own attention (its prefix and its tree's ancestors, through the 4D
mask) at its own positions. Drafting only shapes the tree. So a request's output is the same in a batch as alone,
and the same with any drafter or tree as plain decoding, greedy or seeded, up to floating-point rounding of the
target's forward, which can flip a near-tie (docs/engine.md). That is also why the tree may change from step to
step with load and answer length (`TreeBudget`) without changing any output.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image

from vlmspec.budget import TreeBudget
from vlmspec.drafters.base import Drafter
from vlmspec.inputs import Messages
from vlmspec.request import (Chunk, GenerationResult, GenerationStats, Request, RequestCancelled,  # noqa: F401
                             acceptance_by_depth)
from vlmspec.target import NodesOutput, Target
from vlmspec.target.base import TargetState
from vlmspec.tree import Tree, TreeConfig
from vlmspec.verify import SamplingConfig, verify


log = logging.getLogger(__name__)


class Engine:
    """Continuous batching of speculative (or, with `drafter=None`, plain) generation over one target.

    `submit` validates and encodes a request and queues it; `step` runs one scheduler iteration; `start` runs
    steps in a background thread (servers); without it, reading a request's stream drives the steps."""

    def __init__(self, target: Target, drafter: Drafter | None = None, tree: TreeConfig | None = None,
                 max_batch: int = 16, budget: TreeBudget | None | bool = True):
        """`budget`: the per-step tree choice at batch >= 2 and for a request's first step (`budget.TreeBudget`);
        True: a new one, False/None: always the configured tree."""
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.target = target
        self.drafter = drafter
        self.tree = tree or TreeConfig()
        self.max_batch = max_batch
        if budget is True:
            budget = TreeBudget(self.tree)
        self.budget = budget if drafter is not None and budget else None
        self.running: list[Request] = []                 # row b of `self.state` is running[b]
        self.state = TargetState.empty(target.num_layers, target.device)
        self.draft_batch = drafter.new_batch() if drafter is not None else None   # the rows' draft states, in order
        self._waiting: deque[Request] = deque()
        self._ids = itertools.count()
        self._queue_lock = threading.Lock()              # guards `_waiting` (submit/cancel come from any thread)
        self._step_lock = threading.Lock()               # one step at a time
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._eos = target.eos_token_ids

    # ------------------------------------------------------------------ requests
    @property
    def context_length(self) -> int:
        return self.target.context_length

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def submit(self, images: Sequence[Image.Image | str | Path] | None = None, prompt: str | None = None,
               messages: Messages | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: Sequence[str] = ()) -> Request:
        """Queue a request (`Generator.generate`'s arguments); bad input raises ValueError here."""
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k)
        check_max_new_tokens(max_new_tokens)
        return self.submit_inputs(self.target.encode(images, prompt, messages), max_new_tokens, sampling, seed, stop)

    def submit_inputs(self, inputs: dict[str, torch.Tensor], max_new_tokens: int, sampling: SamplingConfig,
                      seed: int | None = None, stop: Sequence[str] = ()) -> Request:
        """`submit` on already encoded inputs (`Target.encode`)."""
        if isinstance(stop, str):
            stop = (stop,)
        if self._stopping:
            raise RuntimeError("the engine is stopping: no new requests")
        room = min(max_new_tokens, self.context_length - inputs["input_ids"].shape[1])   # the context bounds it
        request = Request(self, next(self._ids), inputs, room, sampling, seed, stop)
        with self._queue_lock:
            self._waiting.append(request)
        self._wakeup.set()
        return request

    def cancel(self, request: Request) -> None:
        """Cancel a request: it leaves the batch (its cache rows freed) before the next step; others go on."""
        request.cancel_requested = True
        with self._queue_lock:
            if request in self._waiting:
                self._waiting.remove(request)
                request.finish(self.target.tokenizer, "cancelled")
        self._wakeup.set()

    # ------------------------------------------------------------------ running
    def step(self) -> bool:
        """One scheduler iteration: retire cancelled rows, admit waiting requests, one decode step over the
        batch, retire finished rows. Returns False when there was nothing to do."""
        with self._step_lock, torch.no_grad():
            self._retire(cancelled_only=True)
            self._admit()
            if not self.running:
                return False
            self._decode_step()
            self._retire()
            return True

    def drive_until(self, request: Request) -> bool:
        """Run a step on behalf of a reader waiting for `request` (no engine thread); False if the engine's
        thread runs the steps instead."""
        if self.running_in_thread:
            return False
        if not self.step() and not request.done:
            raise RuntimeError(f"request {request.id} is neither running nor waiting")
        return True

    def run(self, requests: Sequence[Request]) -> list[GenerationResult]:
        """Wait for (or, without a thread, drive the engine until) `requests` are done; their results in order
        (every step advances all rows, so waiting on one request runs the others too)."""
        return [request.result() for request in requests]

    @property
    def running_in_thread(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Engine":
        """Run the scheduler in a background thread until `stop`."""
        if self.running_in_thread:
            return self
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="vlmspec-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, cancel: bool = True) -> None:
        """Stop admitting; cancel (or, with `cancel=False`, finish) what is queued and running; join the thread."""
        self._stopping = True
        if cancel:
            with self._queue_lock:
                pending = list(self._waiting) + list(self.running)
            for request in pending:
                self.cancel(request)
            if not self.running_in_thread:
                with self._step_lock:
                    self._retire(cancelled_only=True)
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                worked = self.step()
            except Exception as error:      # a failed step must not leave its requests waiting forever
                log.exception("engine step failed; failing its requests")
                self._fail_all(error)
                continue
            if not worked:
                if self._stopping and not self._waiting:
                    return
                self._wakeup.wait(timeout=0.5)

    def _fail_all(self, error: Exception) -> None:
        """End every queued and running request with the error and start from an empty batch."""
        with self._step_lock, self._queue_lock:
            failed = list(self._waiting) + self.running
            self._waiting.clear()
            self.running = []
            self.state = TargetState.empty(self.target.num_layers, self.target.device)
            self.draft_batch = self.drafter.new_batch() if self.drafter is not None else None
        for request in failed:
            if not request.done:
                request.error = f"{type(error).__name__}: {error}"
                request.finish(self.target.tokenizer, "error")

    # ------------------------------------------------------------------ scheduling
    def _admit(self) -> None:
        while len(self.running) < self.max_batch:
            with self._queue_lock:
                if not self._waiting:
                    return
                request = self._waiting.popleft()
            self._prefill(request)

    def _prefill(self, request: Request) -> None:
        """Run the prompt alone into a new row, emit the first token, and keep the row unless the request is done."""
        target, drafter = self.target, self.drafter
        start = time.perf_counter()
        room = request.max_new_tokens + self.tree.total_tokens + self.tree.depth + 1   # the answer and a tree
        _, prefill = target.prefill(request.inputs, into=self.state, room=room)
        token = int(request.target_scores(prefill.logits[0][None], [0])[0].argmax())
        if drafter is not None:
            request.draft_state = drafter.begin(target, prefill, token)
        request.root_token = token
        request.stats.target_forwards = 1
        request.emit([token], [0], self._eos, target.tokenizer)
        if request.finish_reason is None:
            self.running.append(request)
            if drafter is not None:
                self.draft_batch.add(request.draft_state)
        else:
            self.state.remove_row(self.state.rows - 1)
        request.stats.prefill_seconds = request.stats.seconds = time.perf_counter() - start
        if request.finish_reason is not None:
            request.finish(target.tokenizer)
            if self.budget is not None:
                self.budget.finished(len(request.token_ids))

    def _retire(self, cancelled_only: bool = False) -> None:
        """Drop finished (or only cancelled) rows; the last row moves into each freed slot."""
        for row in reversed(range(len(self.running))):
            request = self.running[row]
            cancelled = request.cancel_requested and request.finish_reason is None
            if not cancelled and (cancelled_only or request.finish_reason is None):
                continue
            self.state.remove_row(row)
            if self.draft_batch is not None:
                self.draft_batch.remove(row)
            self.running[row] = self.running[-1]
            self.running.pop()
            request.finish(self.target.tokenizer, "cancelled" if cancelled else None)
            if self.budget is not None and not cancelled:
                self.budget.finished(len(request.token_ids))

    # ------------------------------------------------------------------ the step
    def _decode_step(self) -> None:
        target, drafter, rows = self.target, self.drafter, self.running
        start = time.perf_counter()
        arm = self.budget.choose(len(rows)) if self.budget is not None and len(rows) > 1 else None
        tree_config = self.tree if arm is None else self.budget.arms(len(rows))[arm]
        forwards_before = [getattr(request.draft_state, "forwards", 0) for request in rows]
        drafted: list[Tree | None] = [None] * len(rows)
        if drafter is not None:
            configs = [self._row_tree(request, tree_config) for request in rows]
            drafted = self.draft_batch.propose(configs, [request.child_scores for request in rows])
            for request, config in zip(rows, configs):
                request.drafted = request.drafted or config is not None
        trees = [tree if tree is not None else Tree.root_only(torch.tensor([request.root_token], device=target.device))
                 for tree, request in zip(drafted, rows)]
        draft_seconds = time.perf_counter() - start
        verify_start = time.perf_counter()
        verified = target.verify(self.state, Tree.stack(trees))
        results = []
        for row, (request, tree) in enumerate(zip(rows, trees)):
            scores = request.target_scores(verified.logits[row, : tree.max_nodes], tree.depths()[0])
            results.append(verify(tree, scores[None]))                              # scores: [1, n, V]
        target.commit_rows(self.state, [result.path(0) for result in results])
        verify_seconds = time.perf_counter() - verify_start
        step_tokens = 0
        for row, (request, tree, result) in enumerate(zip(rows, trees, results)):
            tick = time.perf_counter()
            emitted = result.emitted(tree, 0)
            step_tokens += len(emitted)
            accepted = len(emitted) - 1
            draft_state = request.draft_state
            request.emit(emitted, list(range(1, accepted + 1)) + [0], self._eos, target.tokenizer)
            if drafter is not None and request.finish_reason is None:
                drafter.accept(request.draft_state, tree, result.path(0), row_view(verified, row, tree.max_nodes),
                               emitted[-1])
            request.root_token = emitted[-1]
            stats = request.stats
            stats.target_forwards += 1
            stats.draft_seconds += draft_seconds + time.perf_counter() - tick
            stats.verify_seconds += verify_seconds
            stats.accepted_per_step.append(accepted)
            stats.draft_forwards_per_step.append(getattr(draft_state, "forwards", 0) - forwards_before[row])
            stats.tree_nodes_per_step.append(int(tree.num_nodes[0]))
            stats.tree_depth_per_step.append(int(tree.depths()[0].max()))
            stats.batch_size_per_step.append(len(rows))
        elapsed = time.perf_counter() - start
        for request in rows:
            request.stats.seconds += elapsed
        if arm is not None:
            self.budget.record(len(rows), arm, step_tokens, elapsed)

    def _row_tree(self, request: Request, tree: TreeConfig | None) -> TreeConfig | None:
        """A row's tree this step: none where drafting cannot win (fewer than two tokens left to the budget, or
        recent answers say this one is about to end: `TreeBudget.continues`), else `tree` no deeper than the
        tokens left."""
        emitted = len(request.token_ids)
        left = request.max_new_tokens - emitted
        if tree is None or left < 2 or (self.budget is not None and
                                          not self.budget.continues(emitted, first=not request.drafted)):
            return None
        return tree if tree.depth < left else dataclasses.replace(tree, depth=left - 1)


def row_view(verified: NodesOutput, row: int, nodes: int) -> NodesOutput:
    """Row `row`'s first `nodes` nodes of a batched verify output, as a batch-1 output (views, no copies)."""
    return NodesOutput(logits=verified.logits[row: row + 1, :nodes],
                       hidden_states=tuple(h[row: row + 1, :nodes] for h in verified.hidden_states),
                       positions=verified.positions[..., row: row + 1, :nodes])


class Generator:
    """Speculative (or, with `drafter=None`, plain) generation with a target and a drafter: one request at a time
    (`generate`, `stream`) or many at once (`generate_batch`, or `engine()` for servers). Re-entrant: every call
    runs on its own `Engine` and gets its own stats."""

    def __init__(self, target: Target, drafter: Drafter | None = None, tree: TreeConfig | None = None,
                 pick_tree: Callable[[int], TreeConfig | None] | None = None):
        """`pick_tree(batch)`: the tree the budget tries beside `tree` at that batch size under load (`TreeBudget`'s
        `pick`; None: half of `tree`)."""
        self.target = target
        self.drafter = drafter
        self.tree = tree or TreeConfig()
        self.budget = TreeBudget(self.tree, pick=pick_tree)    # what the batched steps measured, kept across calls

    def engine(self, max_batch: int = 16) -> Engine:
        """A batched engine over this generator's target, drafter and tree."""
        return Engine(self.target, self.drafter, self.tree, max_batch=max_batch, budget=self.budget)

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
        return self.engine(1).submit(images, prompt, messages, max_new_tokens, temperature, top_p, top_k, seed,
                                     stop).stream()

    def stream_inputs(self, inputs: dict[str, torch.Tensor], max_new_tokens: int, sampling: SamplingConfig,
                      seed: int | None = None, stop: Sequence[str] = ()) -> Iterator[str | GenerationResult]:
        """`stream` on already encoded inputs (`Target.encode`)."""
        return self.engine(1).submit_inputs(inputs, max_new_tokens, sampling, seed, stop).stream()

    def generate_batch(self, requests: Sequence[dict[str, Any]], max_batch: int = 16) -> list[GenerationResult]:
        """Run many requests together (each a dict of `generate`'s keyword arguments); results in order, each
        what `generate` returns for it alone. Bad input in any request raises before anything runs."""
        engine = self.engine(max_batch)
        handles = []
        for index, kwargs in enumerate(requests):
            try:
                handles.append(engine.submit(**kwargs))
            except (TypeError, ValueError) as error:
                raise ValueError(f"request {index}: {error}") from None
        return engine.run(handles)


def check_max_new_tokens(max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
