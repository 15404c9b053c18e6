"""Round-trips, framing, evolution and malformed input for the Avro codecs."""

from __future__ import annotations

import dataclasses
import io
import json
import random
import struct
import uuid
from importlib import resources

import fastavro
import pytest

from schemas import (
    AudioChunk,
    AudioEncoding,
    CodecError,
    DeadLetter,
    EventKind,
    RecordCodec,
    TranscriptEvent,
    WireFormat,
    Word,
    make_event_id,
)
from schemas.records import EVENT_ID_NAMESPACE


def _chunk(encoding: AudioEncoding = AudioEncoding.PCM_S16LE, **kw) -> AudioChunk:
    fields = dict(
        stream_id="call-42",
        sequence=7,
        encoding=encoding,
        sample_rate_hz=8000,
        channels=2,
        payload=bytes(range(256)) * 3,
        capture_time_ms=1_764_000_000_123,
        end_of_stream=False,
        metadata={"direction": "inbound", "tenant": "acme"},
    )
    fields.update(kw)
    return AudioChunk(**fields)


def _event() -> TranscriptEvent:
    return TranscriptEvent(
        event_id=make_event_id("call-42", 3, 1),
        stream_id="call-42",
        kind=EventKind.FINAL,
        segment_index=3,
        revision=1,
        speaker="speaker_1",
        start_s=1.5,
        end_s=2.75,
        start_time_ms=1_764_000_001_623,
        end_time_ms=1_764_000_002_873,
        text="hello there",
        words=(Word("hello", 1.5, 1.9), Word("there", 2.0, 2.75)),
        first_sequence=0,
        last_sequence=12,
        diarizer_model="nvidia/diar_streaming_sortformer_4spk-v2.1",
        asr_model="nvidia/multitalker-parakeet-streaming-0.6b-v1",
    )


def _dead_letter() -> DeadLetter:
    return DeadLetter(
        reason="unsupported_sample_rate",
        message="sample rate 12345 Hz is not supported",
        source_topic="audio",
        source_partition=2,
        source_offset=99,
        failed_time_ms=1_764_000_000_000,
        stream_id="call-42",
        original_key=b"call-42",
        original_value=b"\x00\x01\x02",
        worker_id="worker-a",
    )


RECORDS = [
    *(_chunk(enc) for enc in AudioEncoding if enc is not AudioEncoding.UNKNOWN),
    _chunk(payload=b"", end_of_stream=True, metadata={}),
    _event(),
    dataclasses.replace(_event(), kind=EventKind.STREAM_END, speaker=None, text="", words=()),
    dataclasses.replace(_event(), channel=1, role="customer"),
    _dead_letter(),
    DeadLetter("undecodable_record", "x", "audio", 0, 0, 0),
]


@pytest.mark.parametrize("wire_format", list(WireFormat))
@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_round_trip(record, wire_format: WireFormat) -> None:
    codec = RecordCodec(type(record), wire_format, schema_id=17)
    data = codec.encode(record)
    assert codec.decode(data) == record


def test_confluent_framing_is_magic_byte_and_big_endian_id() -> None:
    codec = RecordCodec(AudioChunk, WireFormat.CONFLUENT, schema_id=0x01020304)
    data = codec.encode(_chunk())
    assert data[:5] == b"\x00\x01\x02\x03\x04"
    plain = RecordCodec(AudioChunk).encode(_chunk())
    assert data[5:] == plain


def test_event_ids_are_deterministic_and_distinct() -> None:
    assert make_event_id("a", 0, 0) == make_event_id("a", 0, 0)
    for stream, seg, rev in [("a", 0, 0), ("call-42", 3, 1), ("ünï", 10**9, 7)]:
        expected = uuid.uuid5(EVENT_ID_NAMESPACE, f"{stream}\x0017\x00{seg}\x00{rev}")
        assert make_event_id(stream, seg, rev, call=17) == str(expected)
    # A stream id reused for a later call (starting at another offset) gets other ids.
    assert make_event_id("a", 0, 0, call=0) != make_event_id("a", 0, 0, call=5)
    ids = {make_event_id(s, seg, rev) for s in ("a", "b") for seg in range(3) for rev in range(3)}
    assert len(ids) == 18
    # The separator keeps ("a1", 0) and ("a", 10) apart.
    assert make_event_id("a1", 0, 0) != make_event_id("a", 10, 0)


# AudioChunk as a first producer might have written it: no channels, metadata or
# end-of-stream flag, and an encoding enum without A-law.
OLDER_AUDIO_CHUNK = {
    "type": "record",
    "name": "AudioChunk",
    "namespace": "io.callscribe.v1",
    "fields": [
        {"name": "stream_id", "type": "string"},
        {"name": "sequence", "type": "long"},
        {
            "name": "encoding",
            "type": {
                "type": "enum",
                "name": "AudioEncoding",
                "symbols": ["PCM_S16LE", "PCM_MULAW"],
            },
        },
        {"name": "sample_rate_hz", "type": "int"},
        {"name": "payload", "type": "bytes"},
        {"name": "capture_time_ms", "type": "long"},
    ],
}


def _newer_schema() -> dict:
    """AudioChunk from a newer producer: one more encoding and one more field."""
    schema = json.loads((resources.files("schemas") / "audio_chunk.avsc").read_text())
    schema["fields"][2]["type"]["symbols"].append("OPUS")
    schema["fields"].append({"name": "codec_params", "type": "string", "default": ""})
    return schema


