"""The Kafka loop's own cost, engine replaced by a pass-through: ``python -m bench loop``.

A benchmark, not a test. ``PassThroughEngine`` emits one segment update per pushed chunk, so
every input record becomes one transcript event and what is left to measure is the loop:
consume → decode → admit → produce → checkpoint.

Throughput. N AudioChunk records of S interleaved streams are produced first (untimed) to a
fresh input topic; then one ``Worker`` in this process, in each delivery mode, with a fresh
consumer group, moves them through. The clock runs from the first record the worker handles
to the checkpoint (transaction commit, or flush + offset commit) that covers the last one,
read off the worker's own metric hooks. Afterwards the committed output is read back and
counted: one PARTIAL or FINAL event per input record, one STREAM_END per stream.

Latency. A load generator (real time by default: rate × 20 ms streams) produces 20 ms chunks
live at a steady rate; a read_committed reader collects the events. Per input record,
"produced" is the output event's Kafka timestamp (set when the worker calls ``produce``) minus
the time the generator produced the input, and "visible" is when the reader got the event minus
the same; the second includes up to one checkpoint interval, since an event is readable only
once committed. The numbers are the loop's own latency only below saturation: a run whose
latency climbs from its first second to its last is marked saturated.

Thread rule: the worker loop runs on one thread of this process and is the only busy Python
thread while it is measured (the main thread waits). The load generator and the reader are
child processes, so they take no GIL time from the loop. Children import this module, so its
top level imports nothing that loads torch or NeMo; the loop's modules are imported where the
worker is built.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import io
import logging
import math
import multiprocessing as mp
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from bench.report import append_markdown, load_1m, machine, versions, write_json
from schemas import AudioChunk, AudioEncoding, RecordCodec, TranscriptEvent
from worker.audio import encode_pcm
from worker.engine.transcript import SegmentUpdate
from worker.metrics import Metrics

if TYPE_CHECKING:
    from worker.config import WorkerConfig
    from worker.engine.results import StreamUpdate
    from worker.service.loop import Worker

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_LOCAL = REPO_ROOT / "deploy" / "kafka-local"
LOOP_FILE = "worker/service/loop.py"
SECTION_TITLE = "Kafka loop (pass-through engine)"
MODES = ("exactly_once", "at_least_once")
# Records per second the loop must sustain at 20 ms packets, by delivery mode.
TARGETS = {"at_least_once": 20_000, "exactly_once": 10_000}
LATENCY_TARGET_P95_MS = 50.0
_PASS_TEXT = "pass-through"


def _say(text: str) -> None:
    """Progress for a person watching: stderr, so stdout keeps only the table."""
    print(text, file=sys.stderr, flush=True)


# -- the engine stand-in ------------------------------------------------------------------------


@dataclass
class _PassStream:
    samples: int = 0  # 16 kHz samples pushed so far
    pending: list[list[float]] = field(default_factory=list)  # [sequence, start_s, end_s]
    last_sequence: int = -1
    ended: bool = False


class PassThroughEngine:
    """The loop's ``Engine`` with no model: each pushed record comes back as one segment.

    A push with the same sequence number as the one before (the decoder's tail at the end of a
    resampled stream) extends that record's segment instead of opening one, so the output is
    one event per input record whatever the audio format. ``end_stream`` turns the last
    segment into a FINAL one and ends the stream in the next ``step``.
    """

    def __init__(self, sample_rate: int = 16_000) -> None:
        # Imported here, not at the top: the benchmark's child processes import this module
        # and must not pay for the NeMo import that ``worker.engine.engine`` brings.
        from worker.engine.results import SequenceSpan, StreamUpdate

        self._update = StreamUpdate
        self._span = SequenceSpan
        self._rate = float(sample_rate)
        self._streams: dict[str, _PassStream] = {}
        self._ready: dict[str, None] = {}  # an ordered set: streams with something to emit

    def add_stream(self, stream_id: str) -> None:
        if stream_id in self._streams:
            raise ValueError(f"stream {stream_id!r} is already open")
        self._streams[stream_id] = _PassStream()

    def push_audio(self, stream_id: str, samples: np.ndarray, sequence: int = -1) -> None:
        stream = self._streams[stream_id]
        start = stream.samples / self._rate
        stream.samples += len(samples)
        end = stream.samples / self._rate
        if sequence == stream.last_sequence and stream.pending:
            stream.pending[-1][2] = end
        else:
            stream.pending.append([sequence, start, end])
            stream.last_sequence = sequence
        self._ready[stream_id] = None

    def end_stream(self, stream_id: str) -> None:
        self._streams[stream_id].ended = True
        self._ready[stream_id] = None

    def drop_stream(self, stream_id: str) -> None:
        self._streams.pop(stream_id, None)
        self._ready.pop(stream_id, None)

    def has_stream(self, stream_id: str) -> bool:
        return stream_id in self._streams

    def ready_streams(self) -> list[str]:
        return list(self._ready)

    def buffered_sec(self, stream_id: str) -> float:
        return 0.0  # every step empties every stream

    def step(self) -> list[StreamUpdate]:
        updates = []
        for stream_id in self._ready:
            stream = self._streams[stream_id]
            last = len(stream.pending) - 1
            segments = tuple(
                (
                    SegmentUpdate(
                        segment_index=int(seq),
                        revision=0,
                        final=stream.ended and i == last,
                        speaker="speaker_0",
                        start_s=start,
                        end_s=end,
                        text=_PASS_TEXT,
                        words=(),
                    ),
                    self._span(int(seq), int(seq)),
                )
                for i, (seq, start, end) in enumerate(stream.pending)
            )
            audio = stream.pending[-1][2] - stream.pending[0][1] if stream.pending else 0.0
            stream.pending = []
            if stream.ended:
                del self._streams[stream_id]
            updates.append(self._update(stream_id, segments, ended=stream.ended, audio_sec=audio))
        self._ready.clear()
        return updates


# -- input --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFormat:
    """The audio of the benchmark's records."""

    name: str
    encoding: AudioEncoding
    sample_rate: int
    chunk_ms: int

    @property
    def label(self) -> str:
        enc = "PCM s16le" if self.encoding is AudioEncoding.PCM_S16LE else "μ-law"
        return f"{enc} {self.sample_rate // 1000} kHz, {self.chunk_ms} ms"

    @property
    def payload_bytes(self) -> int:
        width = 2 if self.encoding is AudioEncoding.PCM_S16LE else 1
        return self.sample_rate * self.chunk_ms // 1000 * width

    def payloads(self, count: int, seed: int = 0) -> list[bytes]:
        """``count`` different chunks of quiet noise; the content does not change the cost."""
        rng = np.random.default_rng(seed)
        n = self.sample_rate * self.chunk_ms // 1000
        return [encode_pcm(rng.normal(0.0, 0.05, n), self.encoding) for _ in range(count)]


