"""Prometheus metrics for one server instance (its own registry, so tests can run several)."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine=None):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llmkit_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("llmkit_request_duration_seconds", "time from request to last byte",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llmkit_time_to_first_token_seconds", "time from request to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("llmkit_inter_token_seconds", "time between two tokens of one sequence",
                                     buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llmkit_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated_tokens = Counter("llmkit_generated_tokens", "tokens generated", registry=r)
        self.rejected = Counter("llmkit_rejected_requests", "requests refused because the queue was full",
                                registry=r)
        queue = Gauge("llmkit_queue_depth", "sequences waiting for a batch slot", registry=r)
        active = Gauge("llmkit_active_sequences", "sequences in the running decode batch", registry=r)
        if engine is not None:
            queue.set_function(lambda: engine.queue_depth)
            active.set_function(lambda: engine.active_count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
