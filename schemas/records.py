"""Typed views of the records in ``schemas/*.avsc``; field names and meanings are the schemas'."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, Self


class AudioEncoding(StrEnum):
    """Sample encoding of an AudioChunk payload (Avro enum ``AudioEncoding``)."""

    UNKNOWN = "UNKNOWN"
    PCM_S16LE = "PCM_S16LE"
    PCM_MULAW = "PCM_MULAW"
    PCM_ALAW = "PCM_ALAW"


class EventKind(StrEnum):
    """Kind of a TranscriptEvent (Avro enum ``EventKind``)."""

    UNKNOWN = "UNKNOWN"
    PARTIAL = "PARTIAL"
    FINAL = "FINAL"
    STREAM_END = "STREAM_END"


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """One piece of a call's audio; the record key is ``stream_id``."""

    SCHEMA = "audio_chunk"

    stream_id: str
    sequence: int
    encoding: AudioEncoding
    sample_rate_hz: int
    payload: bytes
    capture_time_ms: int
    channels: int = 1
    end_of_stream: bool = False
    metadata: dict[str, str] = field(default_factory=dict)

    def to_avro(self) -> dict[str, Any]:
        return {
            "stream_id": self.stream_id,
            "sequence": self.sequence,
            "encoding": str(self.encoding),
            "sample_rate_hz": self.sample_rate_hz,
            "channels": self.channels,
            "payload": self.payload,
            "capture_time_ms": self.capture_time_ms,
            "end_of_stream": self.end_of_stream,
            "metadata": self.metadata,
        }

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Self:
        return cls(
            stream_id=data["stream_id"],
            sequence=data["sequence"],
            encoding=AudioEncoding(data["encoding"]),
            sample_rate_hz=data["sample_rate_hz"],
            channels=data["channels"],
            payload=data["payload"],
            capture_time_ms=data["capture_time_ms"],
            end_of_stream=data["end_of_stream"],
            metadata=data["metadata"],
        )


@dataclass(frozen=True, slots=True)
class Word:
    """One recognised word with its times, seconds from the start of the call."""

    text: str
    start_s: float
    end_s: float


@dataclass(frozen=True, slots=True)
class TranscriptEvent:
    """A speaker-attributed transcript segment revision, or a call's end; key is ``stream_id``."""

    SCHEMA = "transcript_event"

    event_id: str
    stream_id: str
    kind: EventKind
    segment_index: int
    revision: int
    speaker: str | None
    start_s: float
    end_s: float
    start_time_ms: int
    end_time_ms: int
    text: str
    words: tuple[Word, ...]
    first_sequence: int
    last_sequence: int
    diarizer_model: str
    asr_model: str
    channel: int | None = None
    role: str | None = None

    def to_avro(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "stream_id": self.stream_id,
            "kind": str(self.kind),
            "segment_index": self.segment_index,
            "revision": self.revision,
            "speaker": self.speaker,
            "start_s": self.start_s,
            "end_s": self.end_s,
            "start_time_ms": self.start_time_ms,
            "end_time_ms": self.end_time_ms,
            "text": self.text,
            "words": [{"text": w.text, "start_s": w.start_s, "end_s": w.end_s} for w in self.words],
            "first_sequence": self.first_sequence,
            "last_sequence": self.last_sequence,
            "diarizer_model": self.diarizer_model,
            "asr_model": self.asr_model,
            "channel": self.channel,
            "role": self.role,
        }

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Self:
        return cls(
            event_id=data["event_id"],
            stream_id=data["stream_id"],
            kind=EventKind(data["kind"]),
            segment_index=data["segment_index"],
            revision=data["revision"],
            speaker=data["speaker"],
            start_s=data["start_s"],
            end_s=data["end_s"],
            start_time_ms=data["start_time_ms"],
            end_time_ms=data["end_time_ms"],
            text=data["text"],
            words=tuple(Word(w["text"], w["start_s"], w["end_s"]) for w in data["words"]),
            first_sequence=data["first_sequence"],
            last_sequence=data["last_sequence"],
            diarizer_model=data["diarizer_model"],
            asr_model=data["asr_model"],
            channel=data.get("channel"),
            role=data.get("role"),
        )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An input record the worker rejected, with the reason and where it came from."""

    SCHEMA = "dead_letter"

    reason: str
    message: str
    source_topic: str
    source_partition: int
    source_offset: int
    failed_time_ms: int
    stream_id: str | None = None
    original_key: bytes | None = None
    original_value: bytes | None = None
    worker_id: str = ""

    def to_avro(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "message": self.message,
            "source_topic": self.source_topic,
            "source_partition": self.source_partition,
            "source_offset": self.source_offset,
            "stream_id": self.stream_id,
            "original_key": self.original_key,
            "original_value": self.original_value,
            "failed_time_ms": self.failed_time_ms,
            "worker_id": self.worker_id,
        }

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Self:
        return cls(**data)


EVENT_ID_NAMESPACE = uuid.UUID("6f1c3d2e-8a4b-5c7d-9e0f-1a2b3c4d5e6f")
_NAMESPACE_BYTES = EVENT_ID_NAMESPACE.bytes


def make_event_id(stream_id: str, segment_index: int, revision: int, call: int = 0) -> str:
    """The deterministic id of a transcript event: equal wherever and however often it is made.

    ``call`` is the input offset of the call's first record, so a stream id reused for a later
    call gets ids of its own. The id is
    ``uuid5(EVENT_ID_NAMESPACE, "<stream>\\0<call>\\0<segment>\\0<revision>")``, computed
    here without ``uuid.uuid5``'s overhead (this runs once per output event).
    """
    name = f"{stream_id}\x00{call}\x00{segment_index}\x00{revision}".encode()
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True, slots=True)
class StreamProgress:
    """Recovery bookkeeping of an open stream (see ``stream_progress.avsc``)."""

    SCHEMA = "stream_progress"

    stream_id: str
    input_topic: str
    partition: int
    first_offset: int
    events_emitted: int
    segments: int = 0
    last_event_id: str | None = None
    end_at: int = -1

    def to_avro(self) -> dict[str, Any]:
        return _fields_of(self)

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Self:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class PartitionCheckpoint:
    """Where the last checkpoint left an input partition (``partition_checkpoint.avsc``)."""

    SCHEMA = "partition_checkpoint"

    input_topic: str
    partition: int
    next_offset: int
    partition_time_ms: int
    worker_id: str = ""

    def to_avro(self) -> dict[str, Any]:
        return _fields_of(self)

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Self:
        return cls(**data)


def _fields_of(record: Any) -> dict[str, Any]:
    """A flat record's Avro dict: its dataclass fields by name."""
    return {f.name: getattr(record, f.name) for f in fields(record)}
