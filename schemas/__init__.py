"""The Avro contract of our topics: ``*.avsc`` beside this file, typed records and their codecs."""

from schemas.codec import (
    Codec,
    CodecError,
    RecordCodec,
    RegistryUnavailable,
    WireFormat,
    load_schema,
    make_codec,
    parse_schema,
)
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
    "Codec",
    "CodecError",
    "DeadLetter",
    "EventKind",
    "PartitionCheckpoint",
    "RecordCodec",
    "RegistryUnavailable",
    "StreamProgress",
    "TranscriptEvent",
    "WireFormat",
    "Word",
    "load_schema",
    "make_codec",
    "make_event_id",
    "parse_schema",
]
