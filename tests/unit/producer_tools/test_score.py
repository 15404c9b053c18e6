"""The scorer on inputs whose WER, cpWER and DER are worked out by hand, its readers, its CLI."""

from __future__ import annotations

import io
import json

import pytest

from producer_tools.__main__ import main
from producer_tools.reference import Reference, SpeakerTurn, write_rttm, write_transcript
from producer_tools.score import (
    Hypothesis,
    ScoreError,
    cp_word_error_rate,
    diarization_error_rate,
    hypothesis_from_events,
    normalize_words,
    read_dump,
    score,
    word_error_rate,
)
from producer_tools.tail import event_json
from schemas import EventKind, TranscriptEvent

P, F, E = EventKind.PARTIAL, EventKind.FINAL, EventKind.STREAM_END


def turn(speaker: str, start: float, end: float, text: str = "") -> SpeakerTurn:
    return SpeakerTurn(speaker, start, end, text)


def event(
    kind: EventKind,
    segment: int,
    text: str = "",
    speaker: str | None = "speaker_0",
    start: float = 0.0,
    end: float = 1.0,
    stream: str = "call-1",
    revision: int = 0,
) -> TranscriptEvent:
    return TranscriptEvent(
        event_id=f"{stream}-{segment}-{revision}-{kind}",
        stream_id=stream,
        kind=kind,
        segment_index=segment,
        revision=revision,
        speaker=None if kind is E else speaker,
        start_s=start,
        end_s=end,
        start_time_ms=0,
        end_time_ms=0,
        text=text,
        words=(),
        first_sequence=0,
        last_sequence=0,
        diarizer_model="d",
        asr_model="a",
    )


# --- WER ---------------------------------------------------------------------------------------


def test_one_substitution_in_four_words_is_a_quarter() -> None:
    er = word_error_rate([turn("A", 0, 1, "the cat sat down")], [turn("x", 0, 1, "the cat sat up")])
    assert (er.error_rate, er.errors, er.length) == (0.25, 1, 4)
    assert (er.substitutions, er.deletions, er.insertions) == (1, 0, 0)


def test_wer_counts_deletions_and_insertions_over_reference_words() -> None:
    ref = [turn("A", 0, 1, "a b c d")]
    er = word_error_rate(ref, [turn("x", 0, 1, "a c d e f")])  # b deleted, e f inserted
    assert (er.deletions, er.insertions, er.substitutions) == (1, 2, 0)
    assert er.error_rate == pytest.approx(3 / 4)
    assert word_error_rate(ref, []).error_rate == 1.0  # nothing recognised: all deleted


def test_wer_ignores_speakers_case_and_punctuation_and_orders_by_time() -> None:
    ref = [turn("A", 0, 1, "Hello, Sam."), turn("B", 1, 2, "Don't worry!")]
    hyp = [turn("s1", 1.1, 2, "don't worry"), turn("s0", 0, 0.9, "hello sam")]
    assert word_error_rate(ref, hyp).error_rate == 0.0
    assert normalize_words("It’s  FOUR-four, ok?") == ["it's", "four", "four", "ok"]
    # As written, "Hello," and "hello" differ: 4 of 4 words wrong.
    assert word_error_rate(ref, hyp, normalize=False).errors == 4


def test_wer_without_reference_words_is_an_error() -> None:
    with pytest.raises(ScoreError, match="no words"):
        word_error_rate([turn("A", 0, 1, "...")], [turn("x", 0, 1, "hello")])


# --- cpWER -------------------------------------------------------------------------------------


def test_speakers_swapped_is_cpwer_zero() -> None:
    ref = [turn("A", 0, 1, "hello world"), turn("B", 1, 2, "good morning sir")]
    hyp = [turn("speaker_1", 0, 1, "hello world"), turn("speaker_0", 1, 2, "good morning sir")]
    er = cp_word_error_rate(ref, hyp)
    assert (er.error_rate, er.errors, er.length) == (0.0, 0, 5)
    assert er.assignment == {"A": "speaker_1", "B": "speaker_0"}


def test_words_given_to_the_wrong_speaker_cost_cpwer_but_not_wer() -> None:
    ref = [turn("A", 0, 1, "a b"), turn("B", 1, 2, "c d")]
    hyp = [turn("x", 0, 2, "a b c d")]  # one speaker heard: right words, wrong attribution
    assert word_error_rate(ref, hyp).error_rate == 0.0
    er = cp_word_error_rate(ref, hyp)
    # A↔x: "c d" inserted (2); B unmatched: "c d" deleted (2). 4 errors over 4 words.
    assert (er.errors, er.length, er.insertions, er.deletions) == (4, 4, 2, 2)
    assert er.error_rate == 1.0
    assert er.missed_speakers == 1


