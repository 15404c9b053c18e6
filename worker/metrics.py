"""Prometheus metrics behind hook methods, on one registry, and the health endpoints.

Processing code calls hooks (``on_record``, ``on_event``, …) and never imports
``prometheus_client``. The HTTP server (one daemon thread) serves ``/metrics``, ``/healthz``
(the loop is alive) and ``/readyz`` (models loaded and partitions assigned, or idle).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The worker's metrics; every method is a hook the loop calls."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        p = "callscribe_"
        self.records = Counter(
            f"{p}records_total", "Input records consumed, by partition", ["partition"], registry=r
        )
        self.audio = Counter(
            f"{p}audio_seconds_total", "Seconds of call audio accepted", registry=r
        )
        self.events = Counter(
            f"{p}events_total", "Transcript events produced, by kind", ["kind"], registry=r
        )
        self.dead = Counter(
            f"{p}dead_letters_total", "Records dead-lettered, by reason", ["reason"], registry=r
        )
        self.duplicates = Counter(
            f"{p}duplicate_chunks_total", "Repeated chunks dropped", registry=r
        )
        self.gaps = Counter(
            f"{p}sequence_gaps_total", "Sequence gaps seen, by policy", ["policy"], registry=r
        )
        self.streams = Gauge(f"{p}active_streams", "Streams open in this worker", registry=r)
        self.batch = Histogram(
            f"{p}step_streams", "Streams per model step", buckets=_BATCH_BUCKETS, registry=r
        )
        self.instances = Histogram(
            f"{p}step_speaker_instances",
            "Speaker instances per model step",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.step_time = Histogram(
            f"{p}step_seconds",
            "Model step time by stage",
            ["stage"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.rtf = Gauge(
            f"{p}real_time_factor", "Audio seconds per wall second of the last step", registry=r
        )
        self.latency = Histogram(
            f"{p}end_to_end_latency_seconds",
            "Capture time of a segment's end to its event being produced",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(
            f"{p}consumer_lag_records", "Consumer lag by partition", ["partition"], registry=r
        )
        self.rebalances = Counter(
            f"{p}rebalances_total", "Partition changes, by kind", ["kind"], registry=r
        )
        self.transactions = Counter(
            f"{p}transactions_total",
            "Checkpoints, by result (commit, abort)",
            ["result"],
            registry=r,
        )
        self.replayed = Counter(
            f"{p}replayed_records_total", "Records re-read to rebuild streams", registry=r
        )
        self.gpu_memory = Gauge(
            f"{p}gpu_memory_bytes", "CUDA memory allocated by the worker", registry=r
        )
        self.model_load = Gauge(f"{p}model_load_seconds", "Time to load the models", registry=r)
        self.recovery = Histogram(
            f"{p}recovery_seconds",
            "Time for a new owner to rebuild a partition's open streams",
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.paused = Gauge(
            f"{p}paused_partitions", "Partitions paused by backpressure", registry=r
        )
        self.replay_mismatches = Counter(
            f"{p}replay_mismatches_total",
            "Replays that did not re-make the committed events (non-deterministic output)",
            registry=r,
        )
        self.overcommits = Counter(
            f"{p}admission_overcommits_total",
            "Calls admitted past max_streams so that no open call stalls behind them",
            registry=r,
        )
        self.producer_restarts = Counter(
            f"{p}producer_restarts_total", "Producers replaced after a fatal error", registry=r
        )
        self.consumer_restarts = Counter(
            f"{p}consumer_restarts_total", "Consumers replaced after a fatal error", registry=r
        )
        # callscribe_process_start_time_seconds and friends: a restart shows as a new start time.
        ProcessCollector(namespace="callscribe", registry=r)
        self._stable_offsets: dict[str, int] = {}
        self._lag_partitions: set[str] = set()

    def on_record(self, partition: int) -> None:
        self.records.labels(partition=str(partition)).inc()

    def on_audio(self, seconds: float) -> None:
        self.audio.inc(seconds)

    def on_event(self, kind: str, latency_sec: float | None) -> None:
        self.events.labels(kind=kind).inc()
        if latency_sec is not None:
            self.latency.observe(max(0.0, latency_sec))

    def on_dead_letter(self, reason: str) -> None:
        self.dead.labels(reason=reason).inc()

    def on_duplicate(self) -> None:
        self.duplicates.inc()

    def on_gap(self, policy: str) -> None:
        self.gaps.labels(policy=policy).inc()

    def on_streams(self, count: int) -> None:
        self.streams.set(count)

    def on_step(
        self,
        streams: int,
        instances: int,
        diarizer: float,
        asr: float,
        total: float,
        audio_sec: float,
    ) -> None:
        self.batch.observe(streams)
        self.instances.observe(instances)
        self.step_time.labels(stage="diarizer").observe(diarizer)
        self.step_time.labels(stage="asr").observe(asr)
        self.step_time.labels(stage="other").observe(max(0.0, total - diarizer - asr))
        if total > 0:
            self.rtf.set(audio_sec / total)

    def on_rebalance(self, kind: str) -> None:
        self.rebalances.labels(kind=kind).inc()

    def on_transaction(self, result: str) -> None:
        self.transactions.labels(result=result).inc()

    def on_replayed(self, count: int = 1) -> None:
        self.replayed.inc(count)

    def on_recovery(self, seconds: float) -> None:
        self.recovery.observe(seconds)

    def on_paused(self, count: int) -> None:
        self.paused.set(count)

    def on_model_load(self, seconds: float) -> None:
        self.model_load.set(seconds)

    def on_gpu_memory(self, allocated: int) -> None:
        self.gpu_memory.set(allocated)

    def on_replay_mismatch(self) -> None:
        self.replay_mismatches.inc()

    def on_overcommit(self) -> None:
        self.overcommits.inc()

    def on_producer_restart(self) -> None:
        self.producer_restarts.inc()

    def on_consumer_restart(self) -> None:
        self.consumer_restarts.inc()

    def on_client_stats(self, stats_json: str) -> None:
        """librdkafka statistics (``stats_cb``): each partition's last stable offset."""
        try:
            stats = json.loads(stats_json)
        except ValueError:
            return
        for topic in stats.get("topics", {}).values():
            for pid, part in topic.get("partitions", {}).items():
                stable = part.get("ls_offset", -1)
                if pid != "-1" and isinstance(stable, int) and stable >= 0:
                    self._stable_offsets[pid] = stable

    def on_positions(self, positions: dict[int, int]) -> None:
        """Processing positions after a checkpoint: lag is the last stable offset minus them
        (librdkafka's own ``consumer_lag`` needs consumer-committed offsets, which
        exactly-once mode never makes)."""
        for partition, position in positions.items():
            stable = self._stable_offsets.get(str(partition))
            if stable is not None:
                self.lag.labels(partition=str(partition)).set(max(0, stable - position))
        # A partition this worker no longer owns must not keep reporting its last lag: the
        # new owner reports it, and alerts take the max over workers.
        owned = {str(p) for p in positions}
        for gone in self._lag_partitions - owned:
            self.lag.remove(gone)
        self._lag_partitions = owned & set(self._stable_offsets)


