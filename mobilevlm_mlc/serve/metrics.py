"""The server's Prometheus metrics, in a registry of its own (one per app: tests start several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "mobilevlm_requests", "Chat completion requests answered, by HTTP status", ["status"], registry=registry
        )
        self.prompt_tokens = Counter(
            "mobilevlm_prompt_tokens", "Prompt tokens of accepted requests (image tokens included)", registry=registry
        )
        self.cached_prompt_tokens = Counter(
            "mobilevlm_prompt_tokens_cached",
            "Prompt tokens not prefilled: their KV pages were shared from the prefix cache",
            registry=registry,
        )
        self.cached_sequences = Gauge(
            "mobilevlm_prefix_cache_sequences", "Finished sequences kept in the KV cache for reuse", registry=registry
        )
        self.generation_tokens = Counter("mobilevlm_generation_tokens", "Tokens generated", registry=registry)
        self.running = Gauge("mobilevlm_running_sequences", "Sequences being decoded", registry=registry)
        self.waiting = Gauge("mobilevlm_waiting_requests", "Requests queued for admission", registry=registry)
        self.kv_free_pages = Gauge(
            "mobilevlm_kv_cache_free_pages",
            "Free pages of the paged KV cache (kept prefix-cache sequences give theirs back when a request needs them)",
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "mobilevlm_time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_per_output_token = Histogram(
            "mobilevlm_time_per_output_token_seconds",
            "Between consecutive generated tokens of one request",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
