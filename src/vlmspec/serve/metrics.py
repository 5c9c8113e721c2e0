"""Prometheus metrics of one server, in its own registry (no process-wide state: two apps in one process, as in
the tests, count apart)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from vlmspec import GenerationStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TAU_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)


class ServerMetrics:
    def __init__(self, running: Callable[[], float], waiting: Callable[[], float]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vlmspec_requests", "Chat completion requests by outcome (HTTP status code)",
                                ["status"], registry=r)
        Gauge("vlmspec_running_rows", "Requests the engine is decoding now", registry=r).set_function(running)
        Gauge("vlmspec_waiting_rows", "Requests queued for a slot of the engine", registry=r).set_function(waiting)
        self.prompt_tokens = Counter("vlmspec_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("vlmspec_generated_tokens", "Tokens generated", registry=r)
        self.target_forwards = Counter("vlmspec_target_forwards", "Target forwards (prefill included)", registry=r)
        self.accepted_tokens = Counter("vlmspec_accepted_draft_tokens",
                                       "Emitted accepted draft tokens, by depth in the draft tree", ["depth"], registry=r)
        self.tau = Histogram("vlmspec_tau", "Per request: new tokens / target forwards", buckets=TAU_BUCKETS,
                             registry=r)
        self.time_to_first_token = Histogram("vlmspec_time_to_first_token_seconds",
                                             "From the request's arrival to its first token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("vlmspec_request_seconds", "From the request's arrival to its last token",
                                         buckets=LATENCY_BUCKETS, registry=r)

    def finished(self, stats: GenerationStats) -> None:
        """Count a finished generation's `GenerationStats`."""
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generated_tokens.inc(stats.new_tokens)
        self.target_forwards.inc(stats.target_forwards)
        for source in stats.token_sources:                  # emitted tokens only, as τ counts them
            if source > 0:
                self.accepted_tokens.labels(depth=str(source)).inc()
        if stats.target_forwards:
            self.tau.observe(stats.tau)

    def text(self) -> bytes:
        return generate_latest(self.registry)
