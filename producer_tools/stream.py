"""Publish calls as live AudioChunk streams, and read transcript events back.

Used by the demo, the tests and the load generator; ``python -m producer_tools`` wraps them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import soxr
from confluent_kafka import Consumer, KafkaError, Producer

from schemas import AudioChunk, AudioEncoding, RecordCodec, TranscriptEvent, WireFormat
from worker.audio import encode_pcm

_BYTES_PER_SAMPLE = {
    AudioEncoding.PCM_S16LE: 2,
    AudioEncoding.PCM_MULAW: 1,
    AudioEncoding.PCM_ALAW: 1,
}


@dataclass(frozen=True)
class CallAudio:
    """A call to publish: float audio at ``sample_rate``, mono 1-D or ``(n, channels)``."""

    stream_id: str
    audio: np.ndarray
    sample_rate: int = 16_000


def to_chunks(
    call: CallAudio,
    *,
    chunk_ms: int = 200,
    encoding: AudioEncoding = AudioEncoding.PCM_S16LE,
    sample_rate: int | None = None,
    start_ms: int | None = None,
    metadata: dict[str, str] | None = None,
) -> list[AudioChunk]:
    """The call cut into ``chunk_ms`` chunks (the last one flagged end-of-stream)."""
    audio = call.audio.astype(np.float32)
    rate = sample_rate or call.sample_rate
    if rate != call.sample_rate:
        audio = soxr.resample(audio, call.sample_rate, rate)
    per_chunk = max(1, rate * chunk_ms // 1000)
    start = int(time.time() * 1000) if start_ms is None else start_ms
    pieces = [audio[i : i + per_chunk] for i in range(0, len(audio), per_chunk)] or [audio[:0]]
    return [
        AudioChunk(
            stream_id=call.stream_id,
            sequence=seq,
            encoding=encoding,
            sample_rate_hz=rate,
            channels=1 if audio.ndim == 1 else audio.shape[1],
            payload=encode_pcm(piece, encoding),
            capture_time_ms=start + seq * chunk_ms,
            end_of_stream=seq == len(pieces) - 1,
            metadata=dict(metadata or {}) if seq == 0 else {},
        )
        for seq, piece in enumerate(pieces)
    ]


def interleave(streams: Iterable[list[AudioChunk]]) -> Iterator[AudioChunk]:
    """Chunks of several calls in capture-time order, as a live site would send them."""
    merged = [c for chunks in streams for c in chunks]
    yield from sorted(merged, key=lambda c: (c.capture_time_ms, c.stream_id))


def publish(
    producer: Producer,
    topic: str,
    chunks: Iterable[AudioChunk],
    *,
    realtime: bool = False,
    wire_format: WireFormat = WireFormat.PLAIN,
) -> int:
    """Produce chunks keyed by stream id; with ``realtime``, at the pace of their capture times."""
    codec = RecordCodec(AudioChunk, wire_format)
    started = time.monotonic()
    first_ms = None
    count = 0
    for chunk in chunks:
        if realtime:
            first_ms = chunk.capture_time_ms if first_ms is None else first_ms
            delay = (chunk.capture_time_ms - first_ms) / 1000 - (time.monotonic() - started)
            if delay > 0:
                time.sleep(delay)
        while True:
            try:
                producer.produce(topic, key=chunk.stream_id.encode(), value=codec.encode(chunk))
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        count += 1
    producer.flush(30)
    return count


def read_events(
    bootstrap: str,
    topic: str,
    *,
    until_stream_ends: set[str] | None = None,
    timeout_s: float = 60.0,
    wire_format: WireFormat = WireFormat.PLAIN,
    group_id: str | None = None,
) -> Iterator[TranscriptEvent]:
    """Committed transcript events from the start of ``topic``; stops when every stream in
    ``until_stream_ends`` has sent STREAM_END, or after ``timeout_s`` without an event."""
    codec = RecordCodec(TranscriptEvent, wire_format)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group_id or f"transcript-reader-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    waiting = set(until_stream_ends or ())
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and (until_stream_ends is None or waiting):
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    raise RuntimeError(f"reading {topic}: {msg.error()}")
                continue
            event = codec.decode(msg.value())
            deadline = time.monotonic() + timeout_s
            if event.kind == "STREAM_END":
                waiting.discard(event.stream_id)
            yield event
    finally:
        consumer.close()


def format_event(event: TranscriptEvent, max_text: int = 0) -> str:
    """One line a person can read; ``max_text`` > 0 shortens long texts with an ellipsis."""
    if event.kind == "STREAM_END":
        length = f"{event.end_s:.1f} s, {event.segment_index} segments"
        return f"{event.stream_id}  ── call ended ({length})"
    mark = "FINAL  " if event.kind == "FINAL" else "partial"
    text = " ".join(event.text.split())
    if 0 < max_text < len(text):
        text = text[: max_text - 1] + "…"
    return (
        f"{event.stream_id}  [{event.start_s:6.2f}–{event.end_s:6.2f}] {mark} "
        f"{event.speaker}: {text}"
    )
