"""``python -m producer_tools stream`` and ``tail --json`` against the real broker and the worker.

The commands run in this process through ``main`` (so a ``mock://`` Schema Registry is shared
with the worker, which runs on a thread here as in ``test_worker.py``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict

import numpy as np
import pytest
import soundfile
from confluent_kafka import Consumer, KafkaError

from producer_tools.__main__ import main
from producer_tools.conversation import default_conversations
from producer_tools.stream import read_events
from schemas import AudioChunk, AudioEncoding, RecordCodec, TranscriptEvent, make_codec
from schemas.registry import registry_client, subject_for
from tests.integration.test_worker import RunningWorker, _config
from worker.audio import decode_pcm
from worker.service.topics import create_topics

pytestmark = pytest.mark.slow

READ_TIMEOUT_S = 60.0
WORKER_TIMEOUT_S = 300.0


def _stream(capsys, bootstrap: str, topic: str, *files_and_flags: str) -> list[str]:
    """Run ``stream`` as fast as possible; the stream ids it printed, in file order."""
    capsys.readouterr()
    args = ["stream", *files_and_flags, "--bootstrap-servers", bootstrap, "--topic", topic]
    assert main([*args, "--speed", "0", "--quiet"]) == 0
    return [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]


def _chunks_until_ends(bootstrap: str, topic: str, stream_ids: set[str]) -> dict[str, list]:
    """Every chunk on ``topic`` by stream, read until each stream's end_of_stream is seen."""
    codec = RecordCodec(AudioChunk)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    chunks: dict[str, list[AudioChunk]] = defaultdict(list)
    waiting = set(stream_ids)
    deadline = time.monotonic() + READ_TIMEOUT_S
    try:
        while waiting and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or (msg.error() and msg.error().code() == KafkaError._PARTITION_EOF):
                continue
            chunk = codec.decode(msg.value())
            assert msg.key() == chunk.stream_id.encode()
            chunks[chunk.stream_id].append(chunk)
            if chunk.end_of_stream:
                waiting.discard(chunk.stream_id)
    finally:
        consumer.close()
    assert not waiting, f"no end_of_stream within {READ_TIMEOUT_S} s for {waiting}"
    return chunks