def _write_with(schema: dict, record: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema, named_schemas={}), record)
    return buf.getvalue()


def test_older_writer_decodes_with_defaults_plain() -> None:
    old = {
        "stream_id": "c",
        "sequence": 3,
        "encoding": "PCM_MULAW",
        "sample_rate_hz": 8000,
        "payload": b"\xff" * 160,
        "capture_time_ms": 5,
    }
    codec = RecordCodec(AudioChunk, writer_schema=OLDER_AUDIO_CHUNK)
    chunk = codec.decode(_write_with(OLDER_AUDIO_CHUNK, old))
    assert chunk == AudioChunk("c", 3, AudioEncoding.PCM_MULAW, 8000, b"\xff" * 160, 5)
    assert chunk.channels == 1 and chunk.end_of_stream is False and chunk.metadata == {}


def test_older_writer_decodes_by_schema_id_confluent() -> None:
    old = {
        "stream_id": "c",
        "sequence": 0,
        "encoding": "PCM_S16LE",
        "sample_rate_hz": 16000,
        "payload": b"\x00\x00",
        "capture_time_ms": 1,
    }
    codec = RecordCodec(
        AudioChunk, WireFormat.CONFLUENT, schema_id=2, writer_schemas={1: OLDER_AUDIO_CHUNK}
    )
    framed = struct.pack(">bI", 0, 1) + _write_with(OLDER_AUDIO_CHUNK, old)
    assert codec.decode(framed).encoding is AudioEncoding.PCM_S16LE
    # The current schema under its own id still decodes too.
    assert codec.decode(codec.encode(_chunk())) == _chunk()


def test_unknown_enum_symbol_from_newer_writer_reads_as_unknown() -> None:
    newer = _newer_schema()
    record = _chunk().to_avro() | {"encoding": "OPUS", "codec_params": "x"}
    codec = RecordCodec(AudioChunk, writer_schema=newer)
    assert codec.decode(_write_with(newer, record)).encoding is AudioEncoding.UNKNOWN


def _reasons_for(codec: RecordCodec, data: bytes) -> str:
    with pytest.raises(CodecError) as info:
        codec.decode(data)
    assert info.value.message
    return info.value.reason


@pytest.mark.parametrize("record_type", [AudioChunk, TranscriptEvent, DeadLetter])
def test_malformed_bytes_give_codec_error(record_type) -> None:
    plain = RecordCodec(record_type)
    framed = RecordCodec(record_type, WireFormat.CONFLUENT, schema_id=5)
    assert _reasons_for(plain, b"") == "empty_record"
    assert _reasons_for(plain, b"\x02") == "undecodable_record"
    assert _reasons_for(framed, b"\x00\x00") == "truncated_header"
    assert _reasons_for(framed, b"\x07\x00\x00\x00\x05abc") == "bad_magic_byte"
    assert _reasons_for(framed, b"\x00\x00\x00\x00\x09abc") == "unknown_schema_id"
    good = plain.encode(
        {AudioChunk: _chunk, TranscriptEvent: _event, DeadLetter: _dead_letter}[record_type]()
    )
    assert _reasons_for(plain, good + b"\x00") == "trailing_bytes"
    assert _reasons_for(plain, good[: len(good) // 2]) == "undecodable_record"


@pytest.mark.parametrize("record_type", [AudioChunk, TranscriptEvent, DeadLetter])
def test_random_bytes_never_crash_the_decoder(record_type) -> None:
    rng = random.Random(1234)
    codec = RecordCodec(record_type)
    good = codec.encode(
        {AudioChunk: _chunk, TranscriptEvent: _event, DeadLetter: _dead_letter}[record_type]()
    )
    for _ in range(2000):
        if rng.random() < 0.5:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        else:  # flip a few bytes of a valid record
            mutable = bytearray(good)
            for _ in range(rng.randrange(1, 4)):
                mutable[rng.randrange(len(mutable))] = rng.randrange(256)
            data = bytes(mutable)
        try:
            decoded = codec.decode(data)
        except CodecError as exc:
            assert exc.reason in {"undecodable_record", "trailing_bytes", "invalid_record"}
        else:
            assert isinstance(decoded, record_type)


def test_encoding_a_wrong_type_is_a_codec_error() -> None:
    with pytest.raises(CodecError) as info:
        RecordCodec(AudioChunk).encode(_chunk(sequence="seven"))
    assert info.value.reason == "invalid_record"


def test_out_of_range_schema_id_is_rejected() -> None:
    with pytest.raises(ValueError, match="4 unsigned bytes"):
        RecordCodec(AudioChunk, WireFormat.CONFLUENT, schema_id=2**32)


def test_an_event_from_before_channels_reads_with_no_channel_and_role() -> None:
    """channel and role were added with null defaults (BACKWARD): older events still read."""
    schema = json.loads((resources.files("schemas") / "transcript_event.avsc").read_text())
    schema["fields"] = [f for f in schema["fields"] if f["name"] not in ("channel", "role")]
    record = _event().to_avro()
    del record["channel"], record["role"]
    codec = RecordCodec(TranscriptEvent, writer_schema=schema)
    assert codec.decode(_write_with(schema, record)) == _event()
