"""Schema Registry codecs through confluent-kafka's client, against its ``mock://`` registry."""

from __future__ import annotations

import json
import struct
import uuid

import pytest
from confluent_kafka.schema_registry import SchemaRegistryError
from confluent_kafka.schema_registry._sync.mock_schema_registry_client import (
    MockSchemaRegistryClient,
)
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from schemas import (
    AudioChunk,
    AudioEncoding,
    CodecError,
    DeadLetter,
    EventKind,
    RecordCodec,
    RegistryUnavailable,
    TranscriptEvent,
    Word,
    make_codec,
)
from schemas.registry import (
    DEFAULT_REQUEST_TIMEOUT_SEC,
    RegistryCodec,
    registry_client,
    subject_for,
)
from tests.unit.test_schemas import OLDER_AUDIO_CHUNK
from worker.config import ConfigError, load_config


def _url() -> str:
    """A fresh in-memory registry per test."""
    return f"mock://{uuid.uuid4().hex}"


def _chunk(**changes) -> AudioChunk:
    values = dict(
        stream_id="call-1",
        sequence=4,
        encoding=AudioEncoding.PCM_MULAW,
        sample_rate_hz=8000,
        payload=b"\xff\x7f" * 80,
        capture_time_ms=1_700_000_000_000,
        channels=2,
        end_of_stream=True,
        metadata={"tenant": "acme"},
    )
    values.update(changes)
    return AudioChunk(**values)


def _event() -> TranscriptEvent:
    return TranscriptEvent(
        event_id="e",
        stream_id="call-1",
        kind=EventKind.FINAL,
        segment_index=2,
        revision=1,
        speaker="speaker_1",
        start_s=1.5,
        end_s=2.25,
        start_time_ms=10,
        end_time_ms=20,
        text="hello there",
        words=(Word("hello", 1.5, 1.9), Word("there", 1.9, 2.25)),
        first_sequence=7,
        last_sequence=11,
        diarizer_model="d",
        asr_model="a",
    )


@pytest.mark.parametrize(
    "record",
    [_chunk(), _event(), DeadLetter("bad", "why", "t", 0, 5, 9, original_value=b"\x01")],
    ids=lambda r: type(r).__name__,
)
def test_round_trip_registers_under_topic_subject(record) -> None:
    url = _url()
    codec = make_codec(type(record), topic="calls", registry_url=url)
    data = codec.encode(record)
    magic, schema_id = struct.unpack(">bI", data[:5])
    client = registry_client(url)
    registered = client.get_latest_version(subject_for("calls"))
    assert magic == 0 and schema_id == registered.schema_id
    # A separate codec (another reader of the same registry) decodes it by the id alone.
    assert make_codec(type(record), topic="calls", registry_url=url).decode(data) == record


def test_reader_resolves_an_older_writer_schema_by_id() -> None:
    url = _url()
    client = registry_client(url)
    # An older producer, written without our code: it knows only the older schema.
    older = AvroSerializer(client, json.dumps(OLDER_AUDIO_CHUNK))
    ctx = SerializationContext("calls", MessageField.VALUE)
    old_bytes = older(
        {
            "stream_id": "c",
            "sequence": 3,
            "encoding": "PCM_MULAW",
            "sample_rate_hz": 8000,
            "payload": b"\xff" * 160,
            "capture_time_ms": 5,
        },
        ctx,
    )
    codec = make_codec(AudioChunk, topic="calls", registry_url=url)
    new_bytes = codec.encode(_chunk())
    old_id = struct.unpack(">I", old_bytes[1:5])[0]
    new_id = struct.unpack(">I", new_bytes[1:5])[0]
    assert old_id != new_id
    assert sorted(client.get_versions(subject_for("calls"))) == [1, 2]
    chunk = codec.decode(old_bytes)
    # Fields the older schema lacks take the current schema's defaults.
    assert chunk == AudioChunk("c", 3, AudioEncoding.PCM_MULAW, 8000, b"\xff" * 160, 5)
    assert codec.decode(new_bytes) == _chunk()