def test_cpwer_concatenates_each_speakers_turns_in_time_order() -> None:
    ref = [turn("A", 0, 1, "one two"), turn("B", 1, 2, "three"), turn("A", 2, 3, "four")]
    hyp = [turn("x", 2, 3, "four"), turn("y", 1, 2, "three"), turn("x", 0, 1, "one too")]
    er = cp_word_error_rate(ref, hyp)
    assert (er.errors, er.substitutions, er.length) == (1, 1, 4)


# --- DER ---------------------------------------------------------------------------------------


def test_der_confusion_of_two_seconds_in_twenty() -> None:
    ref = [turn("A", 0, 10), turn("B", 10, 20)]
    hyp = [turn("x", 0, 12), turn("y", 12, 20)]  # B's first 2 s given to A's speaker
    der = diarization_error_rate(ref, hyp)
    assert der.error_rate == pytest.approx(0.1)
    assert (der.confusion_s, der.missed_s, der.false_alarm_s, der.total_s) == pytest.approx(
        (2, 0, 0, 20)
    )
    assert der.mapping == {"x": "A", "y": "B"}


def test_der_missed_speech_and_false_alarm() -> None:
    der = diarization_error_rate([turn("A", 0, 10)], [turn("x", 2, 12)])
    assert (der.missed_s, der.false_alarm_s, der.confusion_s) == pytest.approx((2, 2, 0))
    assert der.error_rate == pytest.approx(0.4)


def test_der_counts_overlapped_speech_once_per_speaker() -> None:
    der = diarization_error_rate([turn("A", 0, 10), turn("B", 5, 15)], [turn("x", 0, 10)])
    assert der.total_s == pytest.approx(20)  # 10 s of A + 10 s of B
    assert der.missed_s == pytest.approx(10)  # all of B
    assert der.error_rate == pytest.approx(0.5)


def test_der_collar_is_centred_on_reference_boundaries() -> None:
    ref = [turn("A", 0, 10), turn("B", 10, 20)]
    hyp = [turn("x", 0, 12), turn("y", 12, 20)]
    # collar 2: [9, 11] (and the ends) not scored; confusion left in [11, 12] over 16 s scored.
    der = diarization_error_rate(ref, hyp, collar_s=2.0)
    assert (der.confusion_s, der.total_s) == pytest.approx((1, 16))
    assert der.error_rate == pytest.approx(1 / 16)
    assert diarization_error_rate(ref, hyp, collar_s=4.0).error_rate == pytest.approx(0.0)


def test_der_of_nothing_recognised_is_all_missed() -> None:
    der = diarization_error_rate([turn("A", 1, 4)], [])
    assert (der.error_rate, der.missed_s) == pytest.approx((1.0, 3.0))
    with pytest.raises(ScoreError, match="no speech"):
        diarization_error_rate([turn("A", 1, 1)], [turn("x", 0, 1)])


# --- events → hypothesis -----------------------------------------------------------------------


def test_hypothesis_is_the_finals_and_the_last_final_of_a_segment_wins() -> None:
    events = [
        event(P, 0, "hel", start=0.5),
        event(P, 1, "goo", speaker="speaker_1", start=2.0),
        event(F, 0, "hello", start=0.5, end=1.5, revision=1),
        event(P, 2, "never finished", start=3.0),
        event(F, 1, "good morning", speaker="speaker_1", start=2.0, end=3.0, revision=1),
        event(F, 0, "hello", start=0.5, end=1.5, revision=1),  # a replay in the dump
        event(F, 0, "hi", stream="call-2"),
        event(E, 3),
    ]
    hyp = hypothesis_from_events(events, "call-1")
    assert hyp.turns == (
        turn("speaker_0", 0.5, 1.5, "hello"),
        turn("speaker_1", 2.0, 3.0, "good morning"),
    )
    assert hyp.ended and hyp.unfinished_segments == 1
    assert hyp.speakers == ("speaker_0", "speaker_1")
    assert not hypothesis_from_events([e for e in events if e.stream_id == "call-2"]).ended


def test_hypothesis_needs_one_stream_named_or_alone() -> None:
    two = [event(F, 0, "a"), event(F, 0, "b", stream="call-2")]
    with pytest.raises(ScoreError, match=r"2 calls \(call-1, call-2\)"):
        hypothesis_from_events(two)
    with pytest.raises(ScoreError, match="no events of stream 'call-3'"):
        hypothesis_from_events(two, "call-3")
    with pytest.raises(ScoreError, match="no transcript events"):
        hypothesis_from_events([])


def test_dump_reader_takes_tail_json_lines_and_json_arrays(tmp_path) -> None:
    events = [event(P, 0, "hel"), event(F, 0, "hello"), event(E, 1)]
    lines = "\n".join(event_json(e) for e in events) + "\n\n"  # tail --json, a blank line
    path = tmp_path / "events.jsonl"
    path.write_text(lines)
    assert read_dump(path) == events
    array = json.dumps([e.to_avro() for e in events])
    assert read_dump(io.StringIO(array)) == events


