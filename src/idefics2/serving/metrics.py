"""Prometheus metrics of the server, under vLLM's names so that existing dashboards read them.

Gauges are read from the engine when scraped; latencies are observed as each request's events
arrive on the event loop. Each app has its own registry (several apps may live in one process).
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from idefics2.generation.engine import Engine, EngineRequest, TokenEvent

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, engine: Engine) -> None:
        self.registry = registry = CollectorRegistry()
        labels = ["model_name"]

        def gauge(name: str, doc: str, read: object) -> None:
            Gauge(name, doc, labels, registry=registry).labels(model_name).set_function(read)  # type: ignore[arg-type]

        gauge("vllm:num_requests_running", "Sequences decoding in the running batch.", lambda: engine.num_running)
        gauge("vllm:num_requests_waiting", "Requests waiting to be admitted.", lambda: engine.num_waiting)
        gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache positions in use (1 = full).",
              lambda: engine.cache_usage)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=registry).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between a sequence's tokens.", labels,
                             buckets=_LATENCY_BUCKETS, registry=registry).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             labels, buckets=_LATENCY_BUCKETS, registry=registry).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished sequences.", labels,
                                     registry=registry).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels,
                                         registry=registry).labels(model_name)
        self.success = Counter("vllm:request_success", "Finished sequences, by finish reason.",
                               [*labels, "finished_reason"], registry=registry)
        self.model_name = model_name

    def token(self, request: EngineRequest, event: TokenEvent, last: float | None) -> float:
        """Observe one event of `request` whose previous token came at `last`; returns now."""
        now = time.monotonic()
        if last is None:
            self.ttft.observe(now - request.submitted_at)
        else:
            self.itl.observe(now - last)
        if event.token >= 0:
            self.generation_tokens.inc()
        return now

    def finished(self, request: EngineRequest, prompt_tokens: int, reason: str) -> None:
        self.e2e.observe(time.monotonic() - request.submitted_at)
        self.prompt_tokens.inc(prompt_tokens)
        self.success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
