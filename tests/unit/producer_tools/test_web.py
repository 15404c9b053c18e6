"""The web gateway's pure parts: settings, admission verdicts, the ``web`` flags."""

from __future__ import annotations

import asyncio
import inspect
import json
import uuid
from dataclasses import replace

import pytest
from starlette.websockets import WebSocketState

from producer_tools.__main__ import build_parser
from producer_tools.producer import ProducerError
from producer_tools.web import admission
from producer_tools.web.admission import (
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TRY_LATER,
    AudioPace,
    SessionSlots,
    check_audio,
    check_origin,
    close_reason,
    own_origins,
    parse_control,
)
from producer_tools.web.cli import settings_from
from producer_tools.web.relay import RelayItem
from producer_tools.web.session import BrowserCall, serve_session
from producer_tools.web.settings import GatewaySettings, SettingsError
from schemas import EventKind, TranscriptEvent

SETTINGS = GatewaySettings(allowed_origins=("https://demo.example",))


@pytest.mark.parametrize(
    ("origin", "bind", "allowed"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1", True),  # the gateway's own page
        ("http://localhost:8000", "127.0.0.1", True),  # the same page by another loopback name
        ("http://[::1]:8000", "localhost", True),
        ("http://localhost:8000", "0.0.0.0", True),  # a wildcard bind is reached on loopback
        ("http://gw.example:8000", "gw.example", True),  # bound to a name: that name
        ("https://demo.example", "127.0.0.1", True),  # allowed by name
        ("http://gw.example:8000", "127.0.0.1", False),  # DNS rebinding: the name is not ours
        ("https://127.0.0.1:8000", "127.0.0.1", False),  # scheme differs (a proxy: allow it)
        ("http://127.0.0.1:8001", "127.0.0.1", False),  # port differs
        ("https://evil.example", "127.0.0.1", False),
        ("null", "127.0.0.1", False),  # a sandboxed or file:// page
    ],
)
def test_origin_check(origin, bind, allowed) -> None:
    refusal = check_origin(origin, 8000, replace(SETTINGS, host=bind))
    assert (refusal is None) == allowed
    if refusal is not None:
        assert refusal.code == "origin_not_allowed" and refusal.close_code == CLOSE_POLICY
        assert f"--allow-origin {origin}" in refusal.message


def test_origin_check_ignores_the_host_header() -> None:
    """A rebinding page sends Host and Origin that agree; only the bind address counts."""
    assert "host" not in inspect.signature(check_origin).parameters
    assert own_origins(SETTINGS, 8000) == {
        "http://127.0.0.1:8000",
        "http://localhost:8000",
        "http://[::1]:8000",
    }


def test_a_missing_origin_is_refused_unless_allowed() -> None:
    refusal = check_origin(None, 8000, SETTINGS)
    assert refusal.code == "origin_missing" and refusal.close_code == CLOSE_POLICY
    assert "--allow-no-origin" in refusal.message
    assert check_origin(None, 8000, replace(SETTINGS, allow_no_origin=True)) is None


def test_session_slots_refuse_over_the_limit_and_free_on_release() -> None:
    slots = SessionSlots(2)
    assert slots.acquire() is None and slots.acquire() is None
    refusal = slots.acquire()
    assert refusal is not None and refusal.close_code == CLOSE_TRY_LATER
    assert "all 2 session(s) are in use" in refusal.message
    assert slots.in_use == 2
    slots.release()
    assert slots.acquire() is None
    slots.release()
    slots.release()
    with pytest.raises(RuntimeError):
        slots.release()


def test_audio_messages_must_be_whole_samples_within_the_limit() -> None:
    settings = GatewaySettings(max_message_bytes=6400)
    assert check_audio(6400, settings) is None
    assert check_audio(2, settings) is None
    too_big = check_audio(6402, settings)
    assert too_big.code == "message_too_large" and too_big.close_code == CLOSE_TOO_BIG
    assert "6402 bytes is over the limit of 6400 bytes" in too_big.message
    assert check_audio(0, settings).code == "bad_message"
    assert check_audio(3, settings).code == "bad_message"


def test_control_messages() -> None:
    assert parse_control(json.dumps({"type": "stop"}), SETTINGS) == ("stop", None)
    for text in ("stop", "{}", "[]", '{"type": "pause"}'):
        command, refusal = parse_control(text, SETTINGS)
        assert command is None and refusal.code == "bad_message", text
    command, refusal = parse_control(" " * (SETTINGS.max_message_bytes + 1), SETTINGS)
    assert refusal.code == "message_too_large"


