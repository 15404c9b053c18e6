"""Crash safety: worker processes killed with SIGKILL mid-call, replacements joining (a
graceful cooperative rebalance for the others), and SIGTERM at the end. The committed output
must hold every event exactly once and every call's finals equal to the engine's direct run.

Nothing here waits for time to pass. Calls longer than a minute are published at real-time pace
in two waves (the second once the first replacement is ready), so the workers are mid-call for
as long as the calls last, however fast the machine. A kill waits for what it is meant to test:
a read_committed tail showing calls with committed events whose last chunk has not even been
published, and a victim whose metrics show it holds open streams; the next step waits for
another worker to log that it rebuilt open streams. Deadlines only stop a hang.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from confluent_kafka import (
    Consumer,
    Producer,
)
from prometheus_client.parser import text_string_to_metric_families

from producer_tools.conversation import SAMPLE_RATE, default_conversations
from producer_tools.stream import CallAudio, interleave, publish, to_chunks
from schemas import AudioEncoding, RecordCodec, TranscriptEvent, WireFormat
from tests.cluster import committed_output
from tests.integration.test_worker import _config
from worker.audio import AudioDecoder
from worker.config import WorkerConfig, to_flags
from worker.demo import free_port
from worker.engine.engine import StreamingEngine
from worker.engine.models import LoadedModels
from worker.engine.results import StreamUpdate
from worker.service.topics import create_topics

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 400
TEST_DEADLINE_S = 900  # a hang guard: no step waits for it to pass
CHUNK_MS = 200
# Two waves of three calls, each longer than a minute; staggered so that calls do not all end
# in the same instant.
WAVES = ((65, 68, 71), (66, 69, 72))
STAGGER_MS = 3000
MIN_IN_FLIGHT = 2
# What the loop logs when a new owner re-feeds a partition's open streams.
REBUILD_LOG = ("rebuilding", "open streams")


class WorkerProcess:
    def __init__(self, config: WorkerConfig, name: str, log_dir: Path) -> None:
        self.port = free_port()
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        cmd = [
            sys.executable,
            "-m",
            "worker",
            "run",
            *to_flags(config),
            "--random-models",
            "tiny",
            "--float64",
            "true",
            "--metrics-port",
            str(self.port),
            "--metrics-host",
            "127.0.0.1",
            "--transaction-interval-ms",
            "100",
            "--session-timeout-ms",
            "6000",
            "--transaction-timeout-ms",
            "10000",
            "--idle-timeout-sec",
            "120",
            "--log-level",
            "INFO",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env
        )

    def _get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
            return r.read().decode()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1):
                pass
        except OSError:
            return False
        return True

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.ready():
            assert self.proc.poll() is None, f"{self.name} exited: {self.tail()}"
            assert time.monotonic() < deadline, f"{self.name} not ready: {self.tail()}"
            time.sleep(0.5)

    def active_streams(self) -> int:
        """The streams this worker holds now, from its metrics."""
        for family in text_string_to_metric_families(self._get("/metrics")):
            if family.name == "callscribe_active_streams":
                return int(family.samples[0].value)
        raise AssertionError(f"{self.name}: no callscribe_active_streams in /metrics")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def kill(self) -> None:
        assert self.proc.poll() is None, f"{self.name} died on its own: {self.tail()}"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(90)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()

    def tail(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-3000:]


class PacedPublisher:
    """Publishes calls on a thread as a live site would: 200 ms chunks, calls interleaved, each
    chunk sent when its capture time comes. Knows which calls have had their last chunk sent."""

    def __init__(self, config: WorkerConfig, calls: dict[str, np.ndarray]) -> None:
        start_ms = int(time.time() * 1000)
        self._chunks = interleave(
            to_chunks(CallAudio(sid, audio), chunk_ms=CHUNK_MS, start_ms=start_ms + i * STAGGER_MS)
            for i, (sid, audio) in enumerate(calls.items())
        )
        self._producer = Producer(
            {"bootstrap.servers": config.bootstrap_servers, "enable.idempotence": True}
        )
        self._topic = config.input_topic
        self.calls = set(calls)
        self._lock = threading.Lock()
        self._ended: set[str] = set()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            publish(self._producer, self._topic, self._marked(), realtime=True)
        except BaseException as exc:  # reported by join()
            self.error = exc

    def _marked(self) -> Iterator:
        for chunk in self._chunks:
            if self._stop.is_set():
                return
            if chunk.end_of_stream:
                # Marked before it is produced: a call not marked cannot have ended.
                with self._lock:
                    self._ended.add(chunk.stream_id)
            yield chunk

    def ended(self) -> set[str]:
        """Calls whose last chunk may have been sent."""
        with self._lock:
            return set(self._ended)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "publisher did not finish"
        assert self.error is None, f"publisher failed: {self.error!r}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


class CommittedTail:
    """The output topic as a read_committed reader sees it, read on a thread until every call
    has committed its STREAM_END (or ``stop()``)."""

    def __init__(self, config: WorkerConfig, calls: set[str]) -> None:
        self._calls = calls
        self._consumer = Consumer(
            {
                "bootstrap.servers": config.bootstrap_servers,
                "group.id": f"tail-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        self._consumer.subscribe([config.output_topic])
        self._changed = threading.Condition()
        self._started: set[str] = set()
        self._ended: set[str] = set()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tail", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        codec = RecordCodec(TranscriptEvent, WireFormat.PLAIN)
        try:
            while not self._stop.is_set() and self._ended != self._calls:
                msg = self._consumer.poll(0.2)
                if msg is None:
                    continue
                if msg.error():
                    raise RuntimeError(f"tail: {msg.error()}")
                event = codec.decode(msg.value())
                with self._changed:
                    self._started.add(event.stream_id)
                    if event.kind == "STREAM_END":
                        self._ended.add(event.stream_id)
                    self._changed.notify_all()
        except BaseException as exc:  # reported by started() and join()
            self.error = exc
        finally:
            self._consumer.close()
            with self._changed:
                self._changed.notify_all()

    def started(self) -> set[str]:
        """Calls with at least one committed event."""
        assert self.error is None, f"tail failed: {self.error!r}"
        with self._changed:
            return set(self._started)

    def wait(self, timeout: float) -> None:
        """Return on the next committed event, or after ``timeout`` to re-check other things."""
        with self._changed:
            self._changed.wait(timeout)

    def join(self, timeout: float) -> set[str]:
        """Wait for every STREAM_END; the calls still open if the deadline came first."""
        self._thread.join(timeout)
        assert self.error is None, f"tail failed: {self.error!r}"
        with self._changed:
            return self._calls - self._ended

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@dataclass
class Kill:
    """One SIGKILL and what was true at that moment."""

    victim: str
    victim_streams: int  # the victim's open streams just before, from its metrics
    in_flight: set[str]  # calls with committed events whose last chunk was not yet sent
    log_marks: dict[str, int] = field(default_factory=dict)  # other workers' log sizes
    rebuilt_by: str = ""  # the first worker seen rebuilding open streams after the kill


def test_kill_and_rebalance_keep_output_exactly_once(
    kafka_bootstrap, fp64_models, tmp_path
) -> None:
    deadline = time.monotonic() + TEST_DEADLINE_S
    config = _config(kafka_bootstrap, float64=True)
    create_topics(config, partitions=4)
    waves = _long_calls(WAVES)
    calls = {sid: audio for wave in waves for sid, audio in wave.items()}
    # The reference first: the engine run directly on each call, before the workers compete.
    expected = {sid: sorted(_direct_finals(fp64_models, config, a)) for sid, a in calls.items()}
    rng = np.random.default_rng(3)
    tail = CommittedTail(config, set(calls))
    workers = [WorkerProcess(config, "w1", tmp_path), WorkerProcess(config, "w2", tmp_path)]
    everyone = list(workers)
    publishers: list[PacedPublisher] = []
    kills: list[Kill] = []
    try:
        for w in workers:
            w.wait_ready()
        for round_, wave in enumerate(waves):  # a wave of calls, a kill, a replacement; twice
            publishers.append(PacedPublisher(config, wave))
            victim, kill = _await_kill_moment(tail, publishers, workers, rng, deadline)
            kill.log_marks = {w.name: w.log_size() for w in workers if w is not victim}
            victim.kill()
            ended = set().union(*(p.ended() for p in publishers))
            kill.in_flight -= ended  # exactly the calls that cannot have ended before the kill
            kills.append(kill)
            workers.remove(victim)
            replacement = WorkerProcess(config, f"w{3 + round_}", tmp_path)
            workers.append(replacement)
            everyone.append(replacement)
            replacement.wait_ready()  # joining: a graceful cooperative rebalance for the others
            _await_rebuild(kill, workers, deadline)
        for p in publishers:
            p.join(max(0.0, deadline - time.monotonic()))
        still_open = tail.join(max(0.0, deadline - time.monotonic()))
        assert not still_open, f"no STREAM_END for {sorted(still_open)}: {_tails(workers)}"
        for w in workers:
            assert w.terminate() == 0, f"{w.name} did not exit cleanly: {w.tail()}"
    finally:
        for p in publishers:
            p.stop()
        tail.stop()
        for w in everyone:
            w.close()

    for kill in kills:
        assert len(kill.in_flight) >= MIN_IN_FLIGHT, f"{kill} did not land mid-call"
        assert kill.victim_streams > 0, f"{kill}: the victim held no stream"
        assert kill.rebuilt_by, f"{kill}: nothing was replayed"
    events = committed_output(
        config.bootstrap_servers, config.output_topic, max(1.0, deadline - time.monotonic())
    )
    ids = Counter(e.event_id for e in events)
    assert [i for i, n in ids.items() if n > 1] == [], "events committed more than once"
    ends = Counter(e.stream_id for e in events if e.kind == "STREAM_END")
    assert ends == {sid: 1 for sid in calls}
    finals: dict[str, list] = defaultdict(list)
    for e in events:
        if e.kind == "FINAL":
            finals[e.stream_id].append(
                (e.segment_index, e.speaker, e.text, round(e.start_s, 6), round(e.end_s, 6))
            )
    for sid in calls:
        assert sorted(finals[sid]) == expected[sid], sid


def _long_calls(waves: tuple[tuple[int, ...], ...]) -> list[dict[str, np.ndarray]]:
    """Calls of the given lengths in seconds: the canned conversations end to end, repeated,
    each call starting from a different one."""
    convs = [c.audio for c in default_conversations().values()]
    total = sum(len(a) for a in convs)
    out: list[dict[str, np.ndarray]] = []
    i = 0
    for wave in waves:
        calls = {}
        for seconds in wave:
            order = convs[i % len(convs) :] + convs[: i % len(convs)]
            repeats = math.ceil(seconds * SAMPLE_RATE / total)
            calls[f"call-{i}"] = np.concatenate(order * repeats)[: seconds * SAMPLE_RATE]
            i += 1
        out.append(calls)
    return out


def _await_kill_moment(
    tail: CommittedTail,
    publishers: list[PacedPublisher],
    workers: list[WorkerProcess],
    rng: np.random.Generator,
    deadline: float,
) -> tuple[WorkerProcess, Kill]:
    """Wait until calls are mid-way in the committed output and a worker holds open streams;
    that worker is the victim."""
    while True:
        started = tail.started()
        ended = set().union(*(p.ended() for p in publishers))
        unfinished = set().union(*(p.calls for p in publishers)) - ended
        assert len(unfinished) >= MIN_IN_FLIGHT, (
            f"calls ended before a kill could land mid-call (committed: {sorted(started)})"
        )
        in_flight = started - ended
        if len(in_flight) >= MIN_IN_FLIGHT:
            holders = [(w, n) for w in workers if (n := w.active_streams()) > 0]
            if holders:
                victim, streams = holders[int(rng.integers(len(holders)))]
                return victim, Kill(victim.name, streams, in_flight)
        for w in workers:
            assert w.proc.poll() is None, f"{w.name} died on its own: {w.tail()}"
        assert time.monotonic() < deadline, (
            f"never {MIN_IN_FLIGHT} calls in flight with a worker holding streams "
            f"(committed: {sorted(started)}): {_tails(workers)}"
        )
        tail.wait(0.5)


def _await_rebuild(kill: Kill, workers: list[WorkerProcess], deadline: float) -> None:
    """Wait for a worker other than the victim to log, after the kill, that it is rebuilding
    open streams: the replay this test is about."""
    while True:
        for w in workers:
            text = w.log_path.read_bytes()[kill.log_marks.get(w.name, 0) :].decode(errors="replace")
            if any(all(s in line for s in REBUILD_LOG) for line in text.splitlines()):
                kill.rebuilt_by = w.name
                return
            assert w.proc.poll() is None, f"{w.name} died on its own: {w.tail()}"
        assert time.monotonic() < deadline, (
            f"nobody rebuilt open streams after {kill.victim} was killed: nothing was replayed\n"
            f"{_tails(workers)}"
        )
        time.sleep(0.5)


def _direct_finals(models: LoadedModels, config: WorkerConfig, audio: np.ndarray) -> list[tuple]:
    """The engine on one call alone, fed the same 16 kHz samples the worker decodes and stepped
    as they arrive (a call longer than the engine's buffer cannot be pushed all at once), told
    of the end once its full chunks are stepped, speakers named by first appearance: as the
    worker does."""
    torch.set_default_dtype(torch.float64)
    engine = StreamingEngine(models, config.engine)
    engine.add_stream("x")
    decoder = AudioDecoder(AudioEncoding.PCM_S16LE, SAMPLE_RATE, 1)
    updates: list[StreamUpdate] = []
    for chunk in to_chunks(CallAudio("x", audio), chunk_ms=CHUNK_MS, start_ms=0):
        engine.push_audio("x", decoder.decode(chunk.payload), chunk.sequence)
        while engine.ready_streams():
            updates += engine.step()
    engine.end_stream("x")
    while engine.ready_streams():
        updates += engine.step()
    labels: dict[str, str] = {}
    finals = []
    for update in updates:
        for segment, _ in update.segments:
            speaker = segment.speaker
            if speaker is not None:
                speaker = labels.setdefault(speaker, f"speaker_{len(labels)}")
            if segment.final:
                finals.append(
                    (
                        segment.segment_index,
                        speaker,
                        segment.text,
                        round(segment.start_s, 6),
                        round(segment.end_s, 6),
                    )
                )
    return finals


def _tails(workers: list[WorkerProcess]) -> str:
    return "\n".join(f"--- {w.name}\n{w.tail()}" for w in workers)