_ENCODINGS = {
    "pcm16k": (AudioEncoding.PCM_S16LE, 16_000),
    "mulaw8k": (AudioEncoding.PCM_MULAW, 8_000),
}


def parse_format(spec: str) -> InputFormat:
    """``pcm16k:20`` → PCM s16le at 16 kHz in 20 ms chunks; ``mulaw8k:20`` → 8 kHz μ-law."""
    name, _, ms = spec.partition(":")
    if name not in _ENCODINGS or not ms.isdigit() or int(ms) <= 0:
        raise ValueError(f"format {spec!r}: expected one of {sorted(_ENCODINGS)}:MILLISECONDS")
    encoding, rate = _ENCODINGS[name]
    return InputFormat(name, encoding, rate, int(ms))


PCM_20MS = parse_format("pcm16k:20")


def stream_ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(count)]


def interleaved_records(
    fmt: InputFormat, ids: Sequence[str], total: int, start_ms: int = 1_000_000
) -> list[tuple[bytes, bytes]]:
    """``total`` encoded records, round-robin over the streams, each stream's last one ending it.

    Stream ``i`` gets ``total // len(ids)`` records, one more for the first ``total % len(ids)``.
    """
    codec = RecordCodec(AudioChunk)
    payloads = fmt.payloads(16)
    base, extra = divmod(total, len(ids))
    lengths = [base + (1 if i < extra else 0) for i in range(len(ids))]
    keys = [sid.encode() for sid in ids]
    out: list[tuple[bytes, bytes]] = []
    for seq in range(max(lengths, default=0)):
        for i, sid in enumerate(ids):
            if seq >= lengths[i]:
                continue
            chunk = AudioChunk(
                stream_id=sid,
                sequence=seq,
                encoding=fmt.encoding,
                sample_rate_hz=fmt.sample_rate,
                payload=payloads[(i + seq) % len(payloads)],
                capture_time_ms=start_ms + seq * fmt.chunk_ms,
                end_of_stream=seq == lengths[i] - 1,
            )
            out.append((keys[i], codec.encode(chunk)))
    return out


def produce_all(bootstrap: str, topic: str, records: Sequence[tuple[bytes, bytes]]) -> None:
    """Write ``records`` and wait until the broker has them all."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
        }
    )
    failed: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            failed.append(str(err))

    for n, (key, value) in enumerate(records, 1):
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        if n % 100_000 == 0:
            _say(f"    {n:,}/{len(records):,} records produced")
    if producer.flush(120) or failed:
        raise RuntimeError(f"pre-producing the input failed: {failed[:3]}")


# -- output -------------------------------------------------------------------------------------


def _committed_values(bootstrap: str, topic: str, timeout_s: float = 120.0) -> Iterator[bytes]:
    """Every committed value of ``topic``, from its start to its end as of now."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-loop-count-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=30).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        remaining = set(meta.partitions)
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: partitions {sorted(remaining)} unfinished")
            for msg in consumer.consume(10_000, 1.0):
                if not msg.error():
                    yield msg.value()
                elif msg.error().code() == KafkaError._PARTITION_EOF:
                    remaining.discard(msg.partition())
                else:
                    raise RuntimeError(f"reading {topic}: {msg.error()}")
    finally:
        consumer.close()


def count_events(bootstrap: str, topic: str) -> Counter[str]:
    """Committed transcript events of ``topic`` by kind."""
    codec = RecordCodec(TranscriptEvent)
    return Counter(str(codec.decode(value).kind) for value in _committed_values(bootstrap, topic))


