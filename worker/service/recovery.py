"""What a new owner of a partition needs from the last checkpoint, and a check that it is fresh.

The progress topic holds, per open call, where it started and which events are committed, and
per partition a ``PartitionCheckpoint`` marker written in the same transaction as the input
offsets. All progress of one input partition goes to one progress partition
(``progress_partition``). Under ``read_committed`` a reader stops at the last stable offset: a
transaction still open (a worker that was just killed, whose transaction has not timed out or
been fenced) hides everything after it, marker included, while the committed offsets are
already newer. So the snapshot is used only once each partition's marker equals its committed
offset; until then it is read again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from schemas import CodecError, PartitionCheckpoint, RecordCodec, StreamProgress
from worker.config import DeliveryMode, WorkerConfig
from worker.metrics import Health
from worker.service.checkpoint import FatalConsumerError, FatalWorkerError, consumer_fatal
from worker.service.clients import ConsumerLike, KafkaClients

log = logging.getLogger(__name__)

_RETRY_SEC = 0.5


@dataclass
class PartitionSnapshot:
    """The last checkpoint of one input partition."""

    partition: int
    committed: int  # the committed input offset; -1: none
    low_watermark: int  # the oldest record still in the input topic
    partition_time_ms: int = 0
    streams: list[StreamProgress] = field(default_factory=list)  # by first offset

    @property
    def replay_from(self) -> int:
        """Where reading starts: the first record of the oldest open call, or the commit."""
        if self.committed < 0:
            return -1
        return min([self.committed, *(s.first_offset for s in self.streams)])


def progress_key(input_topic: str, partition: int, call: tuple[int, str] | None = None) -> bytes:
    """Key of a call's progress record (``call``: its first offset and stream id; a reused
    stream id is another call), or of the partition's marker."""
    base = f"{input_topic}/{partition}"
    return (base if call is None else f"{base}/{call[0]}/{call[1]}").encode()


def progress_partition(input_partition: int, progress_partitions: int) -> int:
    """The progress partition that holds every progress record of an input partition."""
    return input_partition % progress_partitions


