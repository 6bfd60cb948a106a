"""Prometheus metrics of one replica (its own registry, so several apps never clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gear_dist.engine import EngineStats

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gear_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"], registry=r)
        self.ttft = Histogram("gear_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY, registry=r)
        self.tpot = Histogram("gear_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_LATENCY, registry=r)
        self.tokens = Counter("gear_generated_tokens", "Completion tokens produced", registry=r)
        self.waiting = Gauge("gear_queue_length", "Requests waiting for memory or a batch slot", registry=r)
        self.running = Gauge("gear_running_sequences", "Sequences decoding", registry=r)
        self.kv_used = Gauge("gear_kv_bytes_in_use", "KV bytes held by running sequences (per rank)", registry=r)
        self.kv_capacity = Gauge("gear_kv_bytes_capacity", "KV bytes allocated (per rank)", registry=r)
        self.kv_tokens = Gauge("gear_kv_capacity_tokens", "Tokens the KV memory holds", registry=r)
        self.ratio = Gauge("gear_compression_ratio", "fp16 bytes of the tokens held / bytes they take", registry=r)
        self.preemptions = Gauge("gear_preemptions", "Sequences preempted and recomputed so far", registry=r)

    def observe_engine(self, s: EngineStats) -> None:
        self.waiting.set(s.waiting)
        self.running.set(s.running)
        self.kv_used.set(s.kv_bytes_in_use)
        self.kv_capacity.set(s.kv_bytes_capacity)
        self.kv_tokens.set(s.kv_capacity_tokens)
        self.ratio.set(s.compression_ratio)
        self.preemptions.set(s.preemptions)

    def render(self) -> bytes:
        return generate_latest(self.registry)