@pytest.mark.parametrize("depth", [60_000, 250])  # 60 000: under max_message_bytes
def test_deeply_nested_control_messages_are_bad_messages(depth) -> None:
    command, refusal = parse_control("[" * depth, SETTINGS)
    assert command is None and refusal.code == "bad_message"


def test_a_nesting_too_deep_for_the_parser_is_a_bad_message(monkeypatch) -> None:
    monkeypatch.setattr(admission, "MAX_CONTROL_BYTES", 100_000)  # past the size cap
    command, refusal = parse_control("[" * 60_000, SETTINGS)
    assert command is None and refusal.code == "bad_message"


def test_audio_may_not_run_ahead_of_real_time() -> None:
    settings = GatewaySettings(max_audio_ahead_sec=1.0)
    pace = AudioPace(settings, started_sec=100.0)
    second = 32_000  # bytes of 16 kHz 16-bit mono audio
    assert pace.admit(second, now_sec=100.0) is None  # 1 s ahead: the slack
    refusal = pace.admit(6_400, now_sec=100.1)  # 1.2 s of audio after 0.1 s
    assert refusal.code == "audio_too_fast" and refusal.close_code == CLOSE_POLICY
    assert "1.2 s of audio in 0.1 s" in refusal.message and "1 s ahead" in refusal.message
    assert pace.seconds_taken == 1.0  # a refused message is not counted
    assert pace.admit(6_400, now_sec=100.2) is None  # real time caught up
    assert pace.admit(second * 60, now_sec=100.3) is not None


def test_only_the_last_audio_message_may_be_shorter_than_the_minimum_frame() -> None:
    settings = GatewaySettings(min_frame_ms=10)  # 320 bytes
    pace = AudioPace(settings, started_sec=0.0)
    assert pace.admit(320, now_sec=0.0) is None
    assert pace.admit(2, now_sec=0.0) is None  # may be the last one (the flush at stop)
    refusal = pace.admit(320, now_sec=0.0)
    assert refusal.code == "frame_too_short" and "2 bytes was not the last one" in refusal.message


def test_the_session_producer_queue_is_bounded() -> None:
    config = GatewaySettings().producer_config
    assert 0 < config["queue.buffering.max.kbytes"] <= 16_384
    assert 0 < config["queue.buffering.max.messages"] <= 10_000


def test_close_reasons_fit_a_close_frame() -> None:
    reason = close_reason("é" * 200)
    assert len(reason.encode()) <= 123 and reason == "é" * 61


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"max_sessions": 0}, "max_sessions"),
        ({"max_session_sec": 0}, "max_session_sec"),
        ({"max_message_bytes": 6399}, "max_message_bytes"),  # less than one 200 ms chunk
        ({"chunk_ms": 5}, "chunk_ms"),
        ({"allowed_origins": ("demo.example",)}, "allowed origins"),
        ({"stream_prefix": ""}, "stream_prefix"),
        ({"event_queue": 0}, "event_queue"),
        ({"port": 70_000}, "port"),
        ({"max_audio_ahead_sec": -1}, "max_audio_ahead_sec"),
        ({"min_frame_ms": 0}, "min_frame_ms"),
        ({"min_frame_ms": 201}, "min_frame_ms"),
        ({"send_timeout_sec": 0}, "send_timeout_sec"),
    ],
)
def test_settings_out_of_range_name_the_setting(overrides, named) -> None:
    with pytest.raises(SettingsError, match=named):
        GatewaySettings(**overrides)


def test_every_web_flag_has_help_and_reaches_the_settings() -> None:
    parser = build_parser()
    web = parser._subparsers._group_actions[0].choices["web"]
    for action in web._actions:
        assert action.help, f"{action.option_strings} has no help text"
    args = parser.parse_args(
        [
            "web",
            "--topic",
            "a",
            "--transcript-topic",
            "t",
            "--max-sessions",
            "3",
            "--max-session-sec",
            "30",
            "--max-message-bytes",
            "8000",
            "--allow-origin",
            "https://x.example",
            "--port",
            "0",
            "--allow-no-origin",
            "--max-audio-ahead-sec",
            "2.5",
            "--min-frame-ms",
            "20",
            "--send-timeout-sec",
            "3",
        ]
    )
    settings = settings_from(args)
    assert (settings.audio_topic, settings.transcript_topic) == ("a", "t")
    assert (settings.max_sessions, settings.max_session_sec) == (3, 30.0)
    assert settings.max_message_bytes == 8000 and settings.port == 0
    assert settings.allowed_origins == ("https://x.example",)
    assert settings.allow_no_origin is True
    assert (settings.max_audio_ahead_sec, settings.min_frame_ms) == (2.5, 20)
    assert settings.send_timeout_sec == 3.0
    defaults = settings_from(parser.parse_args(["web"]))
    assert defaults.allow_no_origin is False and defaults.max_audio_ahead_sec == 5.0