class Recovery:
    """Reads the last checkpoint of partitions for a worker (on the loop's thread)."""

    def __init__(
        self,
        config: WorkerConfig,
        clients: KafkaClients,
        health: Health,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cfg = config
        self.clients = clients
        self.health = health
        self.clock = clock
        self.sleep = sleep
        self.streams = RecordCodec(StreamProgress)
        self.markers = RecordCodec(PartitionCheckpoint)

    def snapshot(
        self, consumer: ConsumerLike, partitions: list[int]
    ) -> dict[int, PartitionSnapshot]:
        """The checkpoint of each partition, once the progress topic shows all of it."""
        deadline = self.clock() + self.cfg.recovery_timeout_sec
        while True:
            try:
                committed = self._committed(consumer, partitions)
            except KafkaException as exc:
                if consumer_fatal(exc.args[0]):
                    raise FatalConsumerError(f"reading committed offsets: {exc}") from exc
                # Offsets still pending in another worker's open transaction: wait it out.
                if self.clock() >= deadline:
                    raise FatalWorkerError(f"reading committed offsets: {exc}") from exc
                log.info("committed offsets not readable yet (%s): retrying", exc)
                self.health.beat()
                self.sleep(_RETRY_SEC)
                continue
            streams, markers = self._read_progress(set(partitions))
            stale = []
            for p in partitions:
                marker = markers.get(p)
                if committed[p] < 0:
                    continue  # never committed: nothing to be stale against
                if marker is None or marker.next_offset < committed[p]:
                    stale.append(p)
            if not stale:
                break
            if self.clock() >= deadline:
                if all(markers.get(p) is None for p in stale):
                    log.warning(
                        "partitions %s have committed offsets but no checkpoint marker "
                        "(written by an older worker?): using the progress topic as it is",
                        stale,
                    )
                    break
                raise FatalWorkerError(
                    f"the progress of partitions {stale} stayed older than their committed "
                    f"offsets for {self.cfg.recovery_timeout_sec} s: a transaction is stuck open"
                )
            log.info(
                "progress of partitions %s is behind the committed offsets (a transaction is "
                "still open): reading it again",
                stale,
            )
            self.health.beat()
            self.sleep(_RETRY_SEC)
        out = {}
        for p in partitions:
            marker = markers.get(p)
            done = committed[p]
            if marker is not None and self.cfg.delivery is DeliveryMode.AT_LEAST_ONCE:
                # At least once, a marker is sent only once the outputs and the progress it
                # describes are delivered; a failed offset commit after it leaves it ahead.
                done = max(done, marker.next_offset)
            low, _ = self._watermarks(consumer, TopicPartition(self.cfg.input_topic, p))
            log.debug(
                "partition %d: committed %d, marker %s, open calls %s",
                p,
                committed[p],
                marker,
                [(s.stream_id, s.first_offset, s.events_emitted) for s in streams.get(p, [])],
            )
            out[p] = PartitionSnapshot(
                partition=p,
                committed=done,
                low_watermark=low,
                partition_time_ms=marker.partition_time_ms if marker else 0,
                streams=sorted(streams.get(p, []), key=lambda s: s.first_offset),
            )
        return out

    def _watermarks(self, consumer: ConsumerLike, tp: TopicPartition) -> tuple[int, int]:
        """Low and high offsets, waiting out a restarting broker or a topic without a leader
        yet (a topic created a moment ago) for up to ``kafka_retry_sec``."""
        deadline = self.clock() + self.cfg.kafka_retry_sec
        while True:
            try:
                return consumer.get_watermark_offsets(tp, timeout=10)
            except KafkaException as exc:
                if exc.args[0].fatal() or self.clock() >= deadline:
                    raise FatalWorkerError(f"offsets of {tp.topic}[{tp.partition}]: {exc}") from exc
                self.health.beat()
                self.sleep(_RETRY_SEC)

    def progress_partitions(self, consumer: ConsumerLike) -> list[int]:
        """The progress topic's partitions (it must exist), waiting out a restarting broker."""
        topic = self.cfg.progress_topic
        deadline = self.clock() + self.cfg.kafka_retry_sec
        while True:
            try:
                meta = consumer.list_topics(topic, timeout=30).topics.get(topic)
                break
            except KafkaException as exc:
                if exc.args[0].fatal() or self.clock() >= deadline:
                    raise FatalWorkerError(f"cannot read the topic list: {exc}") from exc
                self.health.beat()
                self.sleep(_RETRY_SEC)
        if meta is None or meta.error is not None or not meta.partitions:
            raise FatalWorkerError(
                f"progress topic {topic!r} is missing: create it (compacted) before starting "
                "workers (python -m worker create-topics)"
            )
        return sorted(meta.partitions)

    def _committed(self, consumer: ConsumerLike, partitions: list[int]) -> dict[int, int]:
        tps = [TopicPartition(self.cfg.input_topic, p) for p in partitions]
        return {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=30)}

    def _read_progress(
        self, partitions: set[int]
    ) -> tuple[dict[int, list[StreamProgress]], dict[int, PartitionCheckpoint]]:
        """Open calls and markers of ``partitions`` from the committed progress topic."""
        latest = self._read_compacted()
        prefix = f"{self.cfg.input_topic}/"
        streams: dict[int, list[StreamProgress]] = {}
        markers: dict[int, PartitionCheckpoint] = {}
        for key, value in latest.items():
            text = key.decode("utf-8", errors="replace")
            if value is None or not text.startswith(prefix):
                continue
            try:
                if text.count("/", len(prefix)) == 0:
                    marker = self.markers.decode(value)
                    if marker.partition in partitions:
                        markers[marker.partition] = marker
                else:
                    rec = self.streams.decode(value)
                    if rec.partition in partitions:
                        streams.setdefault(rec.partition, []).append(rec)
            except CodecError as exc:
                raise FatalWorkerError(f"unreadable progress record {text!r}: {exc}") from exc
        return streams, markers

    def _read_compacted(self) -> dict[bytes, bytes | None]:
        """The latest value per key of the whole progress topic (read_committed)."""
        topic = self.cfg.progress_topic
        consumer = self.clients.consumer(
            {
                "bootstrap.servers": self.cfg.bootstrap_servers,
                "group.id": f"{self.cfg.group_id}-progress-reader",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
            }
        )
        latest: dict[bytes, bytes | None] = {}
        try:
            tps = []
            ends: dict[int, int] = {}  # read to the end as it is now: others keep writing
            for pid in self.progress_partitions(consumer):
                low, high = self._watermarks(consumer, TopicPartition(topic, pid))
                if high > low:
                    tps.append(TopicPartition(topic, pid, low))
                    ends[pid] = high
            if not tps:
                return latest
            consumer.assign(tps)
            remaining = set(ends)
            deadline = self.clock() + self.cfg.kafka_retry_sec
            while remaining:
                msg = consumer.poll(1.0)
                if msg is None:
                    if self.clock() >= deadline:
                        raise FatalWorkerError(
                            f"the progress topic could not be read in {self.cfg.kafka_retry_sec} s"
                        )
                    self.health.beat()
                    continue
                deadline = self.clock() + self.cfg.kafka_retry_sec  # it moves: wait on
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        remaining.discard(msg.partition())  # the stable end, for now
                        continue
                    if msg.error().fatal():
                        raise FatalWorkerError(f"reading progress: {msg.error()}")
                    log.warning("reading progress: %s", msg.error())
                    continue
                latest[msg.key()] = msg.value()
                if msg.offset() + 1 >= ends[msg.partition()]:
                    remaining.discard(msg.partition())
        finally:
            consumer.close()
        return latest