# -- the worker under test ------------------------------------------------------------------------


class _Watch(Metrics):
    """The worker's metrics, plus the moments the benchmark times: read off the loop's hooks.

    Every hook still runs the real one, so the loop pays its usual metrics cost.
    """

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected = expected
        self.handled = 0
        self.first_at = 0.0  # monotonic time of the first record handled
        self.done_at = 0.0  # ... of the checkpoint that covered the last one
        self.thread_cpu = (0.0, 0.0)  # loop thread CPU seconds at those two moments
        self.process_cpu = (0.0, 0.0)
        self.assigned = threading.Event()
        self.done = threading.Event()

    def on_record(self, partition: int) -> None:
        if self.handled == 0:
            self.first_at = time.monotonic()
            self.thread_cpu = (time.thread_time(), 0.0)
            self.process_cpu = (time.process_time(), 0.0)
        self.handled += 1
        super().on_record(partition)

    def on_transaction(self, result: str) -> None:
        super().on_transaction(result)
        # The loop calls this after the outputs of every record handled so far, and the
        # offsets past them, are committed; records are handled in order of their batch.
        if result == "commit" and self.handled >= self.expected and not self.done.is_set():
            self.done_at = time.monotonic()
            self.thread_cpu = (self.thread_cpu[0], time.thread_time())
            self.process_cpu = (self.process_cpu[0], time.process_time())
            self.done.set()

    def on_rebalance(self, kind: str) -> None:
        super().on_rebalance(kind)
        if kind == "assigned":
            self.assigned.set()


def bench_config(
    bootstrap: str,
    input_topic: str,
    delivery: str,
    *,
    streams: int,
    run_id: str,
    transaction_interval_ms: int = 200,
) -> WorkerConfig:
    """The worker's configuration: defaults, with fresh output topics and group per run."""
    from worker.config import DeliveryMode, WorkerConfig

    stem = f"bench-loop-{run_id}-{delivery}"
    return WorkerConfig(
        bootstrap_servers=bootstrap,
        input_topic=input_topic,
        output_topic=f"{stem}-events",
        dead_letter_topic=f"{stem}-dead",
        progress_topic=f"{stem}-progress",
        group_id=stem,
        delivery=DeliveryMode(delivery),
        max_streams=max(256, streams + 16),
        transaction_interval_ms=transaction_interval_ms,
        metrics_port=0,
        log_level="WARNING",
    )


class _RunningWorker:
    """One ``Worker`` with a ``PassThroughEngine`` on a thread of this process."""

    def __init__(
        self, config: WorkerConfig, watch: _Watch, profile: cProfile.Profile | None = None
    ) -> None:
        from worker.metrics import Health
        from worker.service.loop import ModelNames, Worker

        health = Health(stale_after_sec=600)
        health.models_loaded = True
        names = ModelNames("pass-through", "pass-through")
        self.worker: Worker = Worker(config, PassThroughEngine(), names, watch, health)
        self.profile = profile
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="worker-loop", daemon=True)

    def _run(self) -> None:
        try:
            if self.profile is not None:
                self.profile.runcall(self.worker.run)
            else:
                self.worker.run()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(120)
        if self.thread.is_alive():
            raise RuntimeError("the worker did not stop within 120 s")
        if self.error is not None:
            raise RuntimeError(f"the worker failed: {self.error!r}") from self.error

    def check(self) -> None:
        if not self.thread.is_alive():
            raise RuntimeError(f"the worker stopped early: {self.error!r}") from self.error


def _quiet_worker_logs() -> None:
    for name in ("worker.service.loop", "worker"):
        logging.getLogger(name).setLevel(logging.WARNING)


