"""Reference files: JSON transcript and RTTM round-trip; a bad file says where it is bad."""

from __future__ import annotations

import json

import pytest

from producer_tools.reference import (
    Reference,
    ReferenceError,
    SpeakerTurn,
    read_rttm,
    read_transcript,
    write_rttm,
    write_transcript,
)

REF = Reference(
    "call-7",
    (
        SpeakerTurn("A", 0.25, 2.5, "Hello, Northwind billing."),
        SpeakerTurn("B", 2.2, 4.0625, "Hi, I was charged twice."),
        SpeakerTurn("A", 4.3, 5.0, "Sorry about that."),
    ),
)


def test_transcript_round_trip_keeps_turns_and_adds_extra_keys(tmp_path) -> None:
    path = tmp_path / "call.json"
    write_transcript(path, REF, extra={"seed": 3})
    document = json.loads(path.read_text())
    assert document["seed"] == 3
    assert document["turns"][1] == {
        "speaker": "B",
        "start": 2.2,
        "end": 4.062,  # milliseconds, as in the RTTM
        "text": "Hi, I was charged twice.",
    }
    back = read_transcript(path)
    assert back.recording == "call-7"
    assert [(t.speaker, t.text) for t in back.turns] == [(t.speaker, t.text) for t in REF.turns]
    assert back.speakers == ("A", "B")


def test_rttm_round_trip_matches_the_transcript_times(tmp_path) -> None:
    write_rttm(tmp_path / "call.rttm", REF)
    write_transcript(tmp_path / "call.json", REF)
    lines = (tmp_path / "call.rttm").read_text().splitlines()
    assert lines[0] == "SPEAKER call-7 1 0.250 2.250 <NA> <NA> A <NA> <NA>"
    from_rttm = read_rttm(tmp_path / "call.rttm")
    from_json = read_transcript(tmp_path / "call.json")
    assert [(t.speaker, t.start_s, t.end_s) for t in from_rttm.turns] == [
        (t.speaker, t.start_s, t.end_s) for t in from_json.turns
    ]
    assert all(t.text == "" for t in from_rttm.turns)


def test_rttm_with_several_recordings_needs_a_choice(tmp_path) -> None:
    path = tmp_path / "all.rttm"
    path.write_text(
        ";; a comment\n"
        "SPKR-INFO call-1 1 <NA> <NA> <NA> unknown A <NA> <NA>\n"
        "SPEAKER call-1 1 1.0 2.0 <NA> <NA> A <NA> <NA>\n"
        "\n"
        "SPEAKER call-2 1 0.5 1.5 <NA> <NA> X <NA> <NA>\n"
    )
    with pytest.raises(ReferenceError, match=r"2 recordings \(call-1, call-2\)"):
        read_rttm(path)
    (turn,) = read_rttm(path, "call-2").turns
    assert turn == SpeakerTurn("X", 0.5, 2.0)
    with pytest.raises(ReferenceError, match="no recording 'call-3'"):
        read_rttm(path, "call-3")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("SPEAKER call 1 1.0 2.0 <NA>", "at least 8 fields"),
        ("SPEAKER call 1 one 2.0 <NA> <NA> A <NA> <NA>", "must be numbers"),
        ("SPEAKER call 1 1.0 -2.0 <NA> <NA> A <NA> <NA>", "bad start"),
        ("SPEAKER call 1 -1.0 2.0 <NA> <NA> A <NA> <NA>", "0 <= start"),
    ],
)
def test_bad_rttm_lines_name_the_line(tmp_path, line: str, message: str) -> None:
    path = tmp_path / "bad.rttm"
    path.write_text("SPEAKER call 1 0.0 1.0 <NA> <NA> A <NA> <NA>\n" + line + "\n")
    with pytest.raises(ReferenceError, match=f"bad.rttm:2: .*{message}"):
        read_rttm(path)


def test_rttm_without_speaker_lines_is_an_error(tmp_path) -> None:
    path = tmp_path / "empty.rttm"
    path.write_text(";; nothing here\n")
    with pytest.raises(ReferenceError, match="no SPEAKER lines"):
        read_rttm(path)
    with pytest.raises(ReferenceError, match="no such file"):
        read_rttm(tmp_path / "missing.rttm")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("[1, 2]", 'an object with a "turns" list'),
        ('{"turns": [{"speaker": "A", "start": 0, "end": 1}]}', "turn 0: missing text"),
        ('{"turns": ["hello"]}', "turn 0: expected an object"),
        ('{"turns": [{"speaker": "A", "start": 2, "end": 1, "text": ""}]}', "start <= end"),
        ('{"turns": [{"speaker": "A", "start": "0", "end": 1, "text": ""}]}', "finite numbers"),
        ("{not json", "not JSON"),
    ],
)
def test_bad_transcripts_say_what_is_wrong(tmp_path, document: str, message: str) -> None:
    path = tmp_path / "ref.json"
    path.write_text(document)
    with pytest.raises(ReferenceError, match=message):
        read_transcript(path)


def test_transcript_without_recording_is_named_after_its_file(tmp_path) -> None:
    path = tmp_path / "call-9.json"
    path.write_text('{"turns": [{"speaker": "A", "start": 0, "end": 1, "text": "hi"}]}')
    assert read_transcript(path).recording == "call-9"
