"""One call's transcript, from Kafka to the event loop: a read_committed consumer on its own thread.

Thread rule: the relay thread alone creates, polls and closes the consumer; the event loop only
reads the bounded queue the thread fills, and asks the thread to stop. The thread hands items
over with ``run_coroutine_threadsafe(queue.put(...))`` and waits while the queue is full, so a
slow page slows the reader (librdkafka's own prefetch is capped too) instead of growing a buffer.

The consumer joins no group: it is assigned every partition of the transcript topic at its end
offset, read before the call's first chunk is sent, so every event of the new stream id lies
after it and nothing older is read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from dataclasses import dataclass
from typing import Final, Literal

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from producer_tools.web.settings import GatewaySettings
from schemas import CodecError, EventKind, TranscriptEvent, make_codec
from worker.config import WorkerConfig

POLL_SEC: Final = 0.2
PREFETCH_KBYTES: Final = 1024  # librdkafka's per-partition fetch queue, kept small

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelayItem:
    """What the relay thread hands the event loop: ready, an event, or why it gave up."""

    kind: Literal["ready", "event", "failed"]
    event: TranscriptEvent | None = None
    reason: str = ""


class TranscriptRelay:
    """Reads ``stream_id``'s committed transcript events into ``queue`` until STREAM_END."""

    def __init__(
        self,
        settings: GatewaySettings,
        stream_id: str,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[RelayItem],
    ) -> None:
        self.settings = settings
        self.stream_id = stream_id
        self._key = stream_id.encode()
        self._loop = loop
        self._queue = queue
        self._stop = threading.Event()
        self.consumer_closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"relay-{stream_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to close the consumer and end (it does within ``POLL_SEC``)."""
        self._stop.set()

    def join(self, timeout_sec: float) -> bool:
        """Wait for the thread; True once the consumer is closed."""
        self._thread.join(timeout_sec)
        return self.consumer_closed.is_set()

    def _run(self) -> None:
        settings = self.settings
        consumer: Consumer | None = None
        try:
            codec = make_codec(
                TranscriptEvent,
                topic=settings.transcript_topic,
                wire_format=settings.wire_format,
                registry_url=settings.schema_registry_url,
                schema_id=WorkerConfig().schema_id_transcript_event,
            )
            consumer = Consumer(
                {
                    "bootstrap.servers": settings.bootstrap_servers,
                    "group.id": f"callscribe-web-{self.stream_id}",  # never joined: assign()
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                    "queued.max.messages.kbytes": PREFETCH_KBYTES,
                }
            )
            consumer.assign(self._end_offsets(consumer))
            if not self._put(RelayItem("ready")):
                return
            while not self._stop.is_set():
                msg = consumer.poll(POLL_SEC)
                if msg is None:
                    continue
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    raise RelayError(f"reading {settings.transcript_topic}: {msg.error()}")
                if msg.key() != self._key:
                    continue
                try:
                    event = codec.decode(msg.value())
                except CodecError as exc:
                    log.warning(
                        "%s: skipping record %d@%d: %s",
                        self.stream_id,
                        msg.partition(),
                        msg.offset(),
                        exc,
                    )
                    continue
                if not self._put(RelayItem("event", event)) or event.kind is EventKind.STREAM_END:
                    return
        except (RelayError, KafkaException, ValueError) as exc:
            self._put(RelayItem("failed", reason=str(exc)))
        finally:
            if consumer is not None:
                consumer.close()
            self.consumer_closed.set()

    def _end_offsets(self, consumer: Consumer) -> list[TopicPartition]:
        topic = self.settings.transcript_topic
        timeout = self.settings.kafka_timeout_sec
        metadata = consumer.list_topics(timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error is not None:
            servers = self.settings.bootstrap_servers
            raise RelayError(f"the transcript topic {topic!r} does not exist on {servers}")
        assigned = []
        for partition in sorted(metadata.partitions):
            _low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout, cached=False
            )
            assigned.append(TopicPartition(topic, partition, high))
        return assigned

    def _put(self, item: RelayItem) -> bool:
        """Hand ``item`` to the event loop, waiting while the queue is full; False if stopped."""
        try:
            future = asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop)
        except RuntimeError:  # the event loop is gone: the gateway is shutting down
            return False
        while True:
            try:
                future.result(timeout=POLL_SEC)
                return True
            except concurrent.futures.TimeoutError:
                if self._stop.is_set():
                    future.cancel()
                    return False
            except concurrent.futures.CancelledError:
                return False


class RelayError(Exception):
    """The transcript topic cannot be read."""
