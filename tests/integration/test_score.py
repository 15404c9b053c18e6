"""``score`` against the real broker: the topic reader sees committed events only, and
``synth`` → ``stream`` → worker → ``score`` runs end to end (the tiny random models make the
numbers meaningless; the plumbing, and that topic and dump give the same scores, are tested)."""

from __future__ import annotations

import json
import math
import uuid

import pytest
from confluent_kafka import Producer

from producer_tools.__main__ import main
from producer_tools.reference import read_transcript
from producer_tools.score import ScoreError, normalize_words, read_topic
from schemas import EventKind, RecordCodec, TranscriptEvent
from tests.espeak import require_espeak
from tests.integration.test_worker import RunningWorker, _config
from worker.service.topics import create_topics

WORKER_TIMEOUT_S = 300.0
P, F, E = EventKind.PARTIAL, EventKind.FINAL, EventKind.STREAM_END


def _event(stream: str, kind: EventKind, segment: int, text: str = "", **times) -> TranscriptEvent:
    return TranscriptEvent(
        event_id=uuid.uuid4().hex,
        stream_id=stream,
        kind=kind,
        segment_index=segment,
        revision=0,
        speaker=None if kind is E else times.get("speaker", "speaker_0"),
        start_s=times.get("start", 0.0),
        end_s=times.get("end", 1.0),
        start_time_ms=0,
        end_time_ms=0,
        text=text,
        words=(),
        first_sequence=0,
        last_sequence=0,
        diarizer_model="d",
        asr_model="a",
    )


def _transaction(producer: Producer, topic: str, events: list, commit: bool = True) -> None:
    codec = RecordCodec(TranscriptEvent)
    producer.begin_transaction()
    for e in events:
        producer.produce(topic, key=e.stream_id.encode(), value=codec.encode(e))
    if commit:
        producer.commit_transaction(30)
    else:
        producer.flush(30)  # the records reach the log, then the abort marks them
        producer.abort_transaction(30)


def test_topic_reader_sees_one_streams_committed_events_to_its_end(
    kafka_bootstrap, new_topic, tmp_path, capsys
) -> None:
    topic = new_topic(partitions=2)
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "transactional.id": f"score-{uuid.uuid4().hex}"}
    )
    producer.init_transactions(30)
    first = [
        _event("call-a", P, 0, "hel", start=0.0, end=1.0),
        _event("call-b", F, 0, "other call", start=0.0, end=1.0),
        _event("call-a", F, 0, "hello there", start=0.0, end=1.0),
    ]
    aborted = [_event("call-a", F, 1, "never committed", start=1.0, end=2.0)]
    last = [
        _event("call-a", F, 1, "good morning", speaker="speaker_1", start=1.0, end=2.0),
        _event("call-a", E, 2, start=0.0, end=2.0),
    ]
    _transaction(producer, topic, first)
    _transaction(producer, topic, aborted, commit=False)
    _transaction(producer, topic, last)

    got = read_topic(kafka_bootstrap, topic, "call-a", timeout_s=WORKER_TIMEOUT_S)
    assert got == [first[0], first[2], *last]
    # A call that never ended is an error once the topic stays quiet, not a silent partial score.
    # The 2 s count from when the reader has read to the end of every partition (an observed
    # condition), not from its start: a slow group join on a loaded machine is not quiet.
    with pytest.raises(ScoreError, match="no STREAM_END for stream 'call-b'"):
        read_topic(kafka_bootstrap, topic, "call-b", timeout_s=2)

    reference = tmp_path / "ref.json"
    reference.write_text(
        json.dumps(
            {
                "turns": [
                    {"speaker": "A", "start": 0.0, "end": 1.0, "text": "Hello there."},
                    {"speaker": "B", "start": 1.0, "end": 2.0, "text": "Good evening."},
                ]
            }
        )
    )
    kafka = ["--bootstrap-servers", kafka_bootstrap, "--topic", topic]
    args = ["score", "--reference", str(reference), "--stream", "call-a", *kafka, "--json"]
    capsys.readouterr()
    assert main([*args, "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["wer"]["errors"], result["wer"]["length"]) == (1, 4)  # evening → morning
    assert result["cpwer"]["assignment"] == {"A": "speaker_0", "B": "speaker_1"}
    assert result["der"]["error_rate"] == 0.0


@pytest.mark.slow
def test_synth_stream_worker_score(kafka_bootstrap, fp64_models, tmp_path, capsys) -> None:
    require_espeak()
    config = _config(kafka_bootstrap, float64=True)
    create_topics(config, partitions=2)
    wav = tmp_path / "call.wav"
    synth = ["synth", str(wav), "--speakers", "2", "--turns", "2", "--seed", "7"]
    assert main([*synth, "--stereo", "--telephone", "--quiet"]) == 0
    capsys.readouterr()
    reference, rttm = wav.with_suffix(".json"), wav.with_suffix(".rttm")
    kafka = ["--bootstrap-servers", kafka_bootstrap]
    with RunningWorker(config, fp64_models):
        stream = ["stream", str(wav), "--encoding", "mulaw", "--topic", config.input_topic]
        assert main([*stream, *kafka, "--speed", "0", "--quiet"]) == 0
        (sid,) = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
        refs = ["--reference", str(reference), "--rttm", str(rttm), "--json", "--quiet"]
        score_topic = ["score", "--stream", sid, "--topic", config.output_topic, *kafka, *refs]
        assert main([*score_topic, "--timeout-sec", str(WORKER_TIMEOUT_S)]) == 0
        from_topic = json.loads(capsys.readouterr().out)
        tail = ["tail", "--json", "--stream", sid, "--topic", config.output_topic, *kafka]
        assert main([*tail, "--idle-timeout-sec", str(WORKER_TIMEOUT_S)]) == 0
        dump = tmp_path / "events.jsonl"
        dump.write_text(capsys.readouterr().out)
    assert main(["score", "--events", str(dump), *refs]) == 0
    from_dump = json.loads(capsys.readouterr().out)
    assert from_dump == from_topic  # the two readers give the same hypothesis

    events = [json.loads(line) for line in dump.read_text().splitlines()]
    ref = read_transcript(reference)
    assert from_topic["stream_id"] == sid and from_topic["stream_ended"] is True
    assert from_topic["hypothesis_finals"] == sum(e["kind"] == "FINAL" for e in events)
    assert from_topic["reference_turns"] == 2 and from_topic["reference_speakers"] == 2
    ref_words = sum(len(normalize_words(t.text)) for t in ref.turns)
    assert from_topic["wer"]["length"] == from_topic["cpwer"]["length"] == ref_words
    assert from_topic["der"]["total_s"] == pytest.approx(sum(t.duration_s for t in ref.turns))
    for metric in ("wer", "cpwer", "der"):
        rate = from_topic[metric]["error_rate"]
        assert isinstance(rate, float) and math.isfinite(rate) and rate >= 0, (metric, rate)