# -- a page that stops reading --------------------------------------------------------------


class StalledPage:
    """A websocket whose client stopped reading: no send (nor close) ever completes."""

    client_state = WebSocketState.CONNECTED

    def __init__(self) -> None:
        self.headers = {"origin": "http://127.0.0.1:8000"}
        self.query_params: dict[str, str] = {}
        self.scope = {"server": ("127.0.0.1", 8000)}
        self.sends = 0

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict:
        await asyncio.Event().wait()  # says nothing either
        raise AssertionError("unreachable")

    async def send_json(self, _message: dict) -> None:
        self.sends += 1
        await asyncio.Event().wait()

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        await asyncio.Event().wait()


class FakeStream:
    sequence = 0

    def __init__(self) -> None:
        self.ended = False
        self.ends = 0

    def end(self) -> None:
        self.ends += 1
        self.ended = True


class FakeRelay:
    def __init__(self) -> None:
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def join(self, _timeout_sec: float) -> bool:
        return self.stopped


def test_a_page_that_stops_reading_is_disconnected_and_its_session_torn_down(monkeypatch) -> None:
    """The first event's send never completes: within ``send_timeout_sec`` the session gives
    up, sends end-of-stream, stops the relay and frees its slot — it does not hang."""
    settings = GatewaySettings(send_timeout_sec=0.05)
    slots = SessionSlots(1)
    page = StalledPage()
    made: list[BrowserCall] = []
    event = TranscriptEvent(
        event_id=uuid.uuid4().hex,
        stream_id="web-x",
        kind=EventKind.FINAL,
        segment_index=0,
        revision=0,
        speaker="speaker_0",
        start_s=0.0,
        end_s=1.0,
        start_time_ms=0,
        end_time_ms=1000,
        text="hello",
        words=(),
        first_sequence=0,
        last_sequence=4,
        diarizer_model="d",
        asr_model="a",
    )

    async def open_without_kafka(self: BrowserCall) -> bool:
        self.stream, self.relay = FakeStream(), FakeRelay()
        await self.queue.put(RelayItem("event", event))
        made.append(self)
        return True

    monkeypatch.setattr(BrowserCall, "_open", open_without_kafka)

    async def session() -> None:
        await asyncio.wait_for(serve_session(page, settings, slots), timeout=60)

    asyncio.run(session())
    (call,) = made
    assert page.sends == 1 and call.page_stalled and call.outcome == "page stopped reading"
    assert call.stream.ends == 1 and call.relay.stopped and slots.in_use == 0


class FailingEndStream(FakeStream):
    """A stream whose end-of-stream hits a delivery error (the record may be queued already)."""

    def end(self) -> None:
        self.ends += 1
        raise ProducerError("1 record(s) failed to publish: broker down")


def test_end_of_stream_is_not_sent_twice_after_a_delivery_error() -> None:
    async def session() -> BrowserCall:
        call = BrowserCall(StalledPage(), GatewaySettings(send_timeout_sec=0.05), "file", None)
        call.stream = FailingEndStream()
        refusal = call._end_stream()
        assert refusal.code == "kafka_unavailable" and "broker down" in refusal.message
        await call._teardown()  # must not send a second end with the same sequence
        return call

    call = asyncio.run(session())
    assert call.stream.ends == 1


class VanishingPage(StalledPage):
    """A page that is gone before its session is accepted."""

    async def accept(self) -> None:
        raise OSError("connection reset")


def test_the_session_slot_is_released_when_accepting_fails() -> None:
    slots = SessionSlots(1)
    with pytest.raises(OSError):
        asyncio.run(serve_session(VanishingPage(), GatewaySettings(), slots))
    assert slots.in_use == 0