def test_plain_reader_cannot_read_registry_framing_so_the_default_stays_plain() -> None:
    framed = make_codec(AudioChunk, topic="calls", registry_url=_url()).encode(_chunk())
    plain = make_codec(AudioChunk, topic="calls")
    assert isinstance(plain, RecordCodec)
    with pytest.raises(CodecError):
        plain.decode(framed)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_record"),
        (b"\x05abcdefg", "bad_magic_byte"),
        (b"\x00\x00\x00\x03\xe7abc", "unknown_schema_id"),
        (b"\x00\x00", "undecodable_record"),
    ],
)
def test_bad_bytes_are_codec_errors_with_reasons(data: bytes, reason: str) -> None:
    codec = make_codec(AudioChunk, topic="calls", registry_url=_url())
    codec.encode(_chunk())  # id 1 exists; 999 does not
    with pytest.raises(CodecError) as caught:
        codec.decode(data)
    assert caught.value.reason == reason


def test_truncated_record_is_undecodable() -> None:
    codec = make_codec(AudioChunk, topic="calls", registry_url=_url())
    data = codec.encode(_chunk())
    with pytest.raises(CodecError) as caught:
        codec.decode(data[:12])
    assert caught.value.reason == "undecodable_record"


def test_one_client_per_url_in_a_process() -> None:
    # confluent-kafka's mock keeps schemas per client instance: sharing the client is what
    # lets a worker and a producer in one process see the same mock registry.
    url = _url()
    assert registry_client(url) is registry_client(url + "/")
    assert registry_client(url) is not registry_client(_url())
    writer = RegistryCodec(AudioChunk, registry_client(url), "calls")
    data = writer.encode(_chunk())
    other = make_codec(AudioChunk, topic="calls", registry_url=_url())
    with pytest.raises(CodecError) as caught:
        other.decode(data)
    assert caught.value.reason == "unknown_schema_id"


def test_bad_registry_url_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="must start with"):
        registry_client("localhost:8081")
    with pytest.raises(ConfigError, match="schema_registry_url"):
        load_config(environ={}, overrides={"schema_registry_url": "localhost:8081"})
    config = load_config(environ={"CALLSCRIBE_SCHEMA_REGISTRY_URL": "mock://x"})
    assert config.schema_registry_url == "mock://x"


class _AnswersWith404(MockSchemaRegistryClient):
    """A registry stub whose schema lookups all answer 404 with ``error_code``."""

    def __init__(self, error_code: int) -> None:
        super().__init__({"url": "mock://stub"})
        self.error_code = error_code

    def get_schema(self, *_args, **_kwargs):
        raise SchemaRegistryError(404, self.error_code, "not found")


def test_only_error_code_40403_means_an_unknown_schema_id() -> None:
    data = make_codec(AudioChunk, topic="calls", registry_url=_url()).encode(_chunk())
    with pytest.raises(CodecError) as caught:
        RegistryCodec(AudioChunk, _AnswersWith404(40403), "calls").decode(data)
    assert caught.value.reason == "unknown_schema_id"
    # A proxy's 404 (no registry error code) or a subject/version 404: the registry is not
    # answering about this id, so the record is not at fault: retry, never dead-letter.
    for code in (-1, 40401, 40402):
        with pytest.raises(RegistryUnavailable):
            RegistryCodec(AudioChunk, _AnswersWith404(code), "calls").decode(data)


def test_registry_requests_have_a_timeout() -> None:
    client = registry_client("http://127.0.0.1:1")
    assert client._rest_client.session.timeout.read == DEFAULT_REQUEST_TIMEOUT_SEC
    assert registry_client("http://127.0.0.1:1", timeout_sec=2.5)._rest_client.timeout == 2.5


def test_a_value_the_schema_cannot_hold_is_a_codec_error_not_an_outage() -> None:
    codec = make_codec(AudioChunk, topic="calls", registry_url=_url())
    with pytest.raises(CodecError) as caught:
        codec.encode(_chunk(capture_time_ms=2**63))  # past Avro long
    assert caught.value.reason == "invalid_record"


def test_trailing_bytes_are_rejected_as_the_plain_codec_does() -> None:
    codec = make_codec(AudioChunk, topic="calls", registry_url=_url())
    data = codec.encode(_chunk())
    assert codec.decode(data) == _chunk()
    with pytest.raises(CodecError) as caught:
        codec.decode(data + b"\x00")
    assert caught.value.reason == "trailing_bytes"
    with pytest.raises(CodecError) as caught:
        RecordCodec(AudioChunk).decode(RecordCodec(AudioChunk).encode(_chunk()) + b"\x00")
    assert caught.value.reason == "trailing_bytes"
