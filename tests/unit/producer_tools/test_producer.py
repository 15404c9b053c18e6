"""AudioChunkProducer / AudioStream: chunking, sequence, times, end of stream, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from confluent_kafka import KafkaError, KafkaException

from producer_tools import AudioChunkProducer, ProducerError
from producer_tools.producer import MAX_PAYLOAD_BYTES
from schemas import AudioChunk, AudioEncoding, CodecError, RecordCodec, RegistryUnavailable
from worker.audio import decode_pcm


@pytest.fixture
def sent(monkeypatch) -> tuple[AudioChunkProducer, list[AudioChunk]]:
    """A producer whose sends are recorded instead of published (no broker is contacted)."""
    producer = AudioChunkProducer("127.0.0.1:1", "audio", chunk_ms=100)
    chunks: list[AudioChunk] = []
    monkeypatch.setattr(producer, "queue", chunks.append)
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


class FakeKafkaProducer:
    """confluent-kafka's Producer as far as AudioChunkProducer uses it: delivery reports come
    on poll/flush; the deliveries named in ``fail`` fail, and ``refuse`` makes produce raise."""

    def __init__(self, fail: set[tuple[bytes, int]] = frozenset(), refuse: bool = False) -> None:
        self.fail = fail
        self.refuse = refuse
        self.log: list[AudioChunk] = []
        self._pending: list = []
        self._codec = RecordCodec(AudioChunk)

    def produce(self, topic, key, value, on_delivery) -> None:
        if self.refuse:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Message too large"))
        chunk = self._codec.decode(value)
        self.log.append(chunk)
        failed = (key, chunk.sequence) in self.fail
        error = KafkaError(KafkaError._MSG_TIMED_OUT, "timed out") if failed else None
        self._pending.append((on_delivery, error))

    def poll(self, _timeout: float = 0) -> int:
        pending, self._pending = self._pending, []
        for callback, error in pending:
            callback(error, None)
        return len(pending)

    def flush(self, _timeout: float = 0) -> int:
        self.poll()
        return 0


def test_a_failed_delivery_is_reported_once_to_its_stream_and_sequences_go_on() -> None:
    producer = AudioChunkProducer("127.0.0.1:1", "audio", chunk_ms=100)
    fake = FakeKafkaProducer(fail={(b"b", 1)})
    producer._producer = fake
    streams = {sid: producer.open_stream(sid, start_time_ms=0) for sid in "abc"}
    errors = []
    for _ in range(5):
        for sid, stream in streams.items():
            try:
                stream.write(np.zeros(1600, dtype=np.float32))
            except ProducerError as exc:
                errors.append((sid, str(exc)))
    producer.flush()  # reported already: not raised again
    assert [sid for sid, _ in errors] == ["b"]  # once, on its own stream; a and c never see it
    assert "chunk 1" in errors[0][1] and "b" in errors[0][1]
    for sid in "abc":  # every chunk queued once, numbers 0..4: nothing re-sent under a number
        assert [c.sequence for c in fake.log if c.stream_id == sid] == [0, 1, 2, 3, 4]
        assert streams[sid].sequence == 5


def test_kafka_refusing_a_chunk_is_a_producer_error_and_uses_no_number() -> None:
    producer = AudioChunkProducer("127.0.0.1:1", "audio", chunk_ms=100)
    producer._producer = FakeKafkaProducer(refuse=True)
    stream = producer.open_stream("a", start_time_ms=0)
    with pytest.raises(ProducerError, match="Kafka refused chunk 0"):
        stream.write(np.zeros(1600, dtype=np.float32))
    assert stream.sequence == 0


def test_chunks_over_the_workers_payload_limit_are_refused_up_front() -> None:
    producer = AudioChunkProducer("127.0.0.1:1", "audio", chunk_ms=10_000)
    with pytest.raises(ProducerError, match="max_payload_bytes"):  # 1.92 MB per chunk
        producer.open_stream("a", sample_rate=48_000, channels=2)
    producer.open_stream("b", sample_rate=8000, encoding="PCM_MULAW")  # 80 kB: fine
    small = AudioChunkProducer("127.0.0.1:1", "audio", chunk_ms=100)
    small._producer = FakeKafkaProducer()
    stream = small.open_stream("c", sample_rate=8000, encoding="PCM_MULAW")
    with pytest.raises(ProducerError, match="max_payload_bytes"):
        stream.write_encoded(b"\xd5" * (MAX_PAYLOAD_BYTES + 1))


@pytest.mark.parametrize(
    "error",
    [
        RegistryUnavailable("registry at http://r:8081 did not answer"),
        CodecError("invalid_record", "cannot encode AudioChunk"),
        KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down")),
    ],
    ids=lambda e: type(e).__name__,
)
def test_tools_report_run_time_errors_in_one_line(monkeypatch, capsys, error, tmp_path) -> None:
    import producer_tools.__main__ as cli

    def fail(_args):
        raise error

    monkeypatch.setattr(cli, "cmd_conversation", fail)
    assert cli.main(["conversation", "billing", str(tmp_path / "x.wav")]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