def test_dump_reader_names_the_bad_line(tmp_path) -> None:
    good = event_json(event(F, 0, "hello"))
    path = tmp_path / "events.jsonl"
    path.write_text(good + "\n{oops\n")
    with pytest.raises(ScoreError, match=r"events.jsonl:2: not JSON"):
        read_dump(path)
    path.write_text(good + "\n" + json.dumps({"stream_id": "x", "kind": "FINAL"}) + "\n")
    with pytest.raises(ScoreError, match=r"events.jsonl:2: not a TranscriptEvent: missing field"):
        read_dump(path)
    path.write_text(json.dumps({**event(F, 0).to_avro(), "kind": "DONE"}) + "\n")
    with pytest.raises(ScoreError, match=r"events.jsonl:1: not a TranscriptEvent"):
        read_dump(path)
    with pytest.raises(ScoreError, match="no such file"):
        read_dump(tmp_path / "missing.jsonl")


# --- report and CLI ----------------------------------------------------------------------------

REFERENCE = Reference(
    "call-1",
    (turn("A", 0.0, 2.0, "Hello, this is Sam."), turn("B", 2.0, 4.0, "Hi Sam, my laptop broke.")),
)
EVENTS = [
    event(F, 0, "hello this is sam", speaker="speaker_1", start=0.0, end=2.0),
    event(F, 1, "hi sam my laptop woke", speaker="speaker_0", start=2.0, end=4.0),
    event(E, 2, start=0.0, end=4.0),
]


def test_report_holds_every_score() -> None:
    report = score(hypothesis_from_events(EVENTS), REFERENCE)
    assert report.wer is not None and report.cpwer is not None and report.der is not None
    assert report.wer.error_rate == pytest.approx(1 / 9)  # "woke" for "broke"
    assert report.cpwer.error_rate == pytest.approx(1 / 9)
    assert report.der.error_rate == 0.0
    table = report.table()
    assert "WER" in table and "11.1%" in table and "A→speaker_1" in table
    rttm_only = score(hypothesis_from_events(EVENTS), rttm=REFERENCE)
    assert rttm_only.wer is None and rttm_only.der is not None
    with pytest.raises(ScoreError, match="nothing to score against"):
        score(Hypothesis("x", (), True))


def test_score_command_prints_json_from_a_dump(tmp_path, capsys) -> None:
    write_transcript(tmp_path / "ref.json", REFERENCE)
    write_rttm(tmp_path / "ref.rttm", REFERENCE)
    (tmp_path / "events.jsonl").write_text("".join(event_json(e) + "\n" for e in EVENTS))
    args = [
        "score",
        "--reference",
        str(tmp_path / "ref.json"),
        "--rttm",
        str(tmp_path / "ref.rttm"),
    ]
    assert main([*args, "--events", str(tmp_path / "events.jsonl"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stream_id"] == "call-1" and result["stream_ended"] is True
    assert result["wer"]["errors"] == 1 and result["wer"]["length"] == 9
    assert result["cpwer"]["assignment"] == {"A": "speaker_1", "B": "speaker_0"}
    assert result["der"]["error_rate"] == 0.0 and result["der"]["total_s"] == pytest.approx(4.0)
    assert main([*args, "--events", str(tmp_path / "events.jsonl")]) == 0
    assert "cpWER" in capsys.readouterr().out


def test_score_command_errors_are_clear(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["score", "--events", "x.jsonl"])
    assert exited.value.code == 2
    assert "--reference" in capsys.readouterr().err
    write_transcript(tmp_path / "ref.json", REFERENCE)
    with pytest.raises(SystemExit) as exited:
        main(["score", "--reference", str(tmp_path / "ref.json")])
    assert exited.value.code == 2
    assert "--events FILE" in capsys.readouterr().err
    code = main(
        ["score", "--reference", str(tmp_path / "nope.json"), "--events", str(tmp_path / "e")]
    )
    assert code == 1
    assert "nope.json: no such file" in capsys.readouterr().err


def test_empty_and_zero_length_finals_score_as_nothing_recognised() -> None:
    ref = [turn("A", 0, 1, "hello there")]
    hyp = [turn("x", 0, 0, ""), turn("y", 0.5, 0.5, "...")]
    assert word_error_rate(ref, hyp).deletions == 2
    assert cp_word_error_rate(ref, hyp).error_rate == 1.0
    der = diarization_error_rate(ref, hyp)
    assert (der.error_rate, der.missed_s, der.false_alarm_s) == (1.0, 1.0, 0.0)
