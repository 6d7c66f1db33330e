"""Prometheus metrics, in a registry of the daemon's own (not the process-global default)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    failures: Counter
    latency: Histogram
    queue_depth: Gauge
    in_flight: Gauge
    audio_seconds: Counter
    synthesis_seconds: Counter
    model_loads: Counter
    model_swaps: Counter
    signature_failures: Counter
    spool: Counter
    transitions: Counter
    voice_loads: Counter
    voice_evictions: Counter
    canary_share: Gauge

    @classmethod
    def create(cls) -> Metrics:
        r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes: what --memory-budget is measured against
        return cls(
            registry=r,
            requests=Counter(
                "ttsd_requests",
                "Synthesis requests by voice, version, front end and outcome",
                ["voice", "version", "route", "outcome"],
                registry=r,
            ),
            failures=Counter(
                "ttsd_request_failures",
                "Failed requests by whose fault: request (4xx, never "
                "counted against a model), model (counted) or system (disk, memory; retried)",
                ["voice", "version", "route", "fault"],
                registry=r,
            ),
            latency=Histogram(
                "ttsd_request_seconds",
                "Time from request accepted to last audio byte",
                ["voice", "route"],
                registry=r,
                buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            ),
            queue_depth=Gauge("ttsd_queue_depth", "Requests waiting for a synthesis worker", registry=r),
            in_flight=Gauge("ttsd_requests_in_flight", "Requests being synthesized", registry=r),
            audio_seconds=Counter("ttsd_audio_seconds", "Seconds of audio produced", ["voice", "version"], registry=r),
            # over audio_seconds, per version, this is the real-time factor (the Grafana dashboard's)
            synthesis_seconds=Counter(
                "ttsd_synthesis_seconds",
                "Seconds spent synthesizing (from a worker taking "
                "the request to its last audio, queueing not included)",
                ["voice", "version"],
                registry=r,
            ),
            model_loads=Counter(
                "ttsd_model_loads", "Model versions loaded, by outcome", ["voice", "outcome"], registry=r
            ),
            signature_failures=Counter(
                "ttsd_signature_failures",
                "Model versions refused for their signature "
                "(--trusted-keys), by reason: unsigned, unknown_key, invalid, mismatch, "
                "unsupported",
                ["voice", "reason"],
                registry=r,
            ),
            model_swaps=Counter("ttsd_model_swaps", "Active-version swaps", ["voice"], registry=r),
            spool=Counter("ttsd_spool_requests", "Spool requests by outcome", ["outcome"], registry=r),
            transitions=Counter(
                "ttsd_model_transitions",
                "Model version state transitions (a rollback, by "
                'the operator, automatic or a failed canary, is event="rolled_back")',
                ["voice", "event"],
                registry=r,
            ),
            voice_loads=Counter(
                "ttsd_voice_loads",
                "Voices loaded because a request needed them while they were unloaded (memory budget misses)",
                ["voice"],
                registry=r,
            ),
            voice_evictions=Counter(
                "ttsd_voice_evictions", "Idle versions unloaded to stay within the memory budget", ["voice"], registry=r
            ),
            canary_share=Gauge(
                "ttsd_canary_share",
                "Share of a voice's requests its canary version is given (0 when it has none)",
                ["voice"],
                registry=r,
            ),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
