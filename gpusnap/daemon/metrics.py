"""Prometheus metrics of the daemon's operations, from the results the engine returns
(per-stage timings, bytes). Served by the daemon's own event loop (no exporter thread:
the daemon forks its operations and stays single-threaded)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ops = Counter("gpusnap_operations", "Operations by kind and result", ["op", "result"], registry=r)
        self.seconds = Histogram("gpusnap_operation_seconds", "Wall time of an operation, fork to exit",
                                 ["op"], buckets=BUCKETS, registry=r)
        self.stage = Histogram("gpusnap_stage_seconds", "Per-stage time the engine reported",
                               ["op", "stage"], buckets=BUCKETS, registry=r)
        self.bytes = Counter("gpusnap_bytes", "Image bytes: logical and new in the store (dump)",
                             ["op", "kind"], registry=r)
        self.in_flight = Gauge("gpusnap_operations_in_flight", "Operations running now", registry=r)

    def observe(self, op: str, seconds: float, exit_code: int, results: list) -> None:
        """One finished operation; results: the dicts it emitted (engine results)."""
        self.ops.labels(op, "ok" if exit_code == 0 else f"exit_{exit_code}").inc()
        self.seconds.labels(op).observe(seconds)
        for result in results:
            if not isinstance(result, dict):
                continue
            for stage, secs in (result.get("timings") or {}).items():
                if isinstance(secs, (int, float)):
                    self.stage.labels(op, stage).observe(secs)
            for kind in ("bytes_logical", "bytes_new"):
                if isinstance(result.get(kind), int):
                    self.bytes.labels(op, kind).inc(result[kind])

    def render(self) -> bytes:
        return generate_latest(self.registry)
