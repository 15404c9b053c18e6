"""The worker loop: consume → decode → admit to its stream → engine step → produce → checkpoint.

Thread rule: one thread runs this loop and owns the consumer, the producer and the engine
(and so the GPU). The only other thread is the HTTP endpoints' (metrics, health).

Delivery. In ``exactly_once`` mode every checkpoint is one Kafka transaction holding the
transcript events and dead letters produced since the last one, the progress records of the
streams that changed, and the consumer offsets (``send_offsets_to_transaction``). In
``at_least_once`` mode the same records are flushed, and then the offsets committed.

Recovery by replay. A stream's model state (≈30 MB at real size) is not checkpointed; its
audio is. The progress topic (compacted, written in the same transaction) holds, per open
stream, the offset of its first record and how many events it has emitted. The invariant:

    after every checkpoint, for each open stream of a partition, the committed output holds
    exactly its first ``events_emitted`` events, and the committed offset is past every
    record the worker has read.

A new owner of a partition reads the progress of its open streams, seeks to the smallest
first offset, re-feeds each open stream's records below the committed offset to the engine
(which is deterministic per stream) while swallowing the first ``events_emitted`` events, and
skips every other record below the committed offset (already handled). So nothing committed is
emitted twice and nothing is lost; the committed offset stays the processing position, so
consumer lag is reported from it. The input topic must retain records for as long as a stream
can stay open (``max_stream_sec`` plus ``idle_timeout_sec``), and recovery re-reads at most
that much audio per open stream.

Rebalances (cooperative): revoked partitions are checkpointed, then their streams dropped
from the engine (the new owner resumes them); lost partitions, and any failed transaction,
abort the open transaction and rebuild every owned stream from the last checkpoint.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from schemas import (
    AudioChunk,
    CodecError,
    DeadLetter,
    EventKind,
    RecordCodec,
    StreamProgress,
    TranscriptEvent,
    Word,
    make_event_id,
)
from worker.audio import AudioDecoder, AudioFormatError, check_format
from worker.config import DeliveryMode, GapPolicy, WorkerConfig
from worker.engine.results import StreamError, StreamUpdate
from worker.metrics import Health, Metrics
from worker.service.streams import EndedStreams, OpenStream, Order, PartitionStreams

log = logging.getLogger(__name__)

_CONSUME_BATCH = 1000
_SAMPLE_RATE = 16_000


class Engine(Protocol):
    """What the loop needs of the streaming engine (``worker.engine.engine.StreamingEngine``)."""

    def add_stream(self, stream_id: str) -> None: ...
    def push_audio(self, stream_id: str, samples: np.ndarray, sequence: int = -1) -> None: ...
    def end_stream(self, stream_id: str) -> None: ...
    def drop_stream(self, stream_id: str) -> None: ...
    def has_stream(self, stream_id: str) -> bool: ...
    def ready_streams(self) -> list[str]: ...
    def step(self) -> list[StreamUpdate]: ...
    def buffered_sec(self, stream_id: str) -> float: ...


@dataclass(frozen=True)
class ModelNames:
    diarizer: str
    asr: str


class FatalWorkerError(RuntimeError):
    """The worker cannot go on (e.g. fenced by a newer instance); it stops without committing."""


class Worker:
    """One consumer-group member. ``run()`` until ``stop()``; see the module docstring."""

    def __init__(
        self,
        config: WorkerConfig,
        engine: Engine,
        models: ModelNames,
        metrics: Metrics,
        health: Health,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        device_memory: Callable[[], int] | None = None,
    ) -> None:
        self.cfg = config
        self.engine = engine
        self.models = models
        self.metrics = metrics
        self.health = health
        self.clock = clock
        self.wall_ms = wall_ms
        self.device_memory = device_memory  # bytes the engine holds on its device, if measurable
        self.instance = config.instance_id or f"worker-{uuid.uuid4().hex[:8]}"
        self.eos = config.delivery is DeliveryMode.EXACTLY_ONCE
        wf = config.wire_format
        self.chunks = RecordCodec(AudioChunk, wf, schema_id=config.schema_id_audio_chunk)
        self.events = RecordCodec(TranscriptEvent, wf, schema_id=config.schema_id_transcript_event)
        self.dead = RecordCodec(DeadLetter, wf, schema_id=config.schema_id_dead_letter)
        self.progress = RecordCodec(StreamProgress)
        self.parts: dict[int, PartitionStreams] = {}
        self.by_id: dict[str, OpenStream] = {}
        self.ended = EndedStreams(config.ended_streams_remembered)
        self.positions: dict[int, int] = {}  # partition -> next offset to process
        self.paused: set[int] = set()
        self.admission_blocked: set[int] = set()
        self._stopping = False
        self._last_checkpoint = clock()
        self._delivery_errors: list[str] = []
        self._need_rebuild = False
        self._produced = 0  # records produced since the last checkpoint
        self._committed_positions: dict[int, int] = {}
        self.consumer = Consumer(self._consumer_conf())
        self.producer = Producer(self._producer_conf())

    # -- clients ----------------------------------------------------------------------------

    def _consumer_conf(self) -> dict:
        conf = {
            "bootstrap.servers": self.cfg.bootstrap_servers,
            "group.id": self.cfg.group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "isolation.level": "read_committed",
            "max.poll.interval.ms": self.cfg.max_poll_interval_ms,
            "session.timeout.ms": self.cfg.session_timeout_ms,
            "statistics.interval.ms": 5000,
            "stats_cb": self.metrics.on_client_stats,
            "logger": logging.getLogger("kafka.consumer"),
        }
        if self.cfg.instance_id:
            conf["group.instance.id"] = self.cfg.instance_id
        return conf

    def _producer_conf(self) -> dict:
        conf = {
            "bootstrap.servers": self.cfg.bootstrap_servers,
            "enable.idempotence": True,
            "linger.ms": 5,
            "compression.type": "lz4",
            "logger": logging.getLogger("kafka.producer"),
        }
        if self.eos:
            conf["transactional.id"] = f"{self.cfg.group_id}-{self.instance}"
            conf["transaction.timeout.ms"] = self.cfg.transaction_timeout_ms
        return conf

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until ``stop()``; then drain, checkpoint and leave the group."""
        if self.eos:
            self.producer.init_transactions(30)
            self.producer.begin_transaction()
        self.consumer.subscribe(
            [self.cfg.input_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info(
            "worker %s consuming %s as group %s (%s)",
            self.instance,
            self.cfg.input_topic,
            self.cfg.group_id,
            self.cfg.delivery,
        )
        try:
            while not self._stopping:
                self.run_once()
            self._drain()
        finally:
            self.consumer.close()  # leaves the group; revocation checkpoints once more
            self.producer.flush(10)
            log.info("worker %s stopped", self.instance)

    def stop(self) -> None:
        """Ask the loop to finish its current step, checkpoint and exit (signal-safe)."""
        self._stopping = True

    def run_once(self) -> None:
        """One turn: poll, admit records, one engine step, maybe a checkpoint."""
        self.health.beat()
        self.health.assigned_or_idle = True
        if self._need_rebuild:
            self._rebuild_all()
        messages = self._consume()
        blocked: set[int] = set()
        for message in messages:
            if message.partition() in blocked:
                continue
            if message.error():
                self._on_consume_error(message.error())
                continue
            if not self._handle(message):
                blocked.add(message.partition())
        self._end_idle_streams()
        if self.engine.ready_streams():
            self._emit(self.engine.step())
            if self.device_memory is not None:
                self.metrics.on_gpu_memory(self.device_memory())
        self._apply_backpressure()
        due = self.clock() - self._last_checkpoint >= self.cfg.transaction_interval_ms / 1000
        if due and (self._produced or self.positions != self._committed_positions):
            self.checkpoint()

    def _consume(self) -> list[Message]:
        """What is fetched already, without waiting; else wait up to the poll timeout for the
        first record and take what came with it (``consume(n, t)`` would wait out ``t``)."""
        messages = self.consumer.consume(_CONSUME_BATCH, 0)
        if messages or self.engine.ready_streams():
            return messages
        first = self.consumer.consume(1, self.cfg.poll_timeout_ms / 1000)
        return first + self.consumer.consume(_CONSUME_BATCH - 1, 0) if first else first

    def _drain(self) -> None:
        """Shutdown, after the step in flight: stop fetching and checkpoint. Audio still
        buffered is not stepped: the next owner replays it, so leaving is quick."""
        self._pause(set(self.parts))
        self.checkpoint()

    def _on_consume_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        if error.fatal():
            raise FatalWorkerError(f"consumer: {error}")
        log.warning("consumer error: %s", error)

    # -- one record --------------------------------------------------------------------------

    def _handle(self, message: Message) -> bool:
        """Admit one input record. False: the partition is blocked (seeked back to it)."""
        partition, offset = message.partition(), message.offset()
        part = self.parts.get(partition)
        if part is None:  # revoked while this batch was in flight
            return False
        replaying = offset < part.replay_end
        if not replaying:
            self.metrics.on_record(partition)
        key = message.key()
        value = message.value()
        stream_id = key.decode("utf-8", errors="replace") if key else None

        def reject(reason: str, text: str) -> bool:
            if not replaying:
                self._dead_letter(message, reason, text, stream_id)
            self._advance(partition, offset)
            return True

        if replaying and (
            stream_id not in part.streams or offset < part.streams[stream_id].first_offset
        ):
            self._advance(partition, offset)
            return True  # handled before the checkpoint this replay starts from
        if replaying:
            self.metrics.on_replayed()
        if not key:
            return reject("missing_key", "record has no key; the key must be the stream id")
        try:
            chunk = self.chunks.decode(value)
        except CodecError as exc:
            return reject(exc.reason, exc.message)
        if chunk.stream_id != stream_id:
            return reject("key_mismatch", f"key {stream_id!r} != stream_id {chunk.stream_id!r}")
        if len(chunk.stream_id) > self.cfg.max_stream_id_length:
            return reject(
                "stream_id_too_long", f"stream id longer than {self.cfg.max_stream_id_length}"
            )
        if len(chunk.payload) > self.cfg.max_payload_bytes:
            return reject(
                "payload_too_large",
                f"payload of {len(chunk.payload)} bytes exceeds {self.cfg.max_payload_bytes}",
            )
        try:
            check_format(chunk.encoding, chunk.sample_rate_hz, chunk.channels)
        except AudioFormatError as exc:
            return reject(exc.reason, exc.message)
        seconds = (
            len(chunk.payload)
            / max(1, chunk.channels * _bytes_per_sample(chunk))
            / chunk.sample_rate_hz
        )
        if seconds > self.cfg.max_chunk_sec:
            return reject(
                "chunk_too_long", f"chunk of {seconds:.1f} s exceeds {self.cfg.max_chunk_sec} s"
            )

        stream = part.streams.get(stream_id)
        if stream is None:
            ended_as = self.ended.reason(stream_id)
            if ended_as is not None:
                return reject(ended_as, f"stream {stream_id!r} is over ({ended_as})")
            if stream_id in self.by_id:
                return reject(
                    "stream_on_other_partition", "the same stream id arrived on two partitions"
                )
            if chunk.sequence != 0:
                return reject(
                    "missing_stream_start",
                    f"first chunk seen of {stream_id!r} has sequence {chunk.sequence}, not 0",
                )
            if len(self.by_id) >= self.cfg.max_streams:
                self._block_for_admission(partition, offset)
                return False
            stream = self._open(part, stream_id, offset, chunk.capture_time_ms)
        verdict = stream.order(chunk.sequence)
        if verdict is Order.DUPLICATE:
            if not replaying:
                self.metrics.on_duplicate()
            self._advance(partition, offset)
            return True
        if verdict is Order.GAP:
            missing = chunk.sequence - stream.next_sequence
            if not replaying:
                self.metrics.on_gap(self.cfg.gap_policy)
            if self.cfg.gap_policy is GapPolicy.DEAD_LETTER:
                return reject(
                    "sequence_gap",
                    f"expected sequence {stream.next_sequence}, got {chunk.sequence}",
                )
            if self.cfg.gap_policy is GapPolicy.END_STREAM:
                self._dead_letter_if_live(
                    message,
                    replaying,
                    "sequence_gap",
                    f"{missing} chunks missing: stream ended",
                    stream_id,
                )
                self._end(stream)
                self._advance(partition, offset)
                return True
            self._push(
                stream,
                np.zeros(
                    int(missing * stream.last_chunk_samples * _SAMPLE_RATE / chunk.sample_rate_hz),
                    dtype=np.float32,
                ),
                chunk.sequence - 1,
            )
        try:
            if stream.decoder is None:
                stream.decoder = AudioDecoder(chunk.encoding, chunk.sample_rate_hz, chunk.channels)
            samples = stream.decoder.decode(
                chunk.payload,
                encoding=chunk.encoding,
                sample_rate=chunk.sample_rate_hz,
                channels=chunk.channels,
            )
        except AudioFormatError as exc:
            return reject(exc.reason, exc.message)
        stream.next_sequence = chunk.sequence + 1
        stream.last_chunk_samples = len(chunk.payload) // max(
            1, chunk.channels * _bytes_per_sample(chunk)
        )
        stream.last_seen = self.clock()
        stream.seconds_in += seconds
        if not replaying:
            self.metrics.on_audio(seconds)
        if chunk.sequence == 0:
            stream.capture_start_ms = chunk.capture_time_ms
        self._advance(partition, offset)
        error = self._push(stream, samples, chunk.sequence)
        if error is not None:
            return reject(error.reason, error.message)
        if chunk.end_of_stream or stream.seconds_in >= self.cfg.max_stream_sec:
            self._end(stream)
        return True

    def _advance(self, partition: int, offset: int) -> None:
        """The record at ``offset`` is handled. Replayed records lie below the committed
        offset, which must never move back."""
        if offset + 1 > self.positions.get(partition, -1):
            self.positions[partition] = offset + 1

    def _push(self, stream: OpenStream, samples: np.ndarray, sequence: int) -> StreamError | None:
        """Hand audio to the engine; a stream whose audio the engine refuses has failed."""
        try:
            self.engine.push_audio(stream.stream_id, samples, sequence)
        except StreamError as exc:
            self._fail(stream, exc)
            return exc
        return None

    def _open(
        self, part: PartitionStreams, stream_id: str, offset: int, capture_ms: int
    ) -> OpenStream:
        stream = OpenStream(
            stream_id,
            part.partition,
            first_offset=offset,
            capture_start_ms=capture_ms,
            last_seen=self.clock(),
        )
        part.streams[stream_id] = stream
        self.by_id[stream_id] = stream
        self.engine.add_stream(stream_id)
        self.metrics.on_streams(len(self.by_id))
        return stream

    def _end(self, stream: OpenStream) -> None:
        if stream.decoder is not None:
            tail = stream.decoder.flush()
            if len(tail):
                self._push(stream, tail, stream.next_sequence - 1)
        if self.engine.has_stream(stream.stream_id):
            stream.ending = True
            self.engine.end_stream(stream.stream_id)

    def _end_idle_streams(self) -> None:
        now = self.clock()
        for stream in list(self.by_id.values()):
            if not stream.ending and now - stream.last_seen > self.cfg.idle_timeout_sec:
                log.info(
                    "stream %s idle for %.0f s: ending it", stream.stream_id, now - stream.last_seen
                )
                self._end(stream)

    def _fail(self, stream: OpenStream, error: StreamError) -> None:
        log.warning("stream %s failed: %s (%s)", stream.stream_id, error.message, error.reason)
        self.engine.drop_stream(stream.stream_id)
        self._forget(stream, reason="stream_failed")

    def _forget(self, stream: OpenStream, reason: str = "stream_ended") -> None:
        """The stream is over (ended or failed): tombstone its progress, remember why."""
        part = self.parts.get(stream.partition)
        if part is not None:
            part.streams.pop(stream.stream_id, None)
            if stream.stream_id in part.recovering:
                self._recovered(stream)
        self.by_id.pop(stream.stream_id, None)
        self.ended.add(stream.stream_id, reason)
        self._produce_progress(stream, closed=True)
        self.metrics.on_streams(len(self.by_id))
        self._resume_admission()

    # -- outputs -----------------------------------------------------------------------------

    def _emit(self, updates: list[StreamUpdate]) -> None:
        timing = getattr(self.engine, "last_timing", None)
        audio = sum(u.audio_sec for u in updates)
        if timing is not None:
            self.metrics.on_step(
                timing.streams, timing.instances, timing.diarizer, timing.asr, timing.total, audio
            )
        for update in updates:
            stream = self.by_id.get(update.stream_id)
            if stream is None:
                continue
            if update.error is not None:
                self._fail(stream, update.error)
                continue
            for segment, span in update.segments:
                stream.segments = max(stream.segments, segment.segment_index + 1)
                kind = EventKind.FINAL if segment.final else EventKind.PARTIAL
                start_ms = stream.capture_start_ms + round(segment.start_s * 1000)
                end_ms = stream.capture_start_ms + round(segment.end_s * 1000)
                self._produce_event(
                    stream,
                    TranscriptEvent(
                        event_id=make_event_id(
                            stream.stream_id, segment.segment_index, segment.revision
                        ),
                        stream_id=stream.stream_id,
                        kind=kind,
                        segment_index=segment.segment_index,
                        revision=segment.revision,
                        speaker=segment.speaker,
                        start_s=segment.start_s,
                        end_s=segment.end_s,
                        start_time_ms=start_ms,
                        end_time_ms=end_ms,
                        text=segment.text,
                        words=tuple(Word(w.text, w.start_s, w.end_s) for w in segment.words),
                        first_sequence=span.first,
                        last_sequence=span.last,
                        diarizer_model=self.models.diarizer,
                        asr_model=self.models.asr,
                    ),
                    latency_from_ms=end_ms,
                )
            if update.ended:
                duration = stream.seconds_in
                self._produce_event(
                    stream,
                    TranscriptEvent(
                        event_id=make_event_id(stream.stream_id, stream.segments, 0),
                        stream_id=stream.stream_id,
                        kind=EventKind.STREAM_END,
                        segment_index=stream.segments,
                        revision=0,
                        speaker=None,
                        start_s=0.0,
                        end_s=duration,
                        start_time_ms=stream.capture_start_ms,
                        end_time_ms=stream.capture_start_ms + round(duration * 1000),
                        text="",
                        words=(),
                        first_sequence=0,
                        last_sequence=max(0, stream.next_sequence - 1),
                        diarizer_model=self.models.diarizer,
                        asr_model=self.models.asr,
                    ),
                    latency_from_ms=None,
                )
                self._forget(stream)
            elif update.segments:
                stream.dirty = True

    def _produce_event(
        self, stream: OpenStream, event: TranscriptEvent, latency_from_ms: int | None
    ) -> None:
        if stream.suppress > 0:  # committed before the replay started
            stream.suppress -= 1
            if stream.suppress == 0:
                self._recovered(stream)
            return
        stream.events_emitted += 1
        stream.dirty = True
        self._produce(self.cfg.output_topic, event.stream_id.encode(), self.events.encode(event))
        latency = None if latency_from_ms is None else (self.wall_ms() - latency_from_ms) / 1000
        self.metrics.on_event(str(event.kind), latency)

    def _recovered(self, stream: OpenStream) -> None:
        """The stream has re-made every event it had committed: it is where its old owner was."""
        part = self.parts.get(stream.partition)
        if part is None or stream.stream_id not in part.recovering:
            return
        part.recovering.discard(stream.stream_id)
        if not part.recovering:
            elapsed = self.clock() - part.recovery_started
            self.metrics.on_recovery(elapsed)
            log.info("partition %d: open streams rebuilt in %.1f s", part.partition, elapsed)

    def _dead_letter(self, message: Message, reason: str, text: str, stream_id: str | None) -> None:
        log.info(
            "dead letter %s[%d]@%d: %s: %s",
            message.topic(),
            message.partition(),
            message.offset(),
            reason,
            text,
        )
        record = DeadLetter(
            reason=reason,
            message=text,
            source_topic=message.topic(),
            source_partition=message.partition(),
            source_offset=message.offset(),
            failed_time_ms=self.wall_ms(),
            stream_id=stream_id,
            original_key=message.key(),
            original_value=message.value(),
            worker_id=self.instance,
        )
        self._produce(self.cfg.dead_letter_topic, message.key(), self.dead.encode(record))
        self.metrics.on_dead_letter(reason)

    def _dead_letter_if_live(
        self, message: Message, replaying: bool, reason: str, text: str, stream_id: str | None
    ) -> None:
        if not replaying:
            self._dead_letter(message, reason, text, stream_id)

    def _produce_progress(self, stream: OpenStream, closed: bool = False) -> None:
        key = f"{self.cfg.input_topic}/{stream.partition}/{stream.stream_id}".encode()
        value = (
            None
            if closed
            else self.progress.encode(
                StreamProgress(
                    stream_id=stream.stream_id,
                    input_topic=self.cfg.input_topic,
                    partition=stream.partition,
                    first_offset=stream.first_offset,
                    events_emitted=stream.events_emitted,
                    segments=stream.segments,
                )
            )
        )
        self._produce(self.cfg.progress_topic, key, value)
        stream.dirty = False

    def _produce(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
                self._produced += 1
                return
            except BufferError:
                self.producer.poll(0.05)  # local queue full: let deliveries drain

    def _on_delivery(self, err: KafkaError | None, message: Message) -> None:
        if err is not None:
            self._delivery_errors.append(f"{message.topic()}: {err}")

    # -- checkpoint --------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Outputs, progress and offsets, together (see the module docstring)."""
        for part in self.parts.values():
            for stream in part.streams.values():
                if stream.dirty and stream.suppress == 0:
                    self._produce_progress(stream)
        offsets = [
            TopicPartition(self.cfg.input_topic, p, off)
            for p, off in self.positions.items()
            if p in self.parts
        ]
        try:
            if self.eos:
                if offsets:
                    self.producer.send_offsets_to_transaction(
                        offsets, self.consumer.consumer_group_metadata(), 30
                    )
                self.producer.commit_transaction(30)
                self.producer.begin_transaction()
            else:
                remaining = self.producer.flush(30)
                if remaining or self._delivery_errors:
                    raise KafkaException(
                        KafkaError(
                            KafkaError._MSG_TIMED_OUT,
                            f"{remaining} undelivered; {self._delivery_errors[:3]}",
                        )
                    )
                if offsets:
                    self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0]
            self.metrics.on_transaction("abort")
            if self.eos and error.txn_requires_abort():
                log.warning(
                    "checkpoint failed (%s): aborting and rebuilding from the last one", error
                )
                self.producer.abort_transaction(30)
                self.producer.begin_transaction()
                self._need_rebuild = True
                return
            raise FatalWorkerError(f"checkpoint failed: {error}") from exc
        self._delivery_errors.clear()
        self._produced = 0
        self._committed_positions = dict(self.positions)
        self.metrics.on_transaction("commit")
        self._last_checkpoint = self.clock()

    # -- partitions ----------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.metrics.on_rebalance("assigned")
        ids = [tp.partition for tp in partitions]
        log.info("assigned partitions %s", ids)
        starts = self._prepare(ids)
        consumer.incremental_assign(
            [TopicPartition(self.cfg.input_topic, p, starts[p]) for p in ids]
        )

    def _prepare(self, partitions: list[int]) -> dict[int, int]:
        """Register the open streams of ``partitions`` from the progress topic; start offsets."""
        committed = {
            tp.partition: tp.offset
            for tp in self.consumer.committed(
                [TopicPartition(self.cfg.input_topic, p) for p in partitions], timeout=30
            )
        }
        progress = read_progress(self.cfg, set(partitions))
        starts: dict[int, int] = {}
        for p in partitions:
            part = PartitionStreams(p)
            done = committed.get(p, -1)
            part.replay_end = done if done >= 0 else -1
            self.parts[p] = part
            opened = progress.get(p, [])
            for rec in opened:
                stream = OpenStream(
                    rec.stream_id,
                    p,
                    first_offset=rec.first_offset,
                    events_emitted=rec.events_emitted,
                    suppress=rec.events_emitted,
                    segments=rec.segments,
                    last_seen=self.clock(),
                    dirty=False,
                )
                part.streams[rec.stream_id] = stream
                self.by_id[rec.stream_id] = stream
                self.engine.add_stream(rec.stream_id)
                if rec.events_emitted:
                    part.recovering.add(rec.stream_id)
            part.recovery_started = self.clock()
            firsts = [rec.first_offset for rec in opened]
            if done >= 0:
                starts[p] = min([done, *firsts])
                self.positions[p] = done
            else:
                starts[p] = OFFSET_BEGINNING
            if opened:
                log.info(
                    "partition %d: rebuilding %d open streams from offset %d (committed %d)",
                    p,
                    len(opened),
                    starts[p],
                    done,
                )
        self.metrics.on_streams(len(self.by_id))
        return starts

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.metrics.on_rebalance("revoked")
        ids = {tp.partition for tp in partitions}
        log.info("revoked partitions %s: checkpointing and handing over", sorted(ids))
        if not self._need_rebuild:
            self.checkpoint()
        self._release(ids)
        consumer.incremental_unassign(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.metrics.on_rebalance("lost")
        ids = {tp.partition for tp in partitions}
        log.warning("lost partitions %s: dropping them without committing", sorted(ids))
        if self.eos:
            self.producer.abort_transaction(30)
            self.producer.begin_transaction()
            self.metrics.on_transaction("abort")
            self._need_rebuild = True  # the aborted outputs of the other partitions, too
        self._release(ids)
        consumer.incremental_unassign(partitions)

    def _release(self, partitions: set[int]) -> None:
        for p in partitions:
            part = self.parts.pop(p, None)
            self.positions.pop(p, None)
            self.paused.discard(p)
            self.admission_blocked.discard(p)
            if part is None:
                continue
            for stream in part.streams.values():
                self.engine.drop_stream(stream.stream_id)
                self.by_id.pop(stream.stream_id, None)
        self.metrics.on_streams(len(self.by_id))

    def _rebuild_all(self) -> None:
        """Forget every owned stream and replay all owned partitions from the last checkpoint."""
        self._need_rebuild = False
        owned = sorted(self.parts)
        self._release(set(owned))
        if not owned:
            return
        starts = self._prepare(owned)
        for p in owned:
            self.consumer.seek(TopicPartition(self.cfg.input_topic, p, starts[p]))
        log.info("rebuilt partitions %s from the last checkpoint", owned)

    # -- backpressure ---------------------------------------------------------------------------

    def _block_for_admission(self, partition: int, offset: int) -> None:
        log.info(
            "stream limit %d reached: pausing partition %d at offset %d",
            self.cfg.max_streams,
            partition,
            offset,
        )
        self.consumer.seek(TopicPartition(self.cfg.input_topic, partition, offset))
        self.admission_blocked.add(partition)
        self._pause({partition})

    def _resume_admission(self) -> None:
        if self.admission_blocked and len(self.by_id) < self.cfg.max_streams:
            blocked, self.admission_blocked = self.admission_blocked, set()
            self._resume(blocked)

    def _apply_backpressure(self) -> None:
        buffered = sum(self.engine.buffered_sec(s) for s in self.by_id if self.engine.has_stream(s))
        limit = self.cfg.max_worker_buffered_sec
        if buffered > limit:
            self._pause(set(self.parts) - self.paused)
        elif buffered < limit / 2 and self.paused - self.admission_blocked:
            self._resume(self.paused - self.admission_blocked)

    def _pause(self, partitions: set[int]) -> None:
        if partitions:
            self.consumer.pause([TopicPartition(self.cfg.input_topic, p) for p in partitions])
            self.paused |= partitions
            self.metrics.on_paused(len(self.paused))

    def _resume(self, partitions: set[int]) -> None:
        partitions &= set(self.parts)
        if partitions:
            self.consumer.resume([TopicPartition(self.cfg.input_topic, p) for p in partitions])
            self.paused -= partitions
            self.metrics.on_paused(len(self.paused))


def _bytes_per_sample(chunk: AudioChunk) -> int:
    return 2 if chunk.encoding == "PCM_S16LE" else 1


def _watermarks(consumer: Consumer, tp: TopicPartition, attempts: int = 20) -> tuple[int, int]:
    """Low and high offsets; a topic created a moment ago may not have a leader yet."""
    for attempt in range(attempts):
        try:
            return consumer.get_watermark_offsets(tp, timeout=30)
        except KafkaException as exc:
            if attempt == attempts - 1 or not exc.args[0].retriable():
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def read_progress(config: WorkerConfig, partitions: set[int]) -> dict[int, list[StreamProgress]]:
    """Open streams of ``partitions`` from the (committed) progress topic."""
    codec = RecordCodec(StreamProgress)
    consumer = Consumer(
        {
            "bootstrap.servers": config.bootstrap_servers,
            "group.id": f"{config.group_id}-progress-reader",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        meta = consumer.list_topics(config.progress_topic, timeout=30).topics.get(
            config.progress_topic
        )
        if meta is None or meta.error is not None:
            raise FatalWorkerError(
                f"progress topic {config.progress_topic!r} is missing: create it "
                "(compacted) before starting workers"
            )
        tps = []
        for pid in meta.partitions:
            low, high = _watermarks(consumer, TopicPartition(config.progress_topic, pid))
            if high > low:
                tps.append(TopicPartition(config.progress_topic, pid, low))
        latest: dict[bytes, bytes | None] = {}
        if tps:
            consumer.assign(tps)
            remaining = {tp.partition for tp in tps}
            while remaining:
                msg = consumer.poll(5.0)
                if msg is None:
                    raise FatalWorkerError("timed out reading the progress topic")
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        remaining.discard(msg.partition())
                        continue
                    raise FatalWorkerError(f"reading progress: {msg.error()}")
                latest[msg.key()] = msg.value()
    finally:
        consumer.close()
    prefix = f"{config.input_topic}/"
    out: dict[int, list[StreamProgress]] = {}
    for key, value in latest.items():
        if value is None or not key.decode().startswith(prefix):
            continue
        rec = codec.decode(value)
        if rec.partition in partitions:
            out.setdefault(rec.partition, []).append(rec)
    for recs in out.values():
        recs.sort(key=lambda r: r.first_offset)
    return out
