"""OpenAI response objects (chat.completion and chat.completion.chunk) with the `vlmspec` extension field:
per answer τ, accepted draft tokens and target forwards; per streamed chunk, each token's id, text piece and
source (d >= 1: an accepted draft token at tree depth d; 0: the target's own token); the finishing chunk's
extension has the answer's numbers and `rest`, text the pieces held back (a last token ending inside a character)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from vlmspec import GenerationResult

EXTENSION = "vlmspec"


def finish_reason(result: GenerationResult) -> str:
    # The engine's "stop" covers EOS and stop strings, as OpenAI's does; "length" is the token budget.
    return "length" if result.finish_reason == "length" else "stop"


def answer_stats(result: GenerationResult) -> dict[str, Any]:
    stats = result.stats
    # Counted from the emitted tokens' sources, as τ is: a step cut short by EOS or the budget accepted more
    # draft tokens than it emitted.
    return {"tau": stats.tau, "accepted_draft_tokens": sum(source > 0 for source in stats.token_sources),
            "target_forwards": stats.target_forwards, "accepted_by_depth": stats.accepted_by_depth,
            "seconds": stats.seconds}


def usage(prompt_tokens: int, result: GenerationResult) -> dict[str, int]:
    completion = len(result.token_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


@dataclass(frozen=True)
class Reply:
    """The identity every object of one answer shares."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{secrets.token_hex(12)}")
    created: int = field(default_factory=lambda: int(time.time()))

    def completion(self, result: GenerationResult, prompt_tokens: int) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": finish_reason(result), "logprobs": None}],
                "usage": usage(prompt_tokens, result), EXTENSION: answer_stats(result)}

    def chunk(self, delta: dict[str, Any], finish: str | None = None, extension: dict[str, Any] | None = None,
              with_usage: bool = False) -> dict[str, Any]:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if with_usage:                       # OpenAI sends usage: null on every chunk before the usage chunk
            chunk["usage"] = None
        if extension is not None:
            chunk[EXTENSION] = extension
        return chunk

    def usage_chunk(self, result: GenerationResult, prompt_tokens: int) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage(prompt_tokens, result)}