class Health:
    """Liveness and readiness, set by the loop."""

    def __init__(self, stale_after_sec: float) -> None:
        self._stale_after = stale_after_sec
        self._beat = time.monotonic()
        self.models_loaded = False
        self.assigned_or_idle = False

    def beat(self) -> None:
        self._beat = time.monotonic()

    def stalled_for(self) -> float:
        """Seconds since the loop last turned."""
        return time.monotonic() - self._beat

    def alive(self) -> bool:
        return time.monotonic() - self._beat < self._stale_after

    def ready(self) -> bool:
        return self.alive() and self.models_loaded and self.assigned_or_idle


class HttpEndpoints:
    """``/metrics``, ``/healthz``, ``/readyz`` on one daemon thread."""

    def __init__(self, metrics: Metrics, health: Health, host: str, port: int) -> None:
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
                elif self.path.startswith("/healthz"):
                    ok = health.alive()
                    body, status, ctype = (
                        (b"ok\n" if ok else b"stalled\n"),
                        (200 if ok else 503),
                        "text/plain",
                    )
                elif self.path.startswith("/readyz"):
                    ok = health.ready()
                    body, status, ctype = (
                        (b"ready\n" if ok else b"not ready\n"),
                        (200 if ok else 503),
                        "text/plain",
                    )
                else:
                    body, status, ctype = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("metrics and health on http://%s:%d/metrics", *self._server.server_address[:2])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
