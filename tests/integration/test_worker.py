"""The worker against the real broker, with the tiny random models (float64, so a call's
transcript is exactly the engine's direct output for it, whatever it was batched with)."""

from __future__ import annotations

import threading
import time
import urllib.request
import uuid
from collections import defaultdict

import numpy as np
import pytest
import torch
from confluent_kafka import Consumer, KafkaError, Producer

from producer_tools.conversation import default_conversations
from producer_tools.stream import CallAudio, interleave, publish, read_events, to_chunks
from schemas import AudioChunk, AudioEncoding, DeadLetter, RecordCodec
from worker.config import GapPolicy, WorkerConfig, load_config
from worker.engine.engine import StreamingEngine
from worker.engine.models import LoadedModels
from worker.metrics import Health, HttpEndpoints, Metrics
from worker.service.loop import ModelNames, Worker
from worker.service.topics import create_topics

pytestmark = pytest.mark.slow


def _config(bootstrap: str, **overrides) -> WorkerConfig:
    run = uuid.uuid4().hex[:8]
    values = {
        "bootstrap_servers": bootstrap,
        "input_topic": f"audio-{run}",
        "output_topic": f"transcripts-{run}",
        "dead_letter_topic": f"dead-{run}",
        "progress_topic": f"progress-{run}",
        "group_id": f"workers-{run}",
        "metrics_port": 0,
        "transaction_interval_ms": 100,
        "idle_timeout_sec": 60,
        "session_timeout_ms": 6000,
        "transaction_timeout_ms": 10_000,
    }
    values.update(overrides)
    return load_config(environ={}, overrides=values)


class RunningWorker:
    """A worker loop on a thread of this process, with its metrics."""

    def __init__(self, config: WorkerConfig, models: LoadedModels, http: bool = False) -> None:
        torch.set_default_dtype(torch.float64)
        self.metrics = Metrics()
        self.health = Health(stale_after_sec=120)
        self.health.models_loaded = True
        engine = StreamingEngine(models, config.engine)
        self.worker = Worker(
            config, engine, ModelNames(models.diarizer_id, models.asr_id), self.metrics, self.health
        )
        self.http = HttpEndpoints(self.metrics, self.health, "127.0.0.1", 0) if http else None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def __enter__(self) -> RunningWorker:
        if self.http:
            self.http.start()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.worker.stop()
        self.thread.join(120)
        if self.http:
            self.http.stop()
        assert not self.thread.is_alive(), "worker did not stop"
        assert self.error is None, f"worker failed: {self.error!r}"


def _calls(count: int) -> dict[str, np.ndarray]:
    convs = list(default_conversations().values())
    return {f"call-{i}": convs[i % len(convs)].audio[: (8 + 2 * i) * 16000] for i in range(count)}


def _direct_finals(models: LoadedModels, config: WorkerConfig, audio: np.ndarray) -> list[tuple]:
    """The engine on one call alone, fed the same 16 kHz samples the worker decodes, told of
    the end once its full chunks are stepped (as the worker does), speakers named by first
    appearance (as the worker names them)."""
    torch.set_default_dtype(torch.float64)
    engine = StreamingEngine(models, config.engine)
    engine.add_stream("x")
    chunks = to_chunks(CallAudio("x", audio), chunk_ms=200, start_ms=0)
    from worker.audio import AudioDecoder

    decoder = AudioDecoder(AudioEncoding.PCM_S16LE, 16000, 1)
    for chunk in chunks:
        engine.push_audio("x", decoder.decode(chunk.payload), chunk.sequence)
    updates = []
    while engine.ready_streams():
        updates += engine.step()
    engine.end_stream("x")
    while engine.ready_streams():
        updates += engine.step()
    labels: dict[str, str] = {}
    finals = []
    for update in updates:
        for segment, _ in update.segments:
            label = labels.setdefault(segment.speaker, f"speaker_{len(labels)}")
            if segment.final:
                finals.append(_key(segment, label))
    return finals


def _key(segment, speaker: str) -> tuple:
    return (
        segment.segment_index,
        speaker,
        segment.text,
        round(segment.start_s, 6),
        round(segment.end_s, 6),
    )


def _publish_calls(config: WorkerConfig, calls: dict[str, np.ndarray]) -> None:
    producer = Producer({"bootstrap.servers": config.bootstrap_servers})
    streams = [
        to_chunks(CallAudio(sid, audio), chunk_ms=200, start_ms=1_000_000)
        for sid, audio in calls.items()
    ]
    publish(producer, config.input_topic, interleave(streams))


def _finals_by_call(config: WorkerConfig, calls, timeout_s: float = 300) -> dict[str, list]:
    finals: dict[str, list] = defaultdict(list)
    for event in read_events(
        config.bootstrap_servers,
        config.output_topic,
        until_stream_ends=set(calls),
        timeout_s=timeout_s,
    ):
        if event.kind == "FINAL":
            finals[event.stream_id].append(
                (
                    event.segment_index,
                    event.speaker,
                    event.text,
                    round(event.start_s, 6),
                    round(event.end_s, 6),
                )
            )
    return finals


