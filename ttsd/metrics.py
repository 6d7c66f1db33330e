"""Prometheus metrics, in a registry of the daemon's own (not the process-global default).

Renamed: ``ttsd_request_seconds`` is ``ttsd_request_duration_seconds`` (Prometheus names a
duration by its unit, and it gained a ``version`` label: canary against stable). The old name is
still exported in this release, marked deprecated in its HELP, and goes in the next; a recording
rule or a dashboard query on it should move to the new name now.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from . import __version__

# A ``*_created`` series beside every counter and histogram doubles what each box sends and no
# dashboard reads it (Prometheus finds resets by itself). Process-wide in prometheus_client: ttsd
# owns its process.
disable_created_metrics()

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
FIRST_AUDIO_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    failures: Counter
    latency: Histogram
    latency_deprecated: Histogram
    first_audio: Histogram
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
    box_info: Gauge

    @classmethod
    def create(cls) -> Metrics:
        r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes: what --memory-budget is measured against
        _build_info(r)
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
                "ttsd_request_duration_seconds",
                "Time from request accepted to last audio byte",
                ["voice", "version", "route"],
                registry=r,
                buckets=LATENCY_BUCKETS,
            ),
            latency_deprecated=Histogram(
                "ttsd_request_seconds",
                "DEPRECATED, removed in the next release: ttsd_request_duration_seconds",
                ["voice", "route"],
                registry=r,
                buckets=LATENCY_BUCKETS,
            ),
            first_audio=Histogram(
                "ttsd_time_to_first_audio_seconds",
                "Time from request accepted to its first audio (the first piece a streamed request "
                "sends; what a listener waits before hearing anything)",
                ["voice", "version"],
                registry=r,
                buckets=FIRST_AUDIO_BUCKETS,
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
            box_info=Gauge(
                "ttsd_box_info",
                "Always 1: this box's id in the fleet (--box-id, else derived from the machine id, "
                "which is never exported), the key a staged rollout picks boxes by",
                ["box"],
                registry=r,
            ),
        )

    def identify(self, box: str) -> None:
        """Export ``box`` as this daemon's id (``ttsd_box_info``); the daemon calls it once at
        start, when the id is resolved (``ttsd.fetch.box``). Until then the metric has no sample."""
        self.box_info.clear()
        self.box_info.labels(box).set(1)

    def forget_version(self, voice: str, version: str) -> None:
        """Drop every series of ``voice`` ``version`` (it no longer serves: unloaded, neither active
        nor a canary). Each version that served added some thirty series that stayed for the
        daemon's life: 1,000 upgrades made a 5 MB scrape that held the event loop 0.66 s. A version
        that serves again starts its series afresh, which Prometheus reads as a counter reset."""
        for metric in (
            self.requests,
            self.failures,
            self.latency,
            self.first_audio,
            self.audio_seconds,
            self.synthesis_seconds,
        ):
            names = metric._labelnames  # (prometheus_client keeps them there; no public accessor)
            found = {
                tuple(sample.labels[n] for n in names)
                for family in metric.collect()
                for sample in family.samples
                if sample.labels.get("voice") == voice and sample.labels.get("version") == version
            }
            for values in found:
                with contextlib.suppress(KeyError):  # (removed meanwhile by another thread)
                    metric.remove(*values)

    def observe_request(self, voice: str, version: str, route: str, seconds: float) -> None:
        """A request's whole time, under its new name and (this release) its old one."""
        self.latency.labels(voice, version, route).observe(seconds)
        self.latency_deprecated.labels(voice, route).observe(seconds)

    def watch_voices(self, snapshot: Callable[[], list[dict[str, Any]]]) -> None:
        """Export, at each scrape, what ``snapshot`` (the manager's voice listing) says now."""
        self.registry.register(_VoicesCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _build_info(registry: CollectorRegistry) -> None:
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = ""
    info = Gauge(
        "ttsd_build_info",
        "Always 1: this daemon's ttsd, Python and torch versions, and CPU architecture",
        ["version", "python", "torch", "machine"],
        registry=registry,
    )
    info.labels(__version__, platform.python_version(), torch, platform.machine()).set(1)


class _VoicesCollector(Collector):
    """Which version of each voice this box serves, and what its loaded versions cost, read from
    the manager at scrape time (a gauge set on each change could miss one, or keep a version
    that is gone)."""

    def __init__(self, snapshot: Callable[[], list[dict[str, Any]]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        serving = GaugeMetricFamily(
            "ttsd_voice_version_info",
            "Always 1: the version of a voice that serves, by role (active, or canary during one)",
            labels=["voice", "version", "role"],
        )
        memory = GaugeMetricFamily(
            "ttsd_voice_memory_bytes",
            "Resident memory a loaded version added when it loaded (measured around its load)",
            labels=["voice", "version"],
        )
        for voice in self._snapshot():
            for role in ("active", "canary"):
                if voice.get(role):
                    serving.add_metric([voice["name"], voice[role], role], 1)
            for version in voice.get("versions", []):
                if version.get("rss_bytes") and version.get("state") in ("active", "canary", "standby"):
                    memory.add_metric([voice["name"], version["version"]], version["rss_bytes"])
        yield serving
        yield memory

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only; nothing to check at registration
