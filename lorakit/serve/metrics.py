"""Prometheus metrics, per adapter (label `model`: the adapter's name or the base's id) and per engine.

Each server gets its own CollectorRegistry, so several servers in one process (tests) never share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        m = ["model"]
        self.requests = Counter("lorakit_requests", "Requests received, per model", m, registry=r)
        self.errors = Counter("lorakit_request_errors", "Requests answered with an error", m + ["code"], registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens processed", m, registry=r)
        self.generated_tokens = Counter("lorakit_generation_tokens", "Tokens generated", m, registry=r)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "Time to first token", m, buckets=_LATENCY,
                              registry=r)
        self.latency = Histogram("lorakit_request_latency_seconds", "Total request latency", m, buckets=_LATENCY,
                                 registry=r)
        self.queue_depth = Gauge("lorakit_queue_depth", "Requests waiting to start", registry=r)
        self.running = Gauge("lorakit_running_sequences", "Sequences in the running batch", registry=r)
        self.batch_size = Histogram("lorakit_batch_size", "Rows per forward (a decode step, or an "
                                    "embeddings/classify batch)", buckets=_BATCH, registry=r)
        self.batch_adapters = Histogram("lorakit_batch_distinct_adapters", "Distinct adapters (base included) per "
                                        "forward", buckets=_BATCH, registry=r)
        self.adapter_hits = Counter("lorakit_adapter_cache_hits", "Requests whose adapter was loaded", registry=r)
        self.adapter_misses = Counter("lorakit_adapter_cache_misses", "Requests that had to load their adapter",
                                      registry=r)
        self.loads = Counter("lorakit_adapter_loads", "Adapters installed", registry=r)
        self.load_failures = Counter("lorakit_adapter_load_failures", "Adapter files that failed validation",
                                     registry=r)
        self.evictions = Counter("lorakit_adapter_evictions", "Adapters evicted by the LRU", registry=r)
        self.unloaded_bytes = Counter("lorakit_adapter_unloaded_bytes", "Bytes of adapter tensors freed", registry=r)
        self.loaded = Gauge("lorakit_adapters_loaded", "Adapters in memory", registry=r)
        self.prompt_cache_hits = Counter("lorakit_prompt_cache_hits", "Prefills skipped by the prompt cache "
                                         "(keyed by adapter + tokens)", registry=r)
        self.cancelled = Counter("lorakit_requests_cancelled", "Requests cancelled (disconnect, timeout)",
                                 registry=r)
        self.rejected = Counter("lorakit_requests_rejected", "Requests refused: queue full or draining",
                                ["reason"], registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