def test_concurrent_calls_come_out_as_the_engine_gives_them(kafka_bootstrap, fp64_models) -> None:
    config = _config(kafka_bootstrap, float64=True)
    create_topics(config, partitions=3)
    calls = _calls(4)
    with RunningWorker(config, fp64_models, http=True) as running:
        _publish_calls(config, calls)
        finals = _finals_by_call(config, calls)
        port = running.http.port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            scrape = resp.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            assert resp.status == 200
    for sid, audio in calls.items():
        expected = _direct_finals(fp64_models, config, audio)
        assert expected, f"{sid}: the engine gave no finals"
        assert sorted(finals[sid]) == sorted(expected), sid
    for name in (
        "records_total",
        "audio_seconds_total",
        "events_total",
        "active_streams",
        "step_streams",
        "step_speaker_instances",
        "step_seconds",
        "real_time_factor",
        "end_to_end_latency_seconds",
        "rebalances_total",
        "transactions_total",
        "model_load_seconds",
        "dead_letters_total",
        "duplicate_chunks_total",
        "sequence_gaps_total",
        "consumer_lag_records",
        "gpu_memory_bytes",
    ):
        assert f"callscribe_{name}" in scrape, name
    assert 'callscribe_events_total{kind="FINAL"}' in scrape


def _dead_letters(config: WorkerConfig, expected: int, timeout_s: float = 60) -> list[DeadLetter]:
    codec = RecordCodec(DeadLetter)
    consumer = Consumer(
        {
            "bootstrap.servers": config.bootstrap_servers,
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([config.dead_letter_topic])
    out = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or (msg.error() and msg.error().code() == KafkaError._PARTITION_EOF):
                continue
            out.append(codec.decode(msg.value()))
    finally:
        consumer.close()
    return out


def test_bad_input_is_dead_lettered_and_good_calls_complete(kafka_bootstrap, fp64_models) -> None:
    config = _config(
        kafka_bootstrap, float64=True, gap_policy=GapPolicy.DEAD_LETTER, max_payload_bytes=64_000
    )
    create_topics(config, partitions=2)
    calls = _calls(2)
    codec = RecordCodec(AudioChunk)
    good = to_chunks(CallAudio("bad-call", np.zeros(16000, dtype=np.float32)), start_ms=0)[0]
    bad: list[tuple[bytes | None, bytes, str]] = [
        (b"junk-1", b"\x07\x01not avro", "undecodable_record"),
        (None, codec.encode(good), "missing_key"),
        (b"someone-else", codec.encode(good), "key_mismatch"),
        (
            b"bad-call",
            codec.encode(_replace(good, encoding=AudioEncoding.UNKNOWN)),
            "unsupported_encoding",
        ),
        (
            b"bad-call",
            codec.encode(_replace(good, sample_rate_hz=12345)),
            "unsupported_sample_rate",
        ),
        (b"bad-call", codec.encode(_replace(good, payload=b"\x00" * 100_000)), "payload_too_large"),
        (
            b"late-call",
            codec.encode(_replace(good, stream_id="late-call", sequence=3)),
            "stream_not_open",
        ),
        # Poison records that once crashed the worker (issue 7):
        (b"bad-call", codec.encode(_replace(good, sequence=-1)), "invalid_sequence"),
        (  # every event of the call would overflow an Avro long
            b"bad-call",
            codec.encode(_replace(good, capture_time_ms=2**63 - 1)),
            "invalid_capture_time",
        ),
        (  # near 1 MB: its dead letter must still fit under the producer's message size limit
            b"bad-call",
            codec.encode(_replace(good, payload=b"\x01" * 900_000)),
            "payload_too_large",
        ),
        (
            b"odd-call",
            codec.encode(_replace(good, stream_id="odd-call", payload=b"\x00" * 3)),
            "misaligned_payload",
        ),
    ]
    # A call that ends, then gets another chunk; one whose chunk 0 repeats with other audio;
    # one with an absurd sequence number.
    ended = to_chunks(CallAudio("ended-call", np.zeros(8000, dtype=np.float32)), chunk_ms=200)
    after_end = _replace(ended[-1], sequence=ended[-1].sequence + 1, end_of_stream=False)
    dup = to_chunks(CallAudio("dup-call", np.zeros(8000, dtype=np.float32)), chunk_ms=200)
    conflicting = _replace(dup[0], payload=b"\x01\x02" * (len(dup[0].payload) // 2))
    absurd = _replace(dup[1], sequence=10**15)
    poison_calls = [*ended, after_end, dup[0], conflicting, absurd, *dup[1:]]
    poison_reasons = ["stream_not_open", "conflicting_duplicate", "sequence_gap_too_large"]
    gap_call = to_chunks(CallAudio("gap-call", np.zeros(16000, dtype=np.float32)), start_ms=0)
    producer = Producer({"bootstrap.servers": config.bootstrap_servers})
    with RunningWorker(config, fp64_models) as running:
        for key, value, _ in bad:
            producer.produce(config.input_topic, key=key, value=value)
        publish(producer, config.input_topic, [gap_call[0], gap_call[2]])  # sequence 1 missing
        publish(producer, config.input_topic, poison_calls)
        _publish_calls(config, calls)
        finals = _finals_by_call(config, calls)
        letters = _dead_letters(config, expected=len(bad) + 1 + len(poison_reasons))
        assert running.worker.health.alive()
    reasons = sorted(d.reason for d in letters)
    assert reasons == sorted([r for _, _, r in bad] + ["sequence_gap", *poison_reasons])
    for letter in letters:
        assert letter.source_topic == config.input_topic and letter.message
        assert letter.original_value is not None
        assert len(letter.original_value) <= config.max_dead_letter_original_bytes
    cut = [d for d in letters if "truncated" in d.message]
    assert len(cut) == 2  # the two records over max_dead_letter_original_bytes
    assert all(d.reason == "payload_too_large" and "sha256" in d.message for d in cut)
    for sid, audio in calls.items():
        assert sorted(finals[sid]) == sorted(_direct_finals(fp64_models, config, audio)), sid


def _replace(chunk: AudioChunk, **changes) -> AudioChunk:
    import dataclasses

    return dataclasses.replace(chunk, **changes)
