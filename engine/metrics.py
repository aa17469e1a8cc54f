"""Live counters for sessions and the engine: a snapshot dict, and Prometheus text for ``/metrics``."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


class RateWindow:
    """Events per second over the last ``seconds``."""

    def __init__(self, seconds: float = 5.0) -> None:
        self.seconds = seconds
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def tick(self, now: float | None = None) -> None:
        with self._lock:
            self._times.append(time.monotonic() if now is None else now)
            self._trim(self._times[-1])

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            if len(self._times) < 2:
                return 0.0
            return (len(self._times) - 1) / max(self._times[-1] - self._times[0], 1e-9)

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] < now - self.seconds:
            self._times.popleft()


class LatencyWindow:
    """The last ``size`` latencies, for percentiles."""

    def __init__(self, size: int = 500) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(seconds)

    def summary_ms(self) -> dict[str, float]:
        with self._lock:
            values = np.array(self._values, dtype=np.float64) * 1000.0
        if not len(values):
            return {"p50": 0.0, "p95": 0.0, "max": 0.0}
        return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)),
                "max": float(values.max())}


@dataclass
class SessionMetrics:
    """Counters of one session. Each counter has one writer thread (loop or worker)."""

    frames_in: int = 0
    dropped: int = 0          # replaced in the input slot before the worker took them
    processed: int = 0        # went through the model
    skipped: int = 0          # skipped by the similarity filter (last output re-emitted)
    outputs: int = 0          # delivered to the output slot
    outputs_dropped: int = 0  # replaced in the output slot before the consumer read them
    errors: int = 0
    output_rate: RateWindow = field(default_factory=RateWindow)
    latency: LatencyWindow = field(default_factory=LatencyWindow)

    def snapshot(self) -> dict:
        return {
            "frames_in": self.frames_in, "dropped": self.dropped, "processed": self.processed,
            "skipped": self.skipped, "outputs": self.outputs, "outputs_dropped": self.outputs_dropped,
            "errors": self.errors, "output_fps": self.output_rate.rate(),
            "latency_ms": self.latency.summary_ms(),
        }


class BusyWindow:
    """Fraction of wall time the worker spent working, over the last ``seconds``."""

    def __init__(self, seconds: float = 5.0) -> None:
        self.seconds = seconds
        self._spans: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()
        self.total_busy = 0.0

    def add(self, start: float, end: float) -> None:
        with self._lock:
            self._spans.append((start, end))
            self.total_busy += end - start
            while self._spans and self._spans[0][1] < end - self.seconds:
                self._spans.popleft()

    def fraction(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        start = now - self.seconds
        with self._lock:
            busy = sum(max(0.0, e - max(s, start)) for s, e in self._spans if e > start)
        return min(1.0, busy / self.seconds)


@dataclass
class EngineMetrics:
    """Engine-wide counters, written by the worker threads and the engine."""

    unet_calls: int = 0
    sessions_opened: int = 0
    sessions_closed: int = 0
    sessions_rejected: int = 0
    sessions_expired: int = 0
    batch_sizes: Counter = field(default_factory=Counter)
    busy: BusyWindow = field(default_factory=BusyWindow)

    def record_call(self, streams: int) -> None:
        self.unet_calls += 1
        self.batch_sizes[streams] += 1


def engine_snapshot(metrics: EngineMetrics, sessions: dict[str, SessionMetrics]) -> dict:
    return {
        "sessions_active": len(sessions),
        "sessions_opened": metrics.sessions_opened,
        "sessions_closed": metrics.sessions_closed,
        "sessions_rejected": metrics.sessions_rejected,
        "sessions_expired": metrics.sessions_expired,
        "unet_calls": metrics.unet_calls,
        "batch_size_histogram": dict(sorted(metrics.batch_sizes.items())),
        "worker_busy_fraction": metrics.busy.fraction(),
        "worker_busy_seconds": metrics.busy.total_busy,
        "sessions": {sid: m.snapshot() for sid, m in sessions.items()},
    }


class SnapshotCollector:
    """Turns an engine snapshot into Prometheus metric families at scrape time."""

    def __init__(self, snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield _gauge("diffcam_sessions_active", "Open sessions", snap["sessions_active"])
        for name in ("sessions_opened", "sessions_closed", "sessions_rejected", "sessions_expired", "unet_calls"):
            yield _counter(f"diffcam_{name}", name.replace("_", " ").capitalize(), snap[name])
        yield _gauge("diffcam_worker_busy_fraction", "Worker busy fraction, last 5 s", snap["worker_busy_fraction"])
        batches = CounterMetricFamily("diffcam_unet_batch_streams", "UNet calls by streams per call",
                                      labels=["streams"])
        for size, count in snap["batch_size_histogram"].items():
            batches.add_metric([str(size)], count)
        yield batches
        yield from _session_families(snap["sessions"])


def _session_families(sessions: dict[str, dict]) -> Iterable[Metric]:
    counters = ("frames_in", "dropped", "processed", "skipped", "outputs", "outputs_dropped", "errors")
    families = {name: CounterMetricFamily(f"diffcam_session_{name}", f"Per-session {name.replace('_', ' ')}",
                                          labels=["session"]) for name in counters}
    fps = GaugeMetricFamily("diffcam_session_output_fps", "Per-session output fps", labels=["session"])
    latency = GaugeMetricFamily("diffcam_session_latency_ms", "Submit-to-output latency",
                                labels=["session", "quantile"])
    for sid, snap in sessions.items():
        for name in counters:
            families[name].add_metric([sid], snap[name])
        fps.add_metric([sid], snap["output_fps"])
        for quantile, value in snap["latency_ms"].items():
            latency.add_metric([sid, quantile], value)
    yield from families.values()
    yield fps
    yield latency


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def prometheus_text(snapshot) -> bytes:
    """Prometheus exposition text for a ``snapshot`` callable (a private registry: no global state)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry)

