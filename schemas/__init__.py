"""The Avro contract of our topics: ``*.avsc`` beside this file, typed records and their codecs."""

from schemas.codec import CodecError, RecordCodec, WireFormat, load_schema, parse_schema
from schemas.records import (
    AudioChunk,
    AudioEncoding,
    DeadLetter,
    EventKind,
    PartitionCheckpoint,
    StreamProgress,
    TranscriptEvent,
    Word,
    make_event_id,
)

__all__ = [
    "AudioChunk",
    "AudioEncoding",
    "CodecError",
    "DeadLetter",
    "EventKind",
    "PartitionCheckpoint",
    "RecordCodec",
    "StreamProgress",
    "TranscriptEvent",
    "WireFormat",
    "Word",
    "load_schema",
    "make_event_id",
    "parse_schema",
]
