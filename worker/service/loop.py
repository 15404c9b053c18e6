"""The worker loop: consume → inspect → admit to its call → engine step → produce → checkpoint.

Thread rule: one thread runs this loop and owns the consumer, the producer and the engine
(and so the GPU). The only other thread is the HTTP endpoints' (metrics, health).

The invariant. After every checkpoint, for each partition the worker owns:

    the committed input offset is past every record handled; the progress topic holds, for
    each call open at that point, its first offset, its committed event count and last event
    id (and where it ended, if it is finishing), plus a marker with the committed offset; and
    the committed output holds exactly those events of each call, and every dead letter of a
    record below the committed offset.

In ``exactly_once`` mode outputs, progress and offsets are one transaction (``checkpoint.py``).

Output is a function of the input records alone. A call's events depend only on its own
records: the engine steps a call one fixed-size chunk at a time, and a call that has ended is
told so only once none of its full chunks is waiting, so the same records give the same
events however they were batched. A call in ``split`` channel mode is one engine stream per
channel (``channels.py``), each ended by the same rule, their updates merged in a fixed turn
(``streams.py``): the same holds. Idle ends run on event time (record timestamps of the
partition); only a partition with no record at all for ``idle_timeout_sec`` ends its calls on
the wall clock, and that decision is committed with its effects. Pausing (a full worker, a
call far ahead of the engine) changes timing, never output.

Recovery by replay (``recovery.py``). A new owner of a partition, or this worker after an
aborted transaction, reads the last checkpoint, seeks to the first record of the oldest open
call, re-feeds each open call's records below the committed offset to the engine and swallows
the events it re-makes up to the last committed one, matched by id; every other record below
the committed offset was handled before and is skipped. The input topic must keep records for
as long as a call can stay open (``max_stream_sec`` plus ``idle_timeout_sec``); a call whose
first record is gone is ended with a ``replay_unavailable`` dead letter.

Failures: a bad record is a dead letter with a reason, never an exception out of the loop; an
aborted transaction drops the turn and rebuilds every owned call from the last checkpoint; a
fatal producer error replaces the producer, a fatal consumer error (a static member fenced)
the consumer, both bounded; only a broken worker stops the loop, without committing.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from schemas import (
    AudioChunk,
    Codec,
    EventKind,
    PartitionCheckpoint,
    RecordCodec,
    RegistryUnavailable,
    StreamProgress,
    TranscriptEvent,
    make_codec,
)
from schemas import DeadLetter as DeadLetterRecord
from worker.audio import TARGET_SAMPLE_RATE, AudioDecoder
from worker.config import DeliveryMode, GapPolicy, WorkerConfig
from worker.engine.results import StreamError, StreamUpdate
from worker.metrics import Health, Metrics
from worker.service.admission import Limits, Placement, Rejected, chunk_seconds, inspect, place
from worker.service.channels import LanePlan, plan_lanes
from worker.service.checkpoint import (
    Checkpoint,
    FatalConsumerError,
    FatalProducerError,
    FatalWorkerError,
    TransactionAborted,
    consumer_fatal,
)
from worker.service.clients import KafkaClients
from worker.service.events import ModelNames, Source, dead_letter, end_event, segment_event
from worker.service.recovery import (
    PartitionSnapshot,
    Recovery,
    progress_key,
    progress_partition,
)
from worker.service.streams import NO_END, Lane, OpenStream, PartitionStreams, Replay

__all__ = ["Engine", "FatalWorkerError", "ModelNames", "Worker"]

log = logging.getLogger(__name__)

_CONSUME_BATCH = 1000
_QUIET_PROBE_SEC = 1.0  # how often a quiet partition's end is confirmed with the broker


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
class _Hold:
    """Why a partition is paused at ``offset`` (it was seeked back to that record)."""

    offset: int
    stream_key: str | None  # a call too far ahead of the engine; None: waiting for a slot


class Worker:
    """One consumer-group member. ``run()`` until ``stop()``; see the module docstring."""

    def __init__(
        self,
        config: WorkerConfig,
        engine: Engine,
        models: ModelNames,
        metrics: Metrics,
        health: Health,
        clients: KafkaClients | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        sleep: Callable[[float], None] = time.sleep,
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
        self.limits = Limits(
            max_stream_id_length=config.max_stream_id_length,
            max_payload_bytes=config.max_payload_bytes,
            max_chunk_sec=config.max_chunk_sec,
            max_gap_fill_sec=config.max_gap_fill_sec,
        )

        # The three topics others read follow the configured wire format or registry; the
        # worker's own bookkeeping topics are always plain Avro.
        def codec(record_type: type, topic: str, schema_id: int) -> Codec:
            return make_codec(
                record_type,
                topic=topic,
                wire_format=config.wire_format,
                registry_url=config.schema_registry_url,
                schema_id=schema_id,
            )

        self.chunks = codec(AudioChunk, config.input_topic, config.schema_id_audio_chunk)
        self.events = codec(TranscriptEvent, config.output_topic, config.schema_id_transcript_event)
        self.dead = codec(DeadLetterRecord, config.dead_letter_topic, config.schema_id_dead_letter)
        self.progress = RecordCodec(StreamProgress)
        self.markers = RecordCodec(PartitionCheckpoint)
        self.clients = clients or KafkaClients()
        self.parts: dict[int, PartitionStreams] = {}
        self.by_key: dict[str, OpenStream] = {}  # every call held, by engine key
        self.positions: dict[int, int] = {}  # partition -> next offset to handle
        self.holds: dict[int, _Hold] = {}
        self.resync: dict[int, int] = {}  # released hold: the next record must be at this offset
        self.counted_until: dict[int, int] = {}  # records below were counted in the metrics
        self._stopping = False
        self._need_rebuild = False
        self._restarts = 0  # producer replacements since the last good commit
        self._consumer_restarts: list[float] = []  # when consumers were replaced (clock)
        self._last_checkpoint = clock()
        self._committed_positions: dict[int, int] = {}
        self._progress_partitions = 1  # set by start() from the topic
        self._closed: list[tuple[int, tuple[int, str]]] = []  # calls over, not yet tombstoned
        self.consumer = self.clients.consumer(self._consumer_conf())
        self.out = Checkpoint(
            self.clients,
            self._producer_conf(),
            self.eos,
            metrics,
            health,
            retry_sec=config.kafka_retry_sec,
            sleep=sleep,
            clock=clock,
        )
        self.recovery = Recovery(config, self.clients, health, clock=clock, sleep=sleep)

    # -- clients ----------------------------------------------------------------------------

    def _consumer_conf(self) -> dict[str, Any]:
        conf = {
            "bootstrap.servers": self.cfg.bootstrap_servers,
            "group.id": self.cfg.group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,  # tells the loop a partition is caught up
            "max.poll.interval.ms": self.cfg.max_poll_interval_ms,
            "session.timeout.ms": self.cfg.session_timeout_ms,
            "statistics.interval.ms": 5000,
            "stats_cb": self.metrics.on_client_stats,
            "logger": logging.getLogger("kafka.consumer"),
        }
        if self.cfg.instance_id:
            conf["group.instance.id"] = self.cfg.instance_id
        return conf

    def _producer_conf(self) -> dict[str, Any]:
        conf = {
            "bootstrap.servers": self.cfg.bootstrap_servers,
            "enable.idempotence": True,
            "linger.ms": 5,
            "compression.type": "lz4",
            "logger": logging.getLogger("kafka.producer"),
        }
        if self.eos:
            # Stable per worker identity: a restarted worker fences its predecessor at once.
            conf["transactional.id"] = f"{self.cfg.group_id}-{self.instance}"
            conf["transaction.timeout.ms"] = self.cfg.transaction_timeout_ms
        return conf

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until ``stop()``; then checkpoint and leave the group."""
        self.start()
        try:
            while not self._stopping:
                self.run_once()
            self._drain()
        except BaseException:
            # A fatal error: leave without committing (closing the consumer revokes, and a
            # revocation checkpoints unless a rebuild is due); the next owner rebuilds.
            self._need_rebuild = True
            raise
        finally:
            self.close()

    def start(self) -> None:
        """Open the first transaction and join the group."""
        self._progress_partitions = len(self.recovery.progress_partitions(self.consumer))
        self.out.start()
        self._subscribe()
        log.info(
            "worker %s consuming %s as group %s (%s)",
            self.instance,
            self.cfg.input_topic,
            self.cfg.group_id,
            self.cfg.delivery,
        )

    def _subscribe(self) -> None:
        self.consumer.subscribe(
            [self.cfg.input_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def close(self) -> None:
        """Leave the group (revocation checkpoints once more) and close the producer."""
        self.consumer.close()
        self.out.close()
        log.info("worker %s stopped", self.instance)

    def stop(self) -> None:
        """Ask the loop to finish its current step, checkpoint and exit (signal-safe)."""
        self._stopping = True

    def run_once(self) -> None:
        """One turn: poll, handle records, one engine step, maybe a checkpoint. A turn whose
        transaction aborts ends at once: nothing after the abort is produced or committed."""
        self.health.beat()
        try:
            if self._need_rebuild:
                self._rebuild()
            messages = self._consume()
            if self._need_rebuild:  # a rebalance callback aborted the transaction
                return
            for message in messages:
                self._on_message(message)
            self._end_quiet_partitions()
            self._step()
            self._end_drained_calls()
            self._release_holds()
            due = self.clock() - self._last_checkpoint >= self.cfg.transaction_interval_ms / 1000
            if due and (self.out.produced or self.positions != self._committed_positions):
                self.checkpoint()
        except TransactionAborted as exc:
            log.warning("transaction aborted (%s): rebuilding from the last checkpoint", exc)
            self._need_rebuild = True
        except FatalProducerError as exc:
            self._replace_producer(exc)
        except FatalConsumerError as exc:
            self._replace_consumer(exc)

    def _consume(self) -> list[Any]:
        """What is fetched already, without waiting; else wait up to the poll timeout for the
        first record and take what came with it (``consume(n, t)`` would wait out ``t``)."""
        messages = self.consumer.consume(_CONSUME_BATCH, 0)
        if not messages and not self.engine.ready_streams():
            messages = self.consumer.consume(1, self.cfg.poll_timeout_ms / 1000)
            if messages:
                messages += self.consumer.consume(_CONSUME_BATCH - 1, 0)
        # librdkafka delivers a fatal error once, maybe behind a rebalance in the same poll
        # that makes this turn return early: act on it before anything else.
        for message in messages:
            error = message.error()
            if error is not None and consumer_fatal(error):
                raise FatalConsumerError(f"consumer: {error}")
        return messages

    def _drain(self) -> None:
        """Shutdown, after the step in flight: checkpoint what is consistent. Audio still
        buffered is not stepped: the next owner replays it, so leaving is quick."""
        if self._need_rebuild:
            return  # the last transaction aborted: nothing since the last checkpoint is valid
        try:
            self.checkpoint()
        except TransactionAborted:
            self._need_rebuild = True
        except (FatalProducerError, FatalConsumerError) as exc:
            log.warning("could not checkpoint at shutdown: %s", exc)
            self._need_rebuild = True

    def _replace_producer(self, exc: FatalProducerError) -> None:
        if self._restarts >= self.cfg.max_producer_restarts:
            raise FatalWorkerError(
                f"{exc}; the producer was replaced {self._restarts} times without a "
                "successful commit since: giving up"
            ) from exc
        self._restarts += 1
        log.warning("%s: replacing the producer and rebuilding", exc)
        self.out.restart()
        self._need_rebuild = True

    def _replace_consumer(self, exc: FatalConsumerError) -> None:
        """Drop everything since the last checkpoint with the broken consumer, and join the
        group with a new one: the partitions it is given are taken from their checkpoints.
        librdkafka fences a static member whose own rejoin after a coordinator restart came
        back under a new member id (FENCED_INSTANCE_ID); that is not another worker, so the
        worker goes on. Fenced again and again, it probably is another one: exit."""
        now = self.clock()
        window = self.cfg.consumer_restart_window_sec
        self._consumer_restarts = [t for t in self._consumer_restarts if now - t < window]
        if len(self._consumer_restarts) >= self.cfg.max_consumer_restarts:
            raise FatalWorkerError(
                f"{exc}; the consumer was replaced {len(self._consumer_restarts)} times in "
                f"{window:g} s: is another worker running with instance id {self.instance!r}?"
            ) from exc
        self._consumer_restarts.append(now)
        if self.eos:
            try:
                self.out.abort()
            except FatalProducerError as fatal:
                self._replace_producer(fatal)
        self.holds.clear()  # the broken consumer's pauses go with it
        self._release(set(self.parts))
        self._need_rebuild = False  # nothing is owned until the new consumer is assigned
        if self._stopping:
            log.warning("%s: stopping, with nothing owned", exc)
            return  # a new static member would only hold partitions idle until its session ends
        self.metrics.on_consumer_restart()
        log.warning("%s: replacing the consumer; partitions restart from the last checkpoint", exc)
        broken, self.consumer = self.consumer, self.clients.consumer(self._consumer_conf())
        try:
            broken.close()  # its rebalance callbacks see a consumer that is not ours
        except (KafkaException, RuntimeError) as error:
            log.warning("closing the broken consumer: %s", error)
        self._subscribe()

    # -- one record --------------------------------------------------------------------------

    def _on_message(self, message: Any) -> None:
        error = message.error()
        if error is not None:
            self._on_consume_error(message, error)
            return
        partition, offset = message.partition(), message.offset()
        part = self.parts.get(partition)
        if part is None:
            return  # revoked while this batch was in flight
        hold = self.holds.get(partition)
        if hold is not None:
            return  # fetched before the partition was held at an earlier record
        expected = self.resync.get(partition)
        if expected is not None:
            if offset != expected:
                return  # fetched before the hold: the record it was held at comes again
            del self.resync[partition]
        try:
            self._handle(part, message)
        except (TransactionAborted, FatalWorkerError, RegistryUnavailable):
            raise  # a registry outage is no fault of the record: stop, do not dead-letter
        except Exception as exc:
            log.exception("record %d@%d could not be handled", partition, offset)
            if offset >= part.replay_end:
                self._dead_letter(message, "internal_error", f"{type(exc).__name__}: {exc}")
            self._advance(partition, offset)

    def _on_consume_error(self, message: Any, error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            part = self.parts.get(message.partition())
            if part is not None and message.partition() not in self.holds:
                self._caught_up(part)
            return
        log.warning("consumer error: %s", error)

    def _handle(self, part: PartitionStreams, message: Any) -> None:
        """Handle one input record (see the module docstring for the rules)."""
        partition, offset = part.partition, message.offset()
        part.caught_up_since = None
        if part.resumed_ends:
            self._end_resumed(part, offset)
        if offset < part.replay_end:
            self._replay(part, message)
            return
        if offset >= self.counted_until.get(partition, -1):
            self.metrics.on_record(partition)
            self.counted_until[partition] = offset + 1
        verdict = inspect(message.key(), message.value(), self.chunks, self.limits)
        if isinstance(verdict, Rejected):
            self._reject(message, verdict)
            return
        chunk = verdict
        timestamp = _timestamp_ms(message)
        if timestamp <= self.wall_ms() + self.cfg.max_clock_skew_sec * 1000:
            # Only a well-formed chunk, stamped no further ahead than a clock can be wrong,
            # moves the partition's clock.
            part.partition_time_ms = max(part.partition_time_ms, timestamp)
        self._end_idle_calls(part, offset, chunk.stream_id)
        stream = part.live.get(chunk.stream_id)
        placed = place(chunk, stream, self.limits)
        if isinstance(placed, Rejected):
            self._reject(message, placed)
            return
        if placed.placement is Placement.REPEAT:
            self.metrics.on_duplicate()
            self._advance(partition, offset)
            return
        if stream is None:
            try:
                plan_lanes(
                    chunk.metadata, chunk.channels, self.cfg.channel_mode, self.cfg.channel_roles
                )
            except ValueError as exc:
                self._reject(message, Rejected("unsupported_channel_mode", str(exc)))
                return
            if len(self.by_key) >= self.cfg.max_streams and not self._admit_over_limit(partition):
                self._hold(partition, offset, None)
                return
            stream = self._open(part, chunk, offset)
        elif self._buffered_sec(stream) > self.cfg.max_stream_buffered_sec:
            self._hold(partition, offset, stream.engine_key)  # the call is far ahead: wait
            return
        if placed.placement is Placement.GAP:
            self.metrics.on_gap(self.cfg.gap_policy)
            if self.cfg.gap_policy is GapPolicy.DEAD_LETTER:
                self._reject(
                    message,
                    Rejected(
                        "sequence_gap",
                        f"expected sequence {stream.next_sequence}, got {chunk.sequence}",
                    ),
                )
                return
            if self.cfg.gap_policy is GapPolicy.END_STREAM:
                self._dead_letter(
                    message, "sequence_gap", f"{placed.missing} chunks missing: call ended"
                )
                self._end(part, stream, end_at=offset)
                self._advance(partition, offset)
                return
        self._take(part, stream, chunk, placed.missing, placed.digest, timestamp, False)
        self._advance(partition, offset)
        if chunk.end_of_stream:
            self._end(part, stream, end_at=offset + 1)
        elif stream.seconds_in >= self.cfg.max_stream_sec:
            log.info("call %s reached max_stream_sec: ending it", stream.stream_id)
            self._end(part, stream, end_at=offset + 1)

    def _take(
        self,
        part: PartitionStreams,
        stream: OpenStream,
        chunk: AudioChunk,
        missing: int,
        digest: bytes,
        timestamp_ms: int,
        replaying: bool,
    ) -> None:
        """Decode a placed chunk and hand it (after any silence for a gap) to the engine."""
        if not stream.lanes:
            self._open_lanes(stream, chunk)
        decoded = [
            (lane, lane.decoder.decode(chunk.payload))
            for lane in stream.lanes
            if lane.decoder is not None
        ]
        if missing:
            silence = missing * stream.last_chunk_samples * TARGET_SAMPLE_RATE
            for lane, _ in decoded:
                zeros = np.zeros(silence // chunk.sample_rate_hz, np.float32)
                self._push(stream, lane, zeros, -1)
        seconds = chunk_seconds(chunk)
        stream.next_sequence = chunk.sequence + 1
        stream.last_chunk_samples = round(seconds * chunk.sample_rate_hz)
        stream.last_time_ms = timestamp_ms
        stream.seconds_in += seconds
        stream.remember(chunk.sequence, digest, self.cfg.duplicate_window)
        if chunk.sequence == 0:
            stream.capture_start_ms = chunk.capture_time_ms
        if not replaying:
            self.metrics.on_audio(seconds)
        for lane, samples in decoded:
            self._push(stream, lane, samples, chunk.sequence)

    def _open_lanes(self, stream: OpenStream, chunk: AudioChunk | None) -> None:
        """The call's engine streams, from its first chunk (see ``channels.py``); a call that
        ends before taking one (``chunk`` None) gets one with no audio, to end through."""
        key = stream.engine_key
        if chunk is None:
            stream.lanes = [Lane(key, None)]
        else:
            try:
                plans = plan_lanes(
                    chunk.metadata, chunk.channels, self.cfg.channel_mode, self.cfg.channel_roles
                )
            except ValueError as exc:  # admitted by a worker with other settings
                log.warning("call %s: %s; mixing its channels", stream.stream_id, exc)
                plans = (LanePlan("", None, None),)
            stream.lanes = [
                Lane(
                    key + plan.suffix,
                    AudioDecoder(
                        chunk.encoding, chunk.sample_rate_hz, chunk.channels, plan.channel
                    ),
                    plan.channel,
                    plan.role,
                )
                for plan in plans
            ]
        for lane in stream.lanes:
            self.engine.add_stream(lane.engine_key)

    def _buffered_sec(self, stream: OpenStream) -> float:
        """Audio of the call the engine has not stepped yet (its furthest-behind lane)."""
        return max((self.engine.buffered_sec(lane.engine_key) for lane in stream.lanes), default=0)

    def _lane(self, engine_key: str) -> tuple[OpenStream, Lane] | None:
        """The call and lane of an engine stream. A lane's key is its call's, or in split mode
        the call's plus ``#<channel>`` (a suffix with no ``#`` in it)."""
        stream = self.by_key.get(engine_key)
        if stream is None and "#" in engine_key:
            stream = self.by_key.get(engine_key.rsplit("#", 1)[0])
        if stream is None:
            return None
        lane = next((lane for lane in stream.lanes if lane.engine_key == engine_key), None)
        return None if lane is None else (stream, lane)

    def _replay(self, part: PartitionStreams, message: Any) -> None:
        """A record below the committed offset: re-feed it to the open call it belongs to,
        silently; every other one was handled before."""
        offset = message.offset()
        key = message.key()
        stream = part.live.get(key.decode("utf-8", errors="replace")) if key else None
        if stream is None or offset < stream.first_offset:
            return
        if self._buffered_sec(stream) > self.cfg.max_stream_buffered_sec:
            self._hold(part.partition, offset, stream.engine_key)  # replay at engine speed
            return
        self.metrics.on_replayed()
        chunk = inspect(key, message.value(), self.chunks, self.limits)
        if isinstance(chunk, Rejected):
            return
        placed = place(chunk, stream, self.limits)
        if isinstance(placed, Rejected) or placed.placement is Placement.REPEAT:
            return
        if placed.placement is Placement.GAP and self.cfg.gap_policy is not GapPolicy.FILL_SILENCE:
            if self.cfg.gap_policy is GapPolicy.END_STREAM:
                self._end(part, stream, end_at=offset)
            return
        self._take(part, stream, chunk, placed.missing, placed.digest, _timestamp_ms(message), True)
        if chunk.end_of_stream or stream.seconds_in >= self.cfg.max_stream_sec:
            self._end(part, stream, end_at=offset + 1)

    def _advance(self, partition: int, offset: int) -> None:
        """The record at ``offset`` is handled; the position never moves back."""
        if offset + 1 > self.positions.get(partition, -1):
            self.positions[partition] = offset + 1

    def _push(self, stream: OpenStream, lane: Lane, samples: np.ndarray, seq: int) -> None:
        if not len(samples) or self.by_key.get(stream.engine_key) is not stream:
            return  # nothing to push, or another lane of the call failed it
        try:
            self.engine.push_audio(lane.engine_key, samples, seq)
        except StreamError as exc:
            self._fail(stream, exc)

    def _open(self, part: PartitionStreams, chunk: AudioChunk, offset: int) -> OpenStream:
        stream = OpenStream(chunk.stream_id, part.partition, first_offset=offset)
        part.live[chunk.stream_id] = stream
        self.by_key[stream.engine_key] = stream
        self.metrics.on_streams(len(self.by_key))
        return stream

    def _end(self, part: PartitionStreams, stream: OpenStream, end_at: int) -> None:
        """The call takes no more records from ``end_at`` on; it finishes in the engine."""
        if self.by_key.get(stream.engine_key) is not stream:
            return  # it failed meanwhile and is gone
        log.debug("call %s takes no record from offset %d on", stream.engine_key, end_at)
        _vacate(part, stream)
        part.finishing[stream.engine_key] = stream
        stream.end_at = end_at
        stream.dirty = True
        if not stream.lanes:
            self._open_lanes(stream, None)
        for lane in list(stream.lanes):
            if lane.decoder is not None:
                self._push(stream, lane, lane.decoder.flush(), stream.next_sequence - 1)

    def _end_drained_calls(self) -> None:
        """Tell the engine a finishing call has ended once none of its full chunks waits: a
        call then finishes the same way however its records were batched."""
        ready = set(self.engine.ready_streams())
        for part in self.parts.values():
            for stream in part.finishing.values():
                for lane in stream.lanes:
                    key = lane.engine_key
                    if not lane.end_pushed and key not in ready and self.engine.has_stream(key):
                        self.engine.end_stream(key)
                        lane.end_pushed = True

    def _end_idle_calls(self, part: PartitionStreams, offset: int, current: str) -> None:
        """Event time: end calls whose last record is ``idle_timeout_sec`` older than the
        partition's newest, checked each time the partition clock enters a new second. The
        call of the record at hand (``current``) is not idle: it is speaking."""
        second = part.partition_time_ms // 1000
        if second <= part.idle_checked_sec:
            return
        part.idle_checked_sec = second
        idle_ms = self.cfg.idle_timeout_sec * 1000
        for stream in list(part.live.values()):
            if stream.stream_id == current:
                continue
            if part.partition_time_ms - stream.last_time_ms > idle_ms:
                log.info("call %s idle on event time: ending it", stream.stream_id)
                self._end(part, stream, end_at=offset)

    def _end_resumed(self, part: PartitionStreams, offset: int | None) -> None:
        """End rebuilt calls that had ended before ``offset`` (None: every one; the
        partition has been read to its end)."""
        for stream in list(part.live.values()):
            end_at = stream.resume_end_at
            if end_at != NO_END and (offset is None or end_at <= offset):
                stream.resume_end_at = NO_END
                part.resumed_ends -= 1
                self._end(part, stream, end_at)

    def _caught_up(self, part: PartitionStreams) -> None:
        """The consumer has read the partition to its end (every replayed record, too)."""
        if part.caught_up_since is None:
            part.caught_up_since = self.clock()
        if part.resumed_ends:
            self._end_resumed(part, None)

    def _end_quiet_partitions(self) -> None:
        """A partition with no record at all for ``idle_timeout_sec`` ends its calls: no
        record will ever move its event-time clock (the decision commits with its effects).
        The quiet must be seen with the broker reachable, asked every ``_QUIET_PROBE_SEC``:
        callers whose audio waits in their producers during a broker outage are not gone."""
        now = self.clock()
        for p, part in self.parts.items():
            since = part.caught_up_since
            if since is None or p in self.holds or not part.live:
                continue
            if now >= part.next_quiet_probe:
                part.next_quiet_probe = now + _QUIET_PROBE_SEC
                if not self._still_at_end(p):
                    part.caught_up_since = now  # not quiet, or unsure: count again from now
                    continue
            if now - since < self.cfg.idle_timeout_sec:
                continue
            for stream in list(part.live.values()):
                log.info("call %s: partition %d quiet, ending the call", stream.stream_id, p)
                self._end(part, stream, end_at=self.positions.get(p, 0))

    def _still_at_end(self, partition: int) -> bool:
        """Ask the broker whether a quiet partition still has nothing past our position: a
        broker that cannot be reached must not look like callers that hung up."""
        tp = TopicPartition(self.cfg.input_topic, partition)
        try:
            _, high = self.consumer.get_watermark_offsets(tp, timeout=5)
            (fetched,) = self.consumer.position([tp])
        except KafkaException as exc:
            log.info("partition %d looks quiet, but the broker says: %s", partition, exc)
            return False
        return fetched.offset >= high  # the position counts transaction markers, too

    def _fail(self, stream: OpenStream, error: StreamError) -> None:
        """The engine gave up on a call (a model error): end it where it is."""
        log.warning("call %s failed: %s (%s)", stream.stream_id, error.message, error.reason)
        for lane in stream.lanes:
            self.engine.drop_stream(lane.engine_key)
        source = Source(self.cfg.input_topic, stream.partition, stream.first_offset, None, None)
        self._produce_dead_letter(source, "stream_failed", f"{error.reason}: {error.message}")
        # Readers waiting for the call's end get it: the dead letter says why it came early.
        self._emit(stream, end_event(stream, self.models), latency_from_ms=None)
        self._forget(stream)

    def _forget(self, stream: OpenStream) -> None:
        """The call is over (finished or failed): tombstone its progress."""
        part = self.parts.get(stream.partition)
        if part is not None:
            _vacate(part, stream)
            part.finishing.pop(stream.engine_key, None)
            if stream.replay is not None:
                stream.replay = None
                self._recovered(part)
        self.by_key.pop(stream.engine_key, None)
        self._closed.append((stream.partition, (stream.first_offset, stream.stream_id)))
        self.metrics.on_streams(len(self.by_key))

    # -- outputs -----------------------------------------------------------------------------

    def _step(self) -> None:
        if not self.engine.ready_streams():
            return
        result = self.engine.step()
        timing = getattr(self.engine, "last_timing", None)
        if timing is not None:
            audio = sum(u.audio_sec for u in result)
            self.metrics.on_step(
                timing.streams, timing.instances, timing.diarizer, timing.asr, timing.total, audio
            )
        if self.device_memory is not None:
            self.metrics.on_gpu_memory(self.device_memory())
        for update in result:
            found = self._lane(update.stream_id)
            if found is not None:
                self._apply(*found, update)

    def _apply(self, stream: OpenStream, lane: Lane, update: StreamUpdate) -> None:
        """Merge a lane's update into its call's transcript (``streams.py``) and emit."""
        if self.by_key.get(stream.engine_key) is not stream:
            return  # another lane of the call failed it in this step
        if update.error is not None:
            self._fail(stream, update.error)
            return
        lane.pending.append(update)
        for turn, merged in stream.merged():
            for segment, span in merged.segments:
                event = segment_event(stream, turn, segment, span, self.models)
                stream.segments = max(stream.segments, event.segment_index + 1)
                self._emit(stream, event, latency_from_ms=event.end_time_ms)
        if all(lane.done for lane in stream.lanes):
            self._emit(stream, end_event(stream, self.models), latency_from_ms=None)
            self._forget(stream)

    def _emit(
        self, stream: OpenStream, event: TranscriptEvent, latency_from_ms: int | None
    ) -> None:
        """Produce an event, unless a replay is re-making one committed before."""
        replay = stream.replay
        if replay is not None:
            replay.made += 1
            if replay.made < replay.events and event.kind != EventKind.STREAM_END:
                return
            short = replay.made < replay.events  # the call ended before re-making them all
            if short or (
                replay.last_event_id is not None and event.event_id != replay.last_event_id
            ):
                log.error(
                    "call %s: the replay re-made %s as event %d, but %s was committed: output "
                    "is not a function of the input (events after it may repeat)",
                    stream.stream_id,
                    event.event_id,
                    replay.made,
                    replay.last_event_id,
                )
                self.metrics.on_replay_mismatch()
            stream.replay = None
            part = self.parts.get(stream.partition)
            if part is not None:
                self._recovered(part)
            if not short:
                return
        value = self.events.encode(event)  # first: a failure must not count the event as made
        stream.events_emitted += 1
        stream.last_event_id = event.event_id
        stream.dirty = True
        self.out.produce(self.cfg.output_topic, event.stream_id.encode(), value)
        latency = None if latency_from_ms is None else (self.wall_ms() - latency_from_ms) / 1000
        self.metrics.on_event(str(event.kind), latency)

    def _recovered(self, part: PartitionStreams) -> None:
        """One call has re-made every event it had committed."""
        part.recovering -= 1
        if part.recovering == 0:
            elapsed = self.clock() - part.recovery_started
            self.metrics.on_recovery(elapsed)
            log.info("partition %d: open calls rebuilt in %.1f s", part.partition, elapsed)

    def _reject(self, message: Any, rejected: Rejected) -> None:
        self._dead_letter(message, rejected.reason, rejected.message)
        self._advance(message.partition(), message.offset())

    def _dead_letter(self, message: Any, reason: str, text: str) -> None:
        source = Source(
            message.topic(), message.partition(), message.offset(), message.key(), message.value()
        )
        log.info(
            "dead letter %s[%d]@%d: %s: %s",
            source.topic,
            source.partition,
            source.offset,
            reason,
            text,
        )
        self._produce_dead_letter(source, reason, text)

    def _produce_dead_letter(self, source: Source, reason: str, text: str) -> None:
        record = dead_letter(
            source,
            reason,
            text,
            self.instance,
            self.wall_ms(),
            self.cfg.max_dead_letter_original_bytes,
        )
        self.out.produce(self.cfg.dead_letter_topic, record.original_key, self.dead.encode(record))
        self.metrics.on_dead_letter(reason)

    # -- checkpoint --------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Outputs, then open calls' progress, then partition markers, then ended calls'
        tombstones, then offsets (see the module docstring): one transaction, or, at least
        once, each delivered before the next."""
        self.out.barrier()
        for part in self.parts.values():
            for stream in part.streams():
                if stream.dirty:
                    record = StreamProgress(
                        stream_id=stream.stream_id,
                        input_topic=self.cfg.input_topic,
                        partition=stream.partition,
                        first_offset=stream.first_offset,
                        events_emitted=stream.events_emitted,
                        segments=stream.segments,
                        last_event_id=stream.last_event_id,
                        end_at=stream.end_at if stream.end_at != NO_END else stream.resume_end_at,
                    )
                    call = (stream.first_offset, stream.stream_id)
                    self._produce_progress(stream.partition, call, self.progress.encode(record))
                    stream.dirty = False
        self.out.barrier()
        for p, part in self.parts.items():
            if p in self.positions:
                marker = PartitionCheckpoint(
                    input_topic=self.cfg.input_topic,
                    partition=p,
                    next_offset=self.positions[p],
                    partition_time_ms=part.partition_time_ms,
                    worker_id=self.instance,
                )
                self._produce_progress(p, None, self.markers.encode(marker))
        # Ended calls are tombstoned after the markers: at least once, a marker that failed
        # must not leave a call ended whose records it does not cover.
        self.out.barrier()
        for p, call in self._closed:
            if p in self.parts:
                self._produce_progress(p, call, None)
        self._closed.clear()
        offsets = [
            TopicPartition(self.cfg.input_topic, p, off)
            for p, off in self.positions.items()
            if p in self.parts
        ]
        self.out.commit(offsets, self.consumer)
        self._restarts = 0
        self._committed_positions = dict(self.positions)
        self._last_checkpoint = self.clock()
        self.metrics.on_positions(self.positions)

    def _produce_progress(
        self, partition: int, call: tuple[int, str] | None, value: bytes | None
    ) -> None:
        """A progress record (a call's, or the partition marker: ``call`` None)."""
        self.out.produce(
            self.cfg.progress_topic,
            progress_key(self.cfg.input_topic, partition, call),
            value,
            partition=progress_partition(partition, self._progress_partitions),
        )

    # -- partitions ----------------------------------------------------------------------------

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.metrics.on_rebalance("assigned")
        self.health.assigned_or_idle = True  # the group is joined
        ids = [tp.partition for tp in partitions]
        log.info("assigned partitions %s", ids)
        if not ids:
            consumer.incremental_assign([])
            return
        try:
            starts = self._prepare(ids)
        except (TransactionAborted, FatalProducerError) as exc:
            # The partitions are ours all the same: take them, and rebuild every owned one
            # (these included) before the next record is handled.
            log.warning("could not prepare partitions %s (%s): rebuilding", ids, exc)
            for p in ids:
                self.parts.setdefault(p, PartitionStreams(p))
            if isinstance(exc, FatalProducerError):
                self._replace_producer(exc)
            self._need_rebuild = True
            starts = {p: OFFSET_BEGINNING for p in ids}  # the rebuild seeks them
        consumer.incremental_assign(
            [TopicPartition(self.cfg.input_topic, p, starts[p]) for p in ids]
        )

    def _prepare(self, partitions: list[int]) -> dict[int, int]:
        """Load the open calls of ``partitions`` from their last checkpoint; start offsets."""
        again = set(partitions) & set(self.parts)
        if again:  # assigned twice without a revocation between: start them over
            log.warning("partitions %s assigned again: rebuilding them", sorted(again))
            self._release(again)
        snapshots = self.recovery.snapshot(self.consumer, partitions)
        starts: dict[int, int] = {}
        for p in partitions:
            snap = snapshots[p]
            self._restore(snap)
            starts[p] = snap.replay_from if snap.committed >= 0 else OFFSET_BEGINNING
            if snap.committed >= 0:
                self.positions[p] = snap.committed
            if snap.streams:
                log.info(
                    "partition %d: rebuilding %d open streams from offset %d (committed %d)",
                    p,
                    len(snap.streams),
                    starts[p],
                    snap.committed,
                )
        self.metrics.on_streams(len(self.by_key))
        return starts

    def _restore(self, snap: PartitionSnapshot) -> None:
        """Own the partition again with its open calls; registered first, so that a failure
        half way leaves nothing ``_release`` cannot find."""
        part = self.parts[snap.partition] = PartitionStreams(snap.partition)
        part.replay_end = snap.committed
        part.partition_time_ms = snap.partition_time_ms
        part.idle_checked_sec = snap.partition_time_ms // 1000
        part.recovery_started = self.clock()
        for rec in list(snap.streams):
            if rec.first_offset >= snap.committed:
                # At least once, a call's progress can be delivered while the marker that
                # covers its start was not: its records are all ahead, so it simply starts
                # again (its events may repeat, which that mode allows).
                snap.streams.remove(rec)
                continue
            if rec.first_offset < snap.low_watermark:
                log.error(
                    "call %s starts at offset %d, before the oldest record kept (%d): it "
                    "cannot be rebuilt and is ended",
                    rec.stream_id,
                    rec.first_offset,
                    snap.low_watermark,
                )
                snap.streams.remove(rec)
                source = Source(self.cfg.input_topic, snap.partition, rec.first_offset, None, None)
                self._produce_dead_letter(
                    source,
                    "replay_unavailable",
                    f"call {rec.stream_id!r} was open, but its records before offset "
                    f"{snap.low_watermark} are past the input topic's retention: it is ended "
                    f"after {rec.events_emitted} events",
                )
                self._closed.append((snap.partition, (rec.first_offset, rec.stream_id)))
                continue
            stream = OpenStream(
                rec.stream_id,
                snap.partition,
                first_offset=rec.first_offset,
                events_emitted=rec.events_emitted,
                last_event_id=rec.last_event_id,
                segments=rec.segments,
                end_at=rec.end_at,
                last_time_ms=snap.partition_time_ms,  # until its replayed records say
                dirty=False,
            )
            if rec.events_emitted:
                stream.replay = Replay(rec.events_emitted, rec.last_event_id)
                part.recovering += 1
            if rec.end_at != NO_END:  # it re-takes its records up to ``end_at``, then ends
                stream.end_at = NO_END
                stream.resume_end_at = rec.end_at
                part.resumed_ends += 1
            if rec.stream_id in part.live:  # a reused id: the earlier call ends first
                part.waiting.setdefault(rec.stream_id, []).append(stream)
            else:
                part.live[rec.stream_id] = stream
            self.by_key[stream.engine_key] = stream  # its lanes open with its first record

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        if consumer is not self.consumer:
            _let_go(consumer, partitions)
            return
        self.metrics.on_rebalance("revoked")
        ids = {tp.partition for tp in partitions}
        log.info("revoked partitions %s: checkpointing and handing over", sorted(ids))
        if not self._need_rebuild:
            try:
                self.checkpoint()
            except TransactionAborted as exc:
                log.warning("checkpoint before handing over failed (%s)", exc)
                self._need_rebuild = True
            except FatalProducerError as exc:
                self._replace_producer(exc)
        self._release(ids)
        consumer.incremental_unassign(partitions)

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        if consumer is not self.consumer:
            _let_go(consumer, partitions)
            return
        self.metrics.on_rebalance("lost")
        ids = {tp.partition for tp in partitions}
        log.warning("lost partitions %s: dropping them without committing", sorted(ids))
        if self.eos:
            try:
                self.out.abort()
            except FatalProducerError as exc:
                self._replace_producer(exc)
            self._need_rebuild = True  # the aborted outputs of the other partitions, too
        self._release(ids)
        consumer.incremental_unassign(partitions)

    def _release(self, partitions: set[int]) -> None:
        for p in partitions:
            part = self.parts.pop(p, None)
            self.positions.pop(p, None)
            self._committed_positions.pop(p, None)
            self.resync.pop(p, None)
            self._closed = [(q, call) for q, call in self._closed if q != p]
            if self.holds.pop(p, None) is not None:
                self.consumer.resume([TopicPartition(self.cfg.input_topic, p)])
            if part is None:
                continue
            for stream in part.streams():
                for lane in stream.lanes:
                    self.engine.drop_stream(lane.engine_key)
                self.by_key.pop(stream.engine_key, None)
        self.metrics.on_paused(len(self.holds))
        self.metrics.on_streams(len(self.by_key))

    def _rebuild(self) -> None:
        """Forget every owned call and replay all owned partitions from the last checkpoint."""
        self._need_rebuild = False
        owned = sorted(self.parts)
        self._release(set(owned))
        if not owned:
            return
        starts = self._prepare(owned)
        for p in owned:
            self.consumer.seek(TopicPartition(self.cfg.input_topic, p, starts[p]))
        log.info("rebuilt partitions %s from the last checkpoint", owned)

    # -- holds: a full worker, a call far ahead ---------------------------------------------------

    def _hold(self, partition: int, offset: int, stream_key: str | None) -> None:
        """Pause ``partition`` at the record ``offset`` (read again on release)."""
        if stream_key is None:
            log.info(
                "stream limit %d reached: pausing partition %d at offset %d",
                self.cfg.max_streams,
                partition,
                offset,
            )
        tp = TopicPartition(self.cfg.input_topic, partition, offset)
        self.consumer.pause([tp])
        self.consumer.seek(tp)
        self.holds[partition] = _Hold(offset, stream_key)
        self.metrics.on_paused(len(self.holds))

    def _release_holds(self) -> None:
        released = []
        for p, hold in self.holds.items():
            if hold.stream_key is None:
                free = len(self.by_key) < self.cfg.max_streams
            else:
                stream = self.by_key.get(hold.stream_key)
                free = stream is None or (
                    self._buffered_sec(stream) <= self.cfg.max_stream_buffered_sec / 2
                )
            if free:
                released.append(p)
        for p in released:
            self.resync[p] = self.holds.pop(p).offset
            self.consumer.resume([TopicPartition(self.cfg.input_topic, p)])
        if released:
            self.metrics.on_paused(len(self.holds))

    def _admit_over_limit(self, partition: int) -> bool:
        """At ``max_streams`` a new call waits, its partition paused, only where that stalls
        no open call: on a partition with open calls it is admitted up to
        ``max_streams_hard``. Past that it waits too, unless nothing could ever free a slot
        (no call elsewhere that can move, none finishing, no work in the engine)."""
        part = self.parts[partition]
        if part.live and len(self.by_key) < self.cfg.max_streams_hard:
            self.metrics.on_overcommit()
            return True
        movable = any(
            other.live for p, other in self.parts.items() if p != partition and p not in self.holds
        )
        finishing = any(other.finishing for other in self.parts.values())
        if movable or finishing or self.engine.ready_streams():
            return False
        log.warning(
            "stream limit reached and no open call can free a slot: admitting a call over it"
        )
        self.metrics.on_overcommit()
        return True


def _let_go(consumer: Any, partitions: list[TopicPartition]) -> None:
    """A replaced consumer's revocation, as it closes: nothing of it is ours any more."""
    try:
        consumer.incremental_unassign(partitions)
    except KafkaException as exc:  # a fenced consumer refuses even this
        log.info("replaced consumer: %s", exc)


def _vacate(part: PartitionStreams, stream: OpenStream) -> None:
    """The call no longer takes records; a rebuilt later call of its id, if any, does."""
    if part.live.get(stream.stream_id) is not stream:
        return
    del part.live[stream.stream_id]
    queue = part.waiting.get(stream.stream_id)
    if queue:
        part.live[stream.stream_id] = queue.pop(0)
        if not queue:
            del part.waiting[stream.stream_id]


def _timestamp_ms(message: Any) -> int:
    kind, value = message.timestamp()
    return value if kind and value > 0 else 0
