"""AudioChunkProducer / AudioStream: chunking, sequence, times, end of stream, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from producer_tools import AudioChunkProducer, ProducerError
from schemas import AudioChunk, AudioEncoding, RecordCodec
from worker.audio import decode_pcm


@pytest.fixture
def sent(monkeypatch) -> tuple[AudioChunkProducer, list[AudioChunk]]:
    """A producer whose sends are recorded instead of published (no broker is contacted)."""
    producer = AudioChunkProducer("127.0.0.1:1", "audio", chunk_ms=100)
    chunks: list[AudioChunk] = []
    monkeypatch.setattr(producer, "send", chunks.append)
    return producer, chunks


def test_write_sends_whole_chunks_and_end_flags_the_last(sent) -> None:
    producer, chunks = sent
    call = producer.open_stream(
        "c1", sample_rate=8000, encoding="PCM_MULAW", start_time_ms=1000, metadata={"t": "a"}
    )
    audio = np.linspace(-0.5, 0.5, 2000, dtype=np.float32)  # 250 ms at 8 kHz
    assert call.write(audio[:700]) == 0  # 87.5 ms: nothing whole yet
    assert call.write(audio[700:]) == 2
    call.end()
    assert [c.sequence for c in chunks] == [0, 1, 2]
    assert [len(c.payload) for c in chunks] == [800, 800, 400]  # μ-law: 1 byte per sample
    assert [c.capture_time_ms for c in chunks] == [1000, 1100, 1200]
    assert [c.end_of_stream for c in chunks] == [False, False, True]
    assert [c.metadata for c in chunks] == [{"t": "a"}, {}, {}]
    assert {(c.encoding, c.sample_rate_hz, c.channels) for c in chunks} == {
        (AudioEncoding.PCM_MULAW, 8000, 1)
    }
    decoded = np.concatenate([decode_pcm(c.payload, "PCM_MULAW")[:, 0] for c in chunks])
    assert np.abs(decoded - audio).max() < 0.02  # G.711 quantisation, nothing lost or reordered
    # Every chunk encodes with the schema: the API never makes a record the worker cannot read.
    codec = RecordCodec(AudioChunk)
    assert [codec.decode(codec.encode(c)) for c in chunks] == chunks


def test_end_with_samples_puts_the_flag_on_the_last_audio_not_an_empty_chunk(sent) -> None:
    producer, chunks = sent
    call = producer.open_stream("c2", sample_rate=16000, start_time_ms=0)
    call.end(np.zeros(3200, dtype=np.float32))  # exactly two chunks of 100 ms
    assert [(c.sequence, len(c.payload), c.end_of_stream) for c in chunks] == [
        (0, 3200, False),
        (1, 3200, True),
    ]


def test_stereo_is_interleaved_and_kept_as_two_channels(sent) -> None:
    producer, chunks = sent
    call = producer.open_stream("c3", channels=2, start_time_ms=0)
    frames = np.stack([np.full(1600, 0.25), np.full(1600, -0.25)], axis=1)
    call.end(frames)
    (chunk,) = chunks
    assert chunk.channels == 2
    np.testing.assert_allclose(decode_pcm(chunk.payload, "PCM_S16LE", 2), frames, atol=1e-4)


def test_an_ended_stream_sends_an_empty_final_chunk_once(sent) -> None:
    producer, chunks = sent
    call = producer.open_stream("c4", start_time_ms=0)
    call.end()
    assert [(c.payload, c.end_of_stream) for c in chunks] == [(b"", True)]
    with pytest.raises(ProducerError, match="ended"):
        call.write(np.zeros(10, dtype=np.float32))


def test_write_encoded_passes_bytes_through(sent) -> None:
    producer, chunks = sent
    call = producer.open_stream("c5", sample_rate=8000, encoding="PCM_ALAW", start_time_ms=0)
    call.write_encoded(b"\xd5" * 160)
    call.write_encoded(b"\xd5" * 160)
    call.end()
    assert [c.capture_time_ms for c in chunks] == [0, 20, 40]
    assert chunks[0].payload == b"\xd5" * 160
    pcm = producer.open_stream("c6", start_time_ms=0)
    with pytest.raises(ProducerError, match="whole number"):
        pcm.write_encoded(b"\x00" * 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_rate": 12345}, "sample rate"),
        ({"encoding": "OPUS"}, "encoding"),
        ({"channels": 3}, "channels"),
        ({"chunk_ms": 5}, "chunk_ms"),
    ],
)
def test_bad_stream_settings_are_clear_errors(sent, kwargs, message) -> None:
    producer, _ = sent
    with pytest.raises(ProducerError, match=message):
        producer.open_stream("c", **kwargs)


def test_bad_stream_ids_and_shapes_are_clear_errors(sent) -> None:
    producer, _ = sent
    with pytest.raises(ProducerError, match="stream id"):
        producer.open_stream("")
    with pytest.raises(ProducerError, match="stream id"):
        producer.open_stream("x" * 257)
    call = producer.open_stream("c")
    with pytest.raises(ProducerError, match=r"shaped \(n,\) or \(n, 1\)"):
        call.write(np.zeros((10, 2), dtype=np.float32))


def test_a_bad_registry_url_is_a_producer_error() -> None:
    with pytest.raises(ProducerError, match="must start with"):
        AudioChunkProducer("127.0.0.1:1", schema_registry_url="registry:8081")


def test_unreachable_broker_is_a_clear_error() -> None:
    producer = AudioChunkProducer("127.0.0.1:1")
    with pytest.raises(ProducerError, match="no answer from Kafka"):
        producer.check_topic(timeout_sec=0.5)
