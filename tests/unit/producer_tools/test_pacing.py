"""run_paced: chunks sent in due order at the chosen speed, on an injected clock."""

from __future__ import annotations

import io

import numpy as np
import pytest

from producer_tools import AudioChunkProducer
from producer_tools.pacing import PacedCall, run_paced


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


@pytest.fixture
def recorded(monkeypatch):
    producer = AudioChunkProducer("127.0.0.1:1", "audio", chunk_ms=100)
    log: list[tuple[float, str, int, bool]] = []
    clock = FakeClock()
    monkeypatch.setattr(
        producer,
        "queue",
        lambda c: log.append((clock.now, c.stream_id, c.sequence, c.end_of_stream)),
    )
    monkeypatch.setattr(producer, "flush", lambda: None)
    return producer, log, clock


def _call(producer, sid: str, seconds: float, start_s: float = 0.0) -> PacedCall:
    stream = producer.open_stream(sid, sample_rate=8000, start_time_ms=0)
    return PacedCall(stream, np.zeros((int(8000 * seconds), 1), np.float32), start_s)


@pytest.mark.parametrize("speed", [1.0, 2.0])
def test_chunks_go_out_when_due_and_interleave_by_time(recorded, speed) -> None:
    producer, log, clock = recorded
    calls = [_call(producer, "a", 0.3), _call(producer, "b", 0.25, start_s=0.15)]
    report = run_paced(calls, speed=speed, clock=clock, sleep=clock.sleep, wall=clock)
    times = [round((t - 100.0) * speed, 6) for t, *_ in log]
    # Each chunk goes out when its audio has ended: a live chunk does not exist before that.
    assert [(sid, seq, end) for _, sid, seq, end in log] == [
        ("a", 0, False),
        ("a", 1, False),
        ("b", 0, False),
        ("a", 2, True),
        ("b", 1, False),
        ("b", 2, True),  # the last 50 ms, carrying end_of_stream
    ]
    assert times == [0.1, 0.2, 0.25, 0.3, 0.35, 0.4]
    assert report.chunks == 6 and report.calls == 2 and report.max_concurrent == 2
    assert report.audio_s == pytest.approx(0.55)
    assert report.wall_s == pytest.approx(0.4 / speed)


@pytest.mark.parametrize("speed", [1.0, 2.0, 0.5, 0.0])
def test_capture_time_is_send_time_minus_the_chunks_audio(monkeypatch, speed) -> None:
    """Staggered calls, any speed: each chunk is stamped as live audio that has just ended."""
    producer = AudioChunkProducer("127.0.0.1:1", "audio", chunk_ms=100)
    clock = FakeClock()
    clock.now = 1_700_000_000.0  # the wall clock too: epoch seconds
    sent: list[tuple[float, object]] = []
    monkeypatch.setattr(producer, "queue", lambda c: sent.append((clock.now, c)))
    monkeypatch.setattr(producer, "flush", lambda: None)
    # Opened long before pacing starts, as `load` opens every call up front.
    calls = [
        _call(producer, f"call-{i}", seconds, start_s=i * 0.5)
        for i, seconds in enumerate([0.35, 0.3, 0.25])
    ]
    clock.now += 60.0
    run_paced(calls, speed=speed, clock=clock, sleep=clock.sleep, wall=clock)
    assert len(sent) == 4 + 3 + 3
    for send_s, chunk in sent:
        audio_ms = len(chunk.payload) / 2 / chunk.sample_rate_hz * 1000
        assert chunk.capture_time_ms == pytest.approx(send_s * 1000 - audio_ms, abs=1)
    if speed == 1.0:  # real time: the stamps are also the call's start plus its audio before
        for i in range(3):
            stamps = [c.capture_time_ms for _, c in sent if c.stream_id == f"call-{i}"]
            start_ms = round((1_700_000_060.0 + i * 0.5) * 1000)
            assert stamps == [start_ms + k * 100 for k in range(len(stamps))]


def test_speed_zero_never_sleeps(recorded) -> None:
    producer, log, clock = recorded
    run_paced([_call(producer, "a", 1.0)], speed=0, clock=clock, sleep=clock.sleep, wall=clock)
    assert len(log) == 10 and {t for t, *_ in log} == {100.0}


def test_progress_is_reported_on_long_runs(recorded) -> None:
    producer, _, clock = recorded
    out = io.StringIO()
    run_paced(
        [_call(producer, "a", 3.0)],
        progress=out,
        progress_sec=1.0,
        clock=clock,
        sleep=clock.sleep,
    )
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "of audio sent" in lines[0]  # at 1, 2 and 3 s of audio


def test_negative_speed_is_refused(recorded) -> None:
    producer, _, _ = recorded
    with pytest.raises(ValueError, match="speed"):
        run_paced([_call(producer, "a", 0.1)], speed=-1)