def _tone(seconds: float, rate: int, channels: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    waves = [0.3 * np.sin(2 * np.pi * (200 + 150 * c) * t) for c in range(channels)]
    return np.stack(waves, axis=1).astype(np.float32)


def test_stream_publishes_wav_flac_stereo_and_8khz_mulaw(
    kafka_bootstrap, new_topic, tmp_path, capsys
) -> None:
    topic = new_topic(partitions=2)
    mono = _tone(1.05, 16000, 1)
    stereo = _tone(0.9, 44100, 2)
    soundfile.write(tmp_path / "mono.wav", mono, 16000, subtype="PCM_16")
    soundfile.write(tmp_path / "stereo.flac", stereo, 44100, subtype="PCM_16")
    wav_id, flac_id = _stream(
        capsys, kafka_bootstrap, topic, str(tmp_path / "mono.wav"), str(tmp_path / "stereo.flac")
    )
    (mulaw_id,) = _stream(
        capsys,
        kafka_bootstrap,
        topic,
        str(tmp_path / "mono.wav"),
        "--encoding",
        "mulaw",
        "--sample-rate",
        "8000",
        "--chunk-ms",
        "100",
        "--stream-id",
        "phone-call",
    )
    assert mulaw_id == "phone-call"
    chunks = _chunks_until_ends(kafka_bootstrap, topic, {wav_id, flac_id, mulaw_id})

    def check(sid: str, encoding, rate: int, channels: int, per_chunk: int) -> np.ndarray:
        got = chunks[sid]
        assert [c.sequence for c in got] == list(range(len(got)))
        assert [c.end_of_stream for c in got] == [False] * (len(got) - 1) + [True]
        assert {(c.encoding, c.sample_rate_hz, c.channels) for c in got} == {
            (encoding, rate, channels)
        }
        frames = [decode_pcm(c.payload, encoding, channels) for c in got]
        assert all(f.shape[0] == per_chunk for f in frames[:-1])
        assert got[0].metadata["source_file"] in {"mono.wav", "stereo.flac"}
        return np.concatenate(frames)

    # Linear PCM at the file's own rate arrives sample for sample.
    np.testing.assert_allclose(
        check(wav_id, AudioEncoding.PCM_S16LE, 16000, 1, 3200), mono, atol=1 / 32768
    )
    np.testing.assert_allclose(
        check(flac_id, AudioEncoding.PCM_S16LE, 44100, 2, 8820), stereo, atol=1 / 32768
    )
    # μ-law at 8 kHz: half the samples of the 16 kHz file, within G.711 quantisation.
    phone = check(mulaw_id, AudioEncoding.PCM_MULAW, 8000, 1, 800)
    assert phone.shape[0] == pytest.approx(mono.shape[0] / 2, abs=1)
    assert np.sqrt(np.mean(phone[:, 0] ** 2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.05)


def test_stream_errors_are_clear(kafka_bootstrap, tmp_path, capsys) -> None:
    wav = tmp_path / "a.wav"
    soundfile.write(wav, _tone(0.1, 16000, 1), 16000)
    assert (
        main(
            [
                "stream",
                str(wav),
                "--bootstrap-servers",
                kafka_bootstrap,
                "--topic",
                f"no-such-topic-{uuid.uuid4().hex}",
                "--quiet",
            ]
        )
        == 1
    )
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["stream", str(wav), str(wav), "--stream-id", "x"])
    assert exited.value.code == 2
    assert "exactly one file" in capsys.readouterr().err


@pytest.mark.parametrize("registry", [False, True], ids=["plain-avro", "schema-registry"])
def test_stream_then_tail_json_through_the_worker(
    kafka_bootstrap, fp64_models, tmp_path, capsys, registry
) -> None:
    url = f"mock://{uuid.uuid4().hex}" if registry else ""
    config = _config(kafka_bootstrap, float64=True, schema_registry_url=url)
    create_topics(config, partitions=2)
    conv = default_conversations()["billing"]
    stereo = conv.tracks[:2, : 3 * conv.sample_rate].T  # one party per channel
    path = tmp_path / "call.wav"
    soundfile.write(path, stereo, conv.sample_rate, subtype="PCM_16")
    registry_flags = ["--schema-registry-url", url] if url else []
    kafka = ["--bootstrap-servers", kafka_bootstrap]
    with RunningWorker(config, fp64_models):
        (sid,) = _stream(capsys, kafka_bootstrap, config.input_topic, str(path), *registry_flags)
        code = main(
            [
                "tail",
                "--json",
                "--stream",
                sid,
                "--topic",
                config.output_topic,
                "--idle-timeout-sec",
                str(WORKER_TIMEOUT_S),
                *kafka,
                *registry_flags,
            ]
        )
        assert code == 0
        tailed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert tailed, "tail printed nothing"
    assert tailed[-1]["kind"] == "STREAM_END", "tail stopped before the call's end"
    assert {e["stream_id"] for e in tailed} == {sid}
    assert any(e["kind"] == "FINAL" for e in tailed) or tailed[-1]["segment_index"] == 0
    # An independent read_committed reader sees exactly the same events, in the same order.
    if registry:
        codec = make_codec(TranscriptEvent, topic=config.output_topic, registry_url=url)
        raw = _raw_values(kafka_bootstrap, config.output_topic, len(tailed))
        assert all(value[0] == 0 for value in raw)  # confluent framing, not plain Avro
        expected = [codec.decode(value).to_avro() for value in raw]
        client = registry_client(url)
        for topic in (config.input_topic, config.output_topic):
            assert client.get_latest_version(subject_for(topic)).schema_id > 0
    else:
        expected = [
            e.to_avro()
            for e in read_events(
                kafka_bootstrap, config.output_topic, until_stream_ends={sid}, timeout_s=60
            )
        ]
    assert tailed == expected


def _raw_values(bootstrap: str, topic: str, count: int) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + READ_TIMEOUT_S
    try:
        while len(values) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            values.append(msg.value())
    finally:
        consumer.close()
    return values
