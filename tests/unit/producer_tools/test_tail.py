"""Transcript renderers: JSON lines for machines, a live view that rewrites partials in place."""

from __future__ import annotations

import io
import json
import types

from confluent_kafka import KafkaError

from producer_tools import tail
from producer_tools.tail import JsonLines, LiveView, PlainLines
from schemas import EventKind, RecordCodec, TranscriptEvent, Word


def _event(kind: EventKind, segment: int, text: str, speaker: str | None = "speaker_0"):
    return TranscriptEvent(
        event_id=f"{segment}-{text}",
        stream_id="call-1",
        kind=kind,
        segment_index=segment,
        revision=0,
        speaker=speaker,
        start_s=1.0,
        end_s=2.0,
        start_time_ms=0,
        end_time_ms=0,
        text=text,
        words=(Word(text.split()[0], 1.0, 2.0),) if text else (),
        first_sequence=0,
        last_sequence=1,
        diarizer_model="d",
        asr_model="a",
    )


P, F, E = EventKind.PARTIAL, EventKind.FINAL, EventKind.STREAM_END


def test_json_lines_carry_every_field() -> None:
    out = io.StringIO()
    JsonLines(out).show(_event(F, 0, "hello world"))
    (line,) = out.getvalue().splitlines()
    data = json.loads(line)
    assert data["kind"] == "FINAL" and data["text"] == "hello world"
    assert data["words"] == [{"text": "hello", "start_s": 1.0, "end_s": 2.0}]


def test_plain_lines_print_finals_only_by_default() -> None:
    out = io.StringIO()
    view = PlainLines(out)
    for event in (_event(P, 0, "hel"), _event(F, 0, "hello"), _event(E, 1, "", None)):
        view.show(event)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "hello" in lines[0] and "call ended" in lines[1]


def _screen(ansi: str) -> list[str]:
    """What a terminal shows after ``ansi``, for the escapes LiveView uses (ESC[nF, ESC[J)."""
    lines: list[str] = [""]
    row = 0
    i = 0
    while i < len(ansi):
        if ansi.startswith("\x1b[", i):
            end = i + 2
            while not ansi[end].isalpha():
                end += 1
            arg, op = ansi[i + 2 : end], ansi[end]
            if op == "F":
                row -= int(arg)
            elif op == "J":
                del lines[row + 1 :]
                lines[row] = ""
            i = end + 1
        elif ansi[i] == "\n":
            row += 1
            if row == len(lines):
                lines.append("")
            i += 1
        else:
            lines[row] += ansi[i]
            i += 1
    return [line for line in lines if line]


def test_live_view_rewrites_partials_in_place_and_keeps_finals() -> None:
    out = io.StringIO()
    view = LiveView(out, colour=False)
    view.show(_event(P, 0, "good"))
    view.show(_event(P, 1, "hi", speaker="speaker_1"))
    view.show(_event(P, 0, "good morning"))
    assert [line.split("]")[1] for line in _screen(out.getvalue())] == [
        " speaker_0:…good morning",
        " speaker_1:…hi",
    ]
    view.show(_event(F, 0, "good morning all"))
    view.show(_event(E, 2, "", None))
    screen = _screen(out.getvalue())
    assert len(screen) == 2
    assert screen[0].endswith("speaker_0: good morning all")
    assert "call ended" in screen[1]


def test_live_view_colours_each_speaker() -> None:
    out = io.StringIO()
    view = LiveView(out, colour=True)
    view.show(_event(F, 0, "a", speaker="speaker_0"))
    view.show(_event(F, 1, "b", speaker="speaker_1"))
    first, second = out.getvalue().splitlines()
    assert first[:5] != second[:5] and first.startswith("\x1b[")


class _SlowJoinConsumer:
    """A consumer that takes ``join_polls`` polls to be assigned partition 0, then returns the
    scripted records and reports the partition's end; ``clock`` advances one second a poll."""

    def __init__(self, clock: list[float], records: list[bytes], join_polls: int) -> None:
        self.clock, self.records, self.join_polls = clock, list(records), join_polls

    def list_topics(self, timeout: float):
        return types.SimpleNamespace(topics={"t": None})

    def subscribe(self, topics, on_assign, on_revoke) -> None:
        self.on_assign = on_assign

    def poll(self, timeout: float):
        self.clock[0] += 1.0
        self.join_polls -= 1
        if self.join_polls > 0:
            return None
        if self.join_polls == 0:
            self.on_assign(self, [types.SimpleNamespace(partition=0)])
        if self.records:
            return _Msg(None, self.records.pop(0))
        return _Msg(KafkaError(KafkaError._PARTITION_EOF), None)

    def close(self) -> None:
        pass


class _Msg:
    def __init__(self, error, value) -> None:
        self._error, self._value = error, value

    def error(self):
        return self._error

    def value(self):
        return self._value

    def key(self):
        return b"call-b"

    def partition(self):
        return 0


def test_idle_time_counts_only_once_the_reader_has_caught_up(monkeypatch) -> None:
    """A join slower than the idle timeout (a loaded machine) is not a quiet topic."""
    clock = [0.0]
    monkeypatch.setattr(tail.time, "monotonic", lambda: clock[0])
    event = TranscriptEvent(
        "e", "call-b", EventKind.FINAL, 0, 0, "speaker_0", 0.0, 1.0, 0, 0, "hi", (), 0, 0, "d", "a"
    )
    record = RecordCodec(TranscriptEvent).encode(event)
    fake = _SlowJoinConsumer(clock, [record], join_polls=30)
    monkeypatch.setattr(tail, "Consumer", lambda _config: fake)
    got = list(tail.follow("b:9092", "t", stream_id="call-b", idle_timeout_sec=2.0))
    assert got == [event]
    assert clock[0] < 30 + 2 + 3  # and it did stop once quiet for 2 s after catching up