# -- throughput -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThroughputResult:
    """One configuration's run: records through the loop and the events they became."""

    fmt: InputFormat
    delivery: str
    records: int
    streams: int
    seconds: float
    segment_events: int  # PARTIAL and FINAL events read back, committed
    stream_ends: int
    dead_letters: int
    thread_cpu_sec: float  # CPU of the loop's thread over the timed span
    process_cpu_sec: float  # ... of the whole process (the loop plus librdkafka's threads)
    load_before: float
    load_after: float
    profiled: bool = False

    @property
    def records_per_sec(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        return (
            self.segment_events == self.records
            and self.stream_ends == self.streams
            and self.dead_letters == 0
        )

    @property
    def target(self) -> int | None:
        return TARGETS.get(self.delivery) if self.fmt.chunk_ms == 20 else None


def new_input_topic(bootstrap: str, partitions: int, run_id: str, name: str) -> str:
    """A fresh input topic with the settings ``topic_specs`` gives the worker's input."""
    from worker.service.topics import topic_specs

    topic = f"bench-loop-{run_id}-{name}-audio"
    config = bench_config(bootstrap, topic, "at_least_once", streams=1, run_id=run_id)
    [spec] = [s for s in topic_specs(config, partitions, 1) if s.topic == topic]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([spec])[topic].result(30)
    wait_for_leaders(bootstrap, [topic])
    return topic


def create_worker_topics(config: WorkerConfig, partitions: int) -> None:
    """The worker's topics, each partition with a leader: the worker reads the progress
    topic's watermarks as soon as it is assigned, and a leaderless partition fails that."""
    from worker.service.topics import create_topics

    create_topics(config, partitions=partitions)
    wait_for_leaders(config.bootstrap_servers, [config.input_topic, *_worker_topics(config)])


def wait_for_leaders(bootstrap: str, topics: Sequence[str], timeout_s: float = 30.0) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout_s
    while True:
        listed = admin.list_topics(timeout=10).topics
        if all(
            t in listed
            and listed[t].error is None
            and listed[t].partitions
            and all(p.leader >= 0 for p in listed[t].partitions.values())
            for t in topics
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics {list(topics)} have no leaders after {timeout_s:.0f} s")
        time.sleep(0.1)


def delete_topics(bootstrap: str, topics: Sequence[str]) -> None:
    """Best effort: the inputs are large, and a shared broker should not keep them."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 4})
    for future in admin.delete_topics(list(topics), operation_timeout=10).values():
        with contextlib.suppress(Exception):
            future.result(15)


def _worker_topics(config: WorkerConfig) -> list[str]:
    return [config.output_topic, config.dead_letter_topic, config.progress_topic]


def run_throughput(
    bootstrap: str,
    input_topic: str,
    fmt: InputFormat,
    delivery: str,
    *,
    records: int,
    streams: int,
    run_id: str,
    partitions: int = 4,
    transaction_interval_ms: int = 200,
    profile_path: Path | None = None,
    timeout_s: float | None = None,
) -> ThroughputResult:
    """One worker, a fresh group, through the ``records`` already in ``input_topic``."""
    config = bench_config(
        bootstrap,
        input_topic,
        delivery,
        streams=streams,
        run_id=run_id,
        transaction_interval_ms=transaction_interval_ms,
    )
    create_worker_topics(config, partitions)
    watch = _Watch(records)
    profile = cProfile.Profile() if profile_path is not None else None
    running = _RunningWorker(config, watch, profile)
    load_before = load_1m()
    running.start()
    timeout_s = timeout_s if timeout_s is not None else max(120.0, records / 500)
    deadline = time.monotonic() + timeout_s
    try:
        while not watch.done.wait(2.0):
            running.check()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{delivery}: {watch.handled:,} of {records:,} records after {timeout_s:.0f} s"
                )
            if watch.handled:
                elapsed = time.monotonic() - watch.first_at
                _say(f"    {watch.handled:,}/{records:,} handled, {elapsed:.0f} s")
    finally:
        running.stop()
    load_after = load_1m()
    if profile is not None and profile_path is not None:
        profile_path.parent.mkdir(parents=True, exist_ok=True)
        profile.dump_stats(str(profile_path))
    kinds = count_events(bootstrap, config.output_topic)
    dead_letters = sum(1 for _ in _committed_values(bootstrap, config.dead_letter_topic))
    delete_topics(bootstrap, _worker_topics(config))
    return ThroughputResult(
        fmt=fmt,
        delivery=delivery,
        records=records,
        streams=streams,
        seconds=watch.done_at - watch.first_at,
        segment_events=kinds["PARTIAL"] + kinds["FINAL"],
        stream_ends=kinds["STREAM_END"],
        dead_letters=dead_letters,
        thread_cpu_sec=watch.thread_cpu[1] - watch.thread_cpu[0],
        process_cpu_sec=watch.process_cpu[1] - watch.process_cpu[0],
        load_before=load_before,
        load_after=load_after,
        profiled=profile is not None,
    )


def bench_throughput(
    bootstrap: str,
    fmt: InputFormat,
    *,
    records: int,
    streams: int,
    modes: Sequence[str] = MODES,
    partitions: int = 4,
    transaction_interval_ms: int = 200,
    profile_dir: Path | None = None,
    run_id: str | None = None,
) -> list[ThroughputResult]:
    """Pre-produce ``records`` once, then run a worker through them in each delivery mode."""
    run_id = f"{run_id or uuid.uuid4().hex[:8]}-{fmt.name}-{fmt.chunk_ms}ms"
    streams = max(1, min(streams, records))
    topic = new_input_topic(bootstrap, partitions, run_id, "input")
    results = []
    try:
        _say(f"  pre-producing {records:,} records of {streams} streams ({fmt.label}) to {topic}")
        ids = stream_ids(f"s{run_id}", streams)
        produce_all(bootstrap, topic, interleaved_records(fmt, ids, records))
        for delivery in modes:
            _say(f"  {fmt.label}, {delivery}: timing the worker")
            profile_path = (
                None
                if profile_dir is None
                else profile_dir / f"{fmt.name}-{fmt.chunk_ms}ms-{delivery}.pstats"
            )
            result = run_throughput(
                bootstrap,
                topic,
                fmt,
                delivery,
                records=records,
                streams=streams,
                run_id=run_id,
                partitions=partitions,
                transaction_interval_ms=transaction_interval_ms,
                profile_path=profile_path,
            )
            _say(
                f"  {fmt.label}, {delivery}: {result.records_per_sec:,.0f} records/s "
                f"({records:,} in {result.seconds:.1f} s; {result.segment_events:,} events)"
            )
            results.append(result)
    finally:
        delete_topics(bootstrap, [topic])
    return results


# -- latency --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyResult:
    """Live load at a steady rate: how long after its input record each event existed."""

    delivery: str
    rate: float  # records per second asked for
    achieved_rate: float  # ... that the load generator kept
    streams: int
    records: int
    measured: int  # records past the warm-up whose event arrived
    missing: int  # records whose event never arrived
    produced_ms: tuple[float, float, float, float]  # p50, p95, p99, max
    visible_ms: tuple[float, float, float, float]
    # Median "produced" latency over the first and the last second measured: a rise means
    # the worker fell behind the offered rate (saturated), and the percentiles mean little.
    trend_ms: tuple[float, float]
    transaction_interval_ms: int
    load_before: float
    load_after: float
    # Per record, in produce order: seconds after the first record was sent, and the two
    # latencies in seconds (NaN where no event arrived).
    sent_sec: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    produced_sec: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    visible_sec: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))


def _generate_load(
    bootstrap: str,
    topic: str,
    fmt: InputFormat,
    ids: list[str],
    rate: float,
    per_stream: int,
    conn: mp.connection.Connection,
) -> None:
    """Child process: produce record j (stream j % S, sequence j // S) at start + j / rate.

    Sends back the wall-clock time each record was handed to ``produce``, and the seconds the
    whole schedule took.
    """
    records = interleaved_records(fmt, ids, per_stream * len(ids), start_ms=int(time.time() * 1000))
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    sent = array("d", bytes(8 * len(records)))
    conn.send("ready")
    conn.recv()  # go
    start = time.monotonic()
    j = 0
    while j < len(records):
        due = min(len(records), int((time.monotonic() - start) * rate) + 1)
        while j < due:
            key, value = records[j]
            sent[j] = time.time()
            while True:
                try:
                    producer.produce(topic, value=value, key=key)
                    break
                except BufferError:
                    producer.poll(0.01)
            j += 1
        producer.poll(0)
        ahead = start + j / rate - time.monotonic()
        if ahead > 0:
            time.sleep(min(ahead, 0.002))
    elapsed = time.monotonic() - start
    producer.flush(60)
    conn.send((sent.tobytes(), elapsed))


def _collect_events(
    bootstrap: str, topic: str, expected: int, idle_timeout_s: float, conn: mp.connection.Connection
) -> None:
    """Child process: read committed events as they appear, noting when each arrived.

    Stops after ``expected`` events or ``idle_timeout_s`` without one; sends back
    (stream_id, first_sequence, kind, event timestamp ms, arrival time) per event.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-loop-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 5,
        }
    )
    meta = consumer.list_topics(topic, timeout=30).topics[topic]
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    consumer.poll(0.5)
    conn.send("ready")
    raw: list[tuple[float, int, bytes]] = []
    last = time.monotonic()
    try:
        while len(raw) < expected and time.monotonic() - last < idle_timeout_s:
            msg = consumer.poll(0.1)  # one at a time, so arrival times are not batched
            if msg is None or msg.error():
                continue
            raw.append((time.time(), msg.timestamp()[1], msg.value()))
            last = time.monotonic()
    finally:
        consumer.close()
    codec = RecordCodec(TranscriptEvent)
    out = []
    for arrived, stamp, value in raw:
        event = codec.decode(value)
        out.append((event.stream_id, event.first_sequence, str(event.kind), stamp, arrived))
    conn.send(out)


def _recv(conn: mp.connection.Connection, timeout_s: float, what: str) -> object:
    if not conn.poll(timeout_s):
        raise TimeoutError(f"no answer from the {what} after {timeout_s:.0f} s")
    return conn.recv()


def _percentiles(values_sec: np.ndarray) -> tuple[float, float, float, float]:
    if not len(values_sec):
        return (math.nan,) * 4
    p50, p95, p99 = np.percentile(values_sec, [50, 95, 99]) * 1000
    return (float(p50), float(p95), float(p99), float(values_sec.max() * 1000))


def run_latency(
    bootstrap: str,
    delivery: str,
    *,
    rate: float = 5000.0,
    streams: int = 100,
    seconds: float = 15.0,
    fmt: InputFormat = PCM_20MS,
    partitions: int = 4,
    transaction_interval_ms: int = 200,
    warmup_sec: float = 1.0,
    run_id: str | None = None,
) -> LatencyResult:
    """One worker, a load generator at ``rate`` records/s, a reader; per-record latencies.

    Records produced in the first ``warmup_sec`` are left out of the percentiles.
    """
    run_id = run_id or uuid.uuid4().hex[:8]
    topic = new_input_topic(bootstrap, partitions, run_id, f"latency-{delivery}")
    config = bench_config(
        bootstrap,
        topic,
        delivery,
        streams=streams,
        run_id=f"{run_id}-latency",
        transaction_interval_ms=transaction_interval_ms,
    )
    create_worker_topics(config, partitions)
    per_stream = max(1, round(seconds * rate / streams))
    total = per_stream * streams
    ids = stream_ids(f"l{run_id}", streams)
    watch = _Watch(total)
    running = _RunningWorker(config, watch)
    load_before = load_1m()
    ctx = mp.get_context("spawn")
    reader_conn, reader_end = ctx.Pipe()
    gen_conn, gen_end = ctx.Pipe()
    expected = total + streams  # every record's event, and each stream's end
    reader = ctx.Process(
        target=_collect_events,
        args=(bootstrap, config.output_topic, expected, 30.0, reader_end),
        daemon=True,
    )
    generator = ctx.Process(
        target=_generate_load,
        args=(bootstrap, topic, fmt, ids, rate, per_stream, gen_end),
        daemon=True,
    )
    running.start()
    try:
        if not watch.assigned.wait(60):
            raise TimeoutError("the worker got no partitions within 60 s")
        reader.start()
        generator.start()
        _recv(reader_conn, 120, "reader")
        _recv(gen_conn, 120, "load generator")
        _say(f"  latency, {delivery}: {total:,} records at {rate:,.0f}/s over {streams} streams")
        gen_conn.send("go")
        sent_bytes, elapsed = _recv(gen_conn, seconds * 4 + 120, "load generator")
        running.check()
        events = _recv(reader_conn, 180, "reader")
    finally:
        running.stop()
        for child in (generator, reader):
            if child.pid is None:  # never started
                continue
            child.join(10)
            if child.is_alive():
                child.kill()
        delete_topics(bootstrap, [topic, *_worker_topics(config)])
    load_after = load_1m()
    sent = array("d")
    sent.frombytes(sent_bytes)
    index = {sid: i for i, sid in enumerate(ids)}
    produced = np.full(total, np.nan)
    visible = np.full(total, np.nan)
    for stream_id, sequence, kind, stamp_ms, arrived in events:
        if kind == "STREAM_END":
            continue
        j = sequence * streams + index[stream_id]
        produced[j] = stamp_ms / 1000 - sent[j]
        visible[j] = arrived - sent[j]
    sent_at = np.frombuffer(sent, dtype=np.float64)
    keep = sent_at >= sent_at[0] + warmup_sec
    got = ~np.isnan(visible)
    first = keep & got & (sent_at < sent_at[0] + warmup_sec + 1.0)
    last = keep & got & (sent_at >= sent_at[-1] - 1.0)
    trend = tuple(
        float(np.median(produced[sel]) * 1000) if sel.any() else math.nan for sel in (first, last)
    )
    return LatencyResult(
        delivery=delivery,
        rate=rate,
        achieved_rate=total / elapsed if elapsed > 0 else 0.0,
        streams=streams,
        records=total,
        measured=int((keep & got).sum()),
        missing=int((~got).sum()),
        produced_ms=_percentiles(produced[keep & got]),
        visible_ms=_percentiles(visible[keep & got]),
        trend_ms=trend,  # type: ignore[arg-type]
        transaction_interval_ms=transaction_interval_ms,
        load_before=load_before,
        load_after=load_after,
        sent_sec=sent_at - sent_at[0],
        produced_sec=produced,
        visible_sec=visible,
    )


# -- report ---------------------------------------------------------------------------------------


def throughput_table(results: Sequence[ThroughputResult]) -> str:
    """One row per run. On a shared machine the wall-clock rate moves with the load; the loop
    thread's CPU per record does much less, and 10⁶ / it is the rate one free core would give
    (a ceiling: it leaves out the time the loop waits on checkpoints)."""
    head = (
        "| input | delivery | streams | records | seconds | records/s | target | "
        "loop CPU µs/record | loop on CPU | 1-core ceiling records/s | "
        "process CPU µs/record | events out (records + ends) | load avg |\n"
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---|\n"
    )
    rows = []
    for r in results:
        target = (
            "—"
            if r.target is None
            else f"≥ {r.target:,}: {'met' if r.records_per_sec >= r.target else 'MISSED'}"
        )
        events = f"{r.segment_events:,} + {r.stream_ends:,}" + (
            "" if r.complete else f" (INCOMPLETE, {r.dead_letters} dead letters)"
        )
        rate = f"{r.records_per_sec:,.0f}" + (" (profiled)" if r.profiled else "")
        per_record = r.thread_cpu_sec / r.records * 1e6
        on_cpu = r.thread_cpu_sec / r.seconds if r.seconds > 0 else 0.0
        ceiling = 1e6 / per_record if per_record > 0 else 0.0
        rows.append(
            f"| {r.fmt.label} | {r.delivery} | {r.streams} | {r.records:,} | {r.seconds:.1f} | "
            f"{rate} | {target} | {per_record:.0f} | {on_cpu:.0%} | {ceiling:,.0f} | "
            f"{r.process_cpu_sec / r.records * 1e6:.0f} | {events} | "
            f"{r.load_before:.1f} → {r.load_after:.1f} |"
        )
    return head + "\n".join(rows) + "\n"


def latency_table(results: Sequence[LatencyResult]) -> str:
    head = (
        "| delivery | rate asked / kept (records/s) | streams | records measured | "
        "produced p50 / p95 / p99 / max (ms) | visible p50 / p95 / p99 / max (ms) | "
        "produced median, first → last s (ms) | "
        f"target p95 ≤ {LATENCY_TARGET_P95_MS:.0f} ms | load avg |\n"
        "|---|---|---:|---:|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        verdict = "met" if r.produced_ms[1] <= LATENCY_TARGET_P95_MS else "MISSED"
        saturated = r.trend_ms[1] - r.trend_ms[0] > 100.0
        missing = f" ({r.missing} missing)" if r.missing else ""
        rows.append(
            f"| {r.delivery} | {r.rate:,.0f} / {r.achieved_rate:,.0f} | {r.streams} | "
            f"{r.measured:,}{missing} | {' / '.join(f'{v:.1f}' for v in r.produced_ms)} | "
            f"{' / '.join(f'{v:.1f}' for v in r.visible_ms)} | "
            f"{r.trend_ms[0]:.0f} → {r.trend_ms[1]:.0f}{' (saturated)' if saturated else ''} | "
            f"produced: {verdict} | {r.load_before:.1f} → {r.load_after:.1f} |"
        )
    return head + "\n".join(rows) + "\n"


def profile_report(path: Path, limit: int = 25) -> str:
    """The profile's top functions by own time, then the loop's by cumulative time."""
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    total = stats.total_tt  # type: ignore[attr-defined]
    out.write(f"== {path.name}: {total:.2f} s profiled\n-- top {limit} by own time\n")
    stats.sort_stats("tottime").print_stats(limit)
    out.write(f"-- {LOOP_FILE} by cumulative time\n")
    stats.sort_stats("cumulative").print_stats("loop.py", limit)
    return out.getvalue()


def _environment_line() -> str:
    import confluent_kafka

    return (
        f"{machine()}, {versions(('confluent-kafka',))} / librdkafka "
        f"{confluent_kafka.libversion()[0]}, one local single-node broker (deploy/kafka-local)"
    )


def markdown_section(
    command: str,
    throughput: Sequence[ThroughputResult],
    latency: Sequence[LatencyResult],
    transaction_interval_ms: int = 200,
    now: dt.datetime | None = None,
) -> str:
    now = now or dt.datetime.now(dt.UTC)
    parts = [
        f"## {SECTION_TITLE} — {now:%Y-%m-%d %H:%M} UTC\n",
        f"`{command}` on {_environment_line()}. The machine is shared: compare rows of one "
        "run, and read the load average beside each row.\n",
        "The engine is `bench.loop.PassThroughEngine` (one event per input record), so "
        "these numbers are the Kafka loop's own cost: consume → decode → admit → produce → "
        f"checkpoint (every {transaction_interval_ms} ms).\n",
    ]
    if throughput:
        parts.append(
            "Throughput: records pre-produced, then timed from the first record the worker "
            "handles to the checkpoint that commits the last one; the events are read back "
            "(read_committed) and counted.\n"
        )
        parts.append(throughput_table(throughput))
    if latency:
        parts.append(
            "Latency: 20 ms PCM chunks produced live at a steady rate; per record, *produced* "
            "= the output event's Kafka timestamp − the input's produce time (the loop's own "
            "delay), *visible* = a read_committed reader's arrival time − the same (adds up to "
            "one checkpoint interval and the reader's fetch). The first second is warm-up and "
            "left out.\n"
        )
        parts.append(latency_table(latency))
    return "\n".join(parts)


def results_json(
    command: str, throughput: Sequence[ThroughputResult], latency: Sequence[LatencyResult]
) -> dict[str, object]:
    """The runs' figures as plain JSON values (per-record latency arrays left out)."""
    return {
        "benchmark": "loop",
        "command": command,
        "throughput": [
            {
                "input": r.fmt.label,
                "delivery": r.delivery,
                "records": r.records,
                "streams": r.streams,
                "seconds": r.seconds,
                "records_per_sec": r.records_per_sec,
                "complete": r.complete,
                "loop_cpu_us_per_record": r.thread_cpu_sec / r.records * 1e6 if r.records else 0.0,
                "load_before": r.load_before,
                "load_after": r.load_after,
            }
            for r in throughput
        ],
        "latency": [
            {
                "delivery": r.delivery,
                "rate": r.rate,
                "achieved_rate": r.achieved_rate,
                "streams": r.streams,
                "measured": r.measured,
                "missing": r.missing,
                "produced_ms_p50_p95_p99_max": list(r.produced_ms),
                "visible_ms_p50_p95_p99_max": list(r.visible_ms),
                "load_before": r.load_before,
                "load_after": r.load_after,
            }
            for r in latency
        ],
    }


# -- command line ---------------------------------------------------------------------------------

# Records per configuration: about 10–20 s each on the 2-core development machine.
DEFAULT_RECORDS = {20: 60_000, 1000: 30_000}


def default_records(fmt: InputFormat) -> int:
    if fmt.chunk_ms in DEFAULT_RECORDS:
        return DEFAULT_RECORDS[fmt.chunk_ms]
    return int(np.interp(fmt.chunk_ms, [20, 1000], [60_000, 30_000]))


class _Broker:
    """The given broker, or a local one started for the run and stopped after it."""

    def __init__(self, bootstrap: str | None) -> None:
        self.bootstrap = bootstrap or ""
        self._data_dir: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> str:
        if self.bootstrap:
            return self.bootstrap
        self._data_dir = tempfile.TemporaryDirectory(prefix="bench-loop-kafka-")
        _say(f"starting a local broker (deploy/kafka-local, data in {self._data_dir.name})")
        started = self._run("start", 600)
        if started.returncode != 0:
            raise RuntimeError(f"deploy/kafka-local start failed:\n{started.stderr}")
        self.bootstrap = started.stdout.strip()
        return self.bootstrap

    def __exit__(self, *exc: object) -> None:
        if self._data_dir is not None:
            stopped = self._run("stop", 120)
            if stopped.returncode != 0:
                _say(f"deploy/kafka-local stop failed:\n{stopped.stderr}")
            self._data_dir.cleanup()

    def _run(self, command: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        assert self._data_dir is not None
        return subprocess.run(
            [str(KAFKA_LOCAL), command, "--data-dir", self._data_dir.name],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench loop",
        description="Throughput and added latency of the Kafka worker loop with a "
        "pass-through engine (no model).",
    )
    parser.add_argument(
        "--bootstrap",
        help="Kafka bootstrap servers [default: $KAFKA_BOOTSTRAP_SERVERS, else a local broker "
        "started for the run]",
    )
    parser.add_argument(
        "--formats",
        default="pcm16k:20,pcm16k:1000,mulaw8k:20",
        help="inputs to time, ENCODING:CHUNK_MS (pcm16k, mulaw8k) [default: %(default)s]",
    )
    parser.add_argument("--modes", default=",".join(MODES), help="[default: %(default)s]")
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams [200]")
    parser.add_argument(
        "--records",
        type=int,
        help="records per configuration [default: 60,000 at 20 ms, 30,000 at 1 s]",
    )
    parser.add_argument("--partitions", type=int, default=4, help="input partitions [4]")
    parser.add_argument(
        "--transaction-interval-ms", type=int, default=200, help="worker checkpoint interval [200]"
    )
    parser.add_argument(
        "--latency-rates",
        default="1000,5000",
        help="records/s of the latency runs, one run each [default: %(default)s]",
    )
    parser.add_argument(
        "--latency-streams",
        type=int,
        help="streams of a latency run [default: as many as the rate keeps at real time, "
        "rate × 20 ms]",
    )
    parser.add_argument("--latency-sec", type=float, default=15.0, help="latency run length [15]")
    parser.add_argument("--no-throughput", action="store_true", help="skip the throughput runs")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency runs")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run the worker under cProfile, write DIR/<config>.pstats and .txt (rates drop)",
    )
    parser.add_argument(
        "--markdown", type=Path, metavar="PATH", help=f"append a '{SECTION_TITLE}' section"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _quiet_worker_logs()
    try:
        formats = [parse_format(spec) for spec in _csv(args.formats)]
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    modes = _csv(args.modes)
    if bad := [m for m in modes if m not in MODES]:
        print(f"unknown delivery modes {bad}; expected some of {MODES}", file=sys.stderr)
        return 2
    command = "python -m bench loop" + (
        " " + " ".join(sys.argv[1:] if argv is None else argv) if (argv or sys.argv[1:]) else ""
    )
    run_id = time.strftime("%Y%m%d%H%M%S") + uuid.uuid4().hex[:4]
    throughput: list[ThroughputResult] = []
    latency: list[LatencyResult] = []
    _say(f"load average {load_1m():.1f}; importing the worker loop")
    with _Broker(args.bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")) as bootstrap:
        if not args.no_throughput:
            for fmt in formats:
                throughput += bench_throughput(
                    bootstrap,
                    fmt,
                    records=args.records or default_records(fmt),
                    streams=args.streams,
                    modes=modes,
                    partitions=args.partitions,
                    transaction_interval_ms=args.transaction_interval_ms,
                    profile_dir=args.profile,
                    run_id=run_id,
                )
        for rate in [] if args.no_latency else [float(r) for r in _csv(args.latency_rates)]:
            streams = args.latency_streams or max(1, round(rate * PCM_20MS.chunk_ms / 1000))
            for delivery in modes:
                result = run_latency(
                    bootstrap,
                    delivery,
                    rate=rate,
                    streams=streams,
                    seconds=args.latency_sec,
                    partitions=args.partitions,
                    transaction_interval_ms=args.transaction_interval_ms,
                    run_id=f"{run_id}-r{rate:.0f}",
                )
                _say(
                    f"  latency, {delivery}: produced p95 {result.produced_ms[1]:.1f} ms, "
                    f"visible p95 {result.visible_ms[1]:.1f} ms"
                )
                latency.append(result)
    if throughput:
        print(throughput_table(throughput))
    if latency:
        print(latency_table(latency))
    if args.profile is not None:
        for path in sorted(args.profile.glob("*.pstats")):
            report = profile_report(path)
            path.with_suffix(".txt").write_text(report, encoding="utf-8")
            _say(f"profile: {path.with_suffix('.txt')}")
    if args.json is not None:
        write_json(args.json, results_json(command, throughput, latency))
        _say(f"wrote {args.json}")
    if args.markdown is not None:
        section = markdown_section(command, throughput, latency, args.transaction_interval_ms)
        append_markdown(args.markdown, section)
        _say(f"appended '{SECTION_TITLE}' to {args.markdown}")
    return 0 if all(r.complete for r in throughput) and all(not r.missing for r in latency) else 1


if __name__ == "__main__":
    sys.exit(main())
