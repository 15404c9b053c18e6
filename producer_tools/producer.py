"""Publish call audio as ``AudioChunk`` records, without writing the schema by hand.

Example::

    import numpy as np
    from producer_tools import AudioChunkProducer

    with AudioChunkProducer("localhost:9092", topic="call-audio") as producer:
        call = producer.open_stream("call-42", sample_rate=8000, encoding="PCM_MULAW")
        for block in blocks:  # float32 samples in [-1, 1]: shape (n,), or (n, 2) for stereo
            call.write(block)  # cut into chunk_ms chunks, sequence numbers from 0
        call.end()  # the rest of the audio, flagged end_of_stream
    # Leaving the block flushes; a record Kafka did not take raises ProducerError.

Each call is one stream: records keyed by its stream id (so a call stays on one partition, in
order), ``sequence`` from 0, ``capture_time_ms`` (the capture time of the chunk's first sample)
from the stream's start time plus the audio sent before, and the last chunk flagged
``end_of_stream``. A chunk's sequence number is used up once librdkafka has queued it: a
delivery that fails later is reported once, as a ``ProducerError`` on the next send of the same
stream (or by ``flush``), and the stream goes on with the next number, never re-sending one.
The Kafka producer is idempotent (``enable.idempotence``, ``acks=all``): a retried send never
duplicates or reorders a call's chunks. With ``schema_registry_url`` the records are framed
through the Schema Registry (``schemas/registry.py``); without, plain
Avro, the worker's default.

Thread rule: an ``AudioStream`` belongs to one thread; the producer may be shared by streams on
several threads (confluent-kafka's producer is thread safe, and so is the delivery bookkeeping).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
from confluent_kafka import KafkaError, KafkaException, Producer

from schemas import AudioChunk, AudioEncoding, WireFormat, make_codec
from worker.audio import (
    BYTES_PER_SAMPLE,
    MAX_CHANNELS,
    SUPPORTED_SAMPLE_RATES,
    Encoding,
    encode_pcm,
)
from worker.config import WorkerConfig

_WORKER_DEFAULTS: Final = WorkerConfig()

DEFAULT_TOPIC: Final = "call-audio"
DEFAULT_CHUNK_MS: Final = 200
MIN_CHUNK_MS: Final = 10
MAX_CHUNK_MS: Final = 10_000  # the worker's default max_chunk_sec rejects longer chunks
MAX_STREAM_ID_LENGTH: Final = _WORKER_DEFAULTS.max_stream_id_length
MAX_PAYLOAD_BYTES: Final = _WORKER_DEFAULTS.max_payload_bytes  # the worker rejects larger chunks
# How long a send waits for room in librdkafka's queue before giving up.
DEFAULT_QUEUE_FULL_TIMEOUT_SEC: Final = 30.0
DEFAULT_FLUSH_TIMEOUT_SEC: Final = 30.0
DEFAULT_CONNECT_TIMEOUT_SEC: Final = 10.0


class ProducerError(Exception):
    """Audio could not be published: bad arguments, a full queue, or a failed delivery."""


class AudioChunkProducer:
    """An idempotent Kafka producer of ``AudioChunk`` records; opens one ``AudioStream`` per call.

    ``producer_config`` adds or overrides librdkafka settings (e.g. security settings).
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str = DEFAULT_TOPIC,
        *,
        schema_registry_url: str = "",
        wire_format: WireFormat = WireFormat.PLAIN,
        chunk_ms: int = DEFAULT_CHUNK_MS,
        producer_config: Mapping[str, Any] | None = None,
        queue_full_timeout_sec: float = DEFAULT_QUEUE_FULL_TIMEOUT_SEC,
    ) -> None:
        if not topic:
            raise ProducerError("topic must not be empty")
        _check_chunk_ms(chunk_ms)
        try:
            self._codec = make_codec(
                AudioChunk,
                topic=topic,
                wire_format=WireFormat(wire_format),
                registry_url=schema_registry_url,
                schema_id=_WORKER_DEFAULTS.schema_id_audio_chunk,  # the worker's, hand-framed
            )
        except ValueError as exc:
            raise ProducerError(str(exc)) from exc
        config: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
        }
        config.update(producer_config or {})
        self._producer = Producer(config)
        self.topic = topic
        self.bootstrap_servers = bootstrap_servers
        self.chunk_ms = chunk_ms
        self.queue_full_timeout_sec = queue_full_timeout_sec
        self._lock = threading.Lock()
        self._errors: dict[str, list[str]] = {}  # stream id → failed deliveries not yet raised
        self.delivered = 0  # records the broker acknowledged

    def open_stream(
        self,
        stream_id: str,
        *,
        sample_rate: int = 16_000,
        encoding: AudioEncoding | str = AudioEncoding.PCM_S16LE,
        channels: int = 1,
        chunk_ms: int | None = None,
        start_time_ms: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> AudioStream:
        """A new call. ``start_time_ms``: wall-clock time of its first sample (default: now)."""
        return AudioStream(
            self,
            stream_id,
            sample_rate=sample_rate,
            encoding=encoding,
            channels=channels,
            chunk_ms=self.chunk_ms if chunk_ms is None else chunk_ms,
            start_time_ms=int(time.time() * 1000) if start_time_ms is None else start_time_ms,
            metadata=dict(metadata or {}),
        )

    def check_topic(self, timeout_sec: float = DEFAULT_CONNECT_TIMEOUT_SEC) -> None:
        """Raise ``ProducerError`` unless the broker answers and ``topic`` exists.

        Asks for the whole topic list: asking for one topic would create it on brokers that
        auto-create topics, and a typo would then publish into a topic no worker reads.
        """
        try:
            topics = self._producer.list_topics(timeout=timeout_sec).topics
        except KafkaException as exc:
            raise ProducerError(
                f"no answer from Kafka at {self.bootstrap_servers} within {timeout_sec} s: {exc}"
            ) from exc
        if self.topic not in topics:
            raise ProducerError(f"topic {self.topic!r} does not exist on {self.bootstrap_servers}")

    def send(self, chunk: AudioChunk) -> None:
        """Publish one ready-made chunk, keyed by its stream id.

        Raises ``ProducerError`` if Kafka did not take it, or (once each) for earlier chunks of
        the same stream whose delivery failed.
        """
        self.queue(chunk)
        self.raise_delivery_errors(chunk.stream_id)

    def queue(self, chunk: AudioChunk) -> None:
        """Hand one chunk to librdkafka; ``ProducerError`` if it was not taken (and only then)."""
        if len(chunk.payload) > MAX_PAYLOAD_BYTES:
            raise ProducerError(
                f"{chunk.stream_id}: a payload of {len(chunk.payload)} bytes is over the worker's "
                f"max_payload_bytes ({MAX_PAYLOAD_BYTES}): use shorter chunks"
            )
        value = self._codec.encode(chunk)
        deadline = time.monotonic() + self.queue_full_timeout_sec
        while True:
            try:
                self._producer.produce(
                    self.topic,
                    key=chunk.stream_id.encode(),
                    value=value,
                    on_delivery=functools.partial(
                        self._on_delivery, chunk.stream_id, chunk.sequence
                    ),
                )
                break
            except BufferError:
                if time.monotonic() > deadline:
                    raise ProducerError(
                        f"the producer queue stayed full for {self.queue_full_timeout_sec} s: "
                        "is the broker reachable?"
                    ) from None
                self._producer.poll(0.05)
            except KafkaException as exc:  # e.g. over librdkafka's message.max.bytes
                raise ProducerError(
                    f"{chunk.stream_id}: Kafka refused chunk {chunk.sequence} "
                    f"({len(value)} bytes): {exc.args[0] if exc.args else exc}"
                ) from exc
        self._producer.poll(0)

    def flush(self, timeout_sec: float = DEFAULT_FLUSH_TIMEOUT_SEC) -> None:
        """Wait until every record sent is delivered; raise ``ProducerError`` if any was not."""
        remaining = self._producer.flush(timeout_sec)
        self.raise_delivery_errors()
        if remaining:
            raise ProducerError(
                f"{remaining} record(s) still undelivered after {timeout_sec} s: "
                "is the broker reachable?"
            )

    def raise_delivery_errors(self, stream_id: str | None = None) -> None:
        """Raise ``ProducerError`` for failed deliveries not yet reported (of ``stream_id`` only,
        if given); each failure is reported once."""
        with self._lock:
            if stream_id is None:
                failed, self._errors = self._errors, {}
            else:
                own = self._errors.pop(stream_id, None)
                failed = {stream_id: own} if own else {}
        if failed:
            count = sum(len(errors) for errors in failed.values())
            first_stream, errors = next(iter(failed.items()))
            raise ProducerError(
                f"{count} record(s) of {', '.join(failed)} failed to publish to {self.topic}: "
                f"{first_stream}: {errors[0]}"
            )

    def _on_delivery(
        self, stream_id: str, sequence: int, error: KafkaError | None, _message: object
    ) -> None:
        with self._lock:
            if error is None:
                self.delivered += 1
            else:
                self._errors.setdefault(stream_id, []).append(f"chunk {sequence}: {error}")

    def close(self) -> None:
        """Flush; the producer holds no other resources."""
        self.flush()

    def __enter__(self) -> AudioChunkProducer:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:  # do not hide the original error behind a flush failure
            self._producer.flush(1)


class AudioStream:
    """One call being published: buffers samples and sends whole ``chunk_ms`` chunks."""

    def __init__(
        self,
        producer: AudioChunkProducer,
        stream_id: str,
        *,
        sample_rate: int,
        encoding: AudioEncoding | str,
        channels: int,
        chunk_ms: int,
        start_time_ms: int,
        metadata: dict[str, str],
    ) -> None:
        if not stream_id or len(stream_id) > MAX_STREAM_ID_LENGTH:
            raise ProducerError(
                f"stream id must be 1..{MAX_STREAM_ID_LENGTH} characters, got {stream_id!r}"
            )
        if sample_rate not in SUPPORTED_SAMPLE_RATES:
            rates = ", ".join(str(r) for r in sorted(SUPPORTED_SAMPLE_RATES))
            raise ProducerError(f"sample rate {sample_rate} Hz is not one of {rates}")
        try:
            self.encoding = AudioEncoding(Encoding(str(encoding)).value)
        except ValueError:
            choices = ", ".join(e.value for e in Encoding)
            raise ProducerError(f"encoding {encoding!r} is not one of {choices}") from None
        if not 1 <= channels <= MAX_CHANNELS:
            raise ProducerError(f"channels must be 1..{MAX_CHANNELS}, got {channels}")
        _check_chunk_ms(chunk_ms)
        self.producer = producer
        self.stream_id = stream_id
        self.sample_rate = sample_rate
        self.channels = channels
        self.chunk_ms = chunk_ms
        self.chunk_frames = max(1, sample_rate * chunk_ms // 1000)
        sample_bytes = BYTES_PER_SAMPLE[Encoding(self.encoding.value)]
        chunk_bytes = self.chunk_frames * channels * sample_bytes
        if chunk_bytes > MAX_PAYLOAD_BYTES:
            raise ProducerError(
                f"{chunk_ms} ms of {channels}-channel {self.encoding.value} at {sample_rate} Hz is "
                f"{chunk_bytes} bytes, over the worker's max_payload_bytes ({MAX_PAYLOAD_BYTES}): "
                "use shorter chunks"
            )
        self.start_time_ms = start_time_ms
        self.metadata = metadata
        self.sequence = 0  # of the next chunk
        self.frames_sent = 0
        self.ended = False
        self._pending = np.zeros((0, channels), dtype=np.float32)

    @property
    def seconds_sent(self) -> float:
        return self.frames_sent / self.sample_rate

    def write(self, samples: np.ndarray) -> int:
        """Queue float samples in [-1, 1]; send every whole chunk. Returns chunks sent."""
        self._append(samples)
        sent = 0
        while self._pending.shape[0] >= self.chunk_frames:
            self._send_frames(self._take(self.chunk_frames), end=False)
            sent += 1
        return sent

    def write_encoded(self, payload: bytes) -> None:
        """Send already-encoded bytes (e.g. μ-law from a phone switch) as one chunk, as is."""
        self._check_open()
        frame_bytes = BYTES_PER_SAMPLE[Encoding(self.encoding.value)] * self.channels
        if len(payload) % frame_bytes:
            raise ProducerError(
                f"{self.stream_id}: payload of {len(payload)} bytes is not a whole number of "
                f"{frame_bytes}-byte frames"
            )
        if self._pending.shape[0]:
            raise ProducerError(f"{self.stream_id}: samples are still buffered; call end() first")
        self._send(payload, len(payload) // frame_bytes, end=False)

    def end(self, samples: np.ndarray | None = None) -> None:
        """Send ``samples`` and everything buffered; the last chunk carries ``end_of_stream``."""
        if samples is not None:
            self._append(samples)
        else:
            self._check_open()
        while self._pending.shape[0] > self.chunk_frames:
            self._send_frames(self._take(self.chunk_frames), end=False)
        self._send_frames(self._take(self.chunk_frames), end=True)  # may be empty: allowed

    def _take(self, n_frames: int) -> np.ndarray:
        """The first ``n_frames`` buffered, removed before they are sent: a send that raises
        after queueing them must not leave them to be sent again."""
        block, self._pending = self._pending[:n_frames], self._pending[n_frames:]
        return block

    def _append(self, samples: np.ndarray) -> None:
        self._check_open()
        frames = np.asarray(samples, dtype=np.float32)
        if frames.ndim == 1:
            frames = frames[:, None]
        if frames.ndim != 2 or frames.shape[1] != self.channels:
            raise ProducerError(
                f"{self.stream_id}: expected samples shaped (n,) or (n, {self.channels}), "
                f"got {np.shape(samples)}"
            )
        self._pending = np.concatenate([self._pending, frames])

    def _check_open(self) -> None:
        if self.ended:
            raise ProducerError(f"{self.stream_id}: the stream has ended")

    def _send_frames(self, frames: np.ndarray, *, end: bool) -> None:
        self._send(encode_pcm(frames, self.encoding.value), frames.shape[0], end=end)

    def _send(self, payload: bytes, n_frames: int, *, end: bool) -> None:
        offset_ms = round(self.frames_sent * 1000 / self.sample_rate)
        self.producer.queue(
            AudioChunk(
                stream_id=self.stream_id,
                sequence=self.sequence,
                encoding=self.encoding,
                sample_rate_hz=self.sample_rate,
                payload=payload,
                capture_time_ms=self.start_time_ms + offset_ms,
                channels=self.channels,
                end_of_stream=end,
                metadata=self.metadata if self.sequence == 0 else {},
            )
        )
        # Queued: this number is used. A delivery failure is reported, never re-sent under it.
        self.sequence += 1
        self.frames_sent += n_frames
        self.ended = end
        self.producer.raise_delivery_errors(self.stream_id)

    def anchor(self, capture_time_ms: int) -> None:
        """Make ``capture_time_ms`` the capture time of the next chunk; later ones follow it by
        their audio. A paced sender anchors each chunk to the moment it sends it."""
        self.start_time_ms = capture_time_ms - round(self.frames_sent * 1000 / self.sample_rate)


def _check_chunk_ms(chunk_ms: int) -> None:
    if not MIN_CHUNK_MS <= chunk_ms <= MAX_CHUNK_MS:
        raise ProducerError(f"chunk_ms must be {MIN_CHUNK_MS}..{MAX_CHUNK_MS}, got {chunk_ms}")
