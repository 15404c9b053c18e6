"""The web gateway's pure parts: settings, admission verdicts, the ``web`` flags."""

from __future__ import annotations

import json

import pytest

from producer_tools.__main__ import build_parser
from producer_tools.web.admission import (
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TRY_LATER,
    SessionSlots,
    check_audio,
    check_origin,
    close_reason,
    parse_control,
)
from producer_tools.web.cli import settings_from
from producer_tools.web.settings import GatewaySettings, SettingsError

SETTINGS = GatewaySettings(allowed_origins=("https://demo.example",))


@pytest.mark.parametrize(
    ("origin", "host", "scheme", "allowed"),
    [
        (None, "127.0.0.1:8000", "ws", True),  # not a browser
        ("http://127.0.0.1:8000", "127.0.0.1:8000", "ws", True),  # the gateway's own page
        ("https://gw.example", "gw.example", "wss", True),  # its own page behind TLS
        ("https://demo.example", "127.0.0.1:8000", "ws", True),  # allowed by name
        ("http://gw.example", "gw.example", "wss", False),  # scheme differs
        ("http://127.0.0.1:8001", "127.0.0.1:8000", "ws", False),  # port differs
        ("https://evil.example", "127.0.0.1:8000", "ws", False),
        ("null", "127.0.0.1:8000", "ws", False),  # a sandboxed or file:// page
    ],
)
def test_origin_check(origin, host, scheme, allowed) -> None:
    refusal = check_origin(origin, host, scheme, SETTINGS)
    assert (refusal is None) == allowed
    if refusal is not None:
        assert refusal.code == "origin_not_allowed" and refusal.close_code == CLOSE_POLICY
        assert f"--allow-origin {origin}" in refusal.message


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
        ]
    )
    settings = settings_from(args)
    assert (settings.audio_topic, settings.transcript_topic) == ("a", "t")
    assert (settings.max_sessions, settings.max_session_sec) == (3, 30.0)
    assert settings.max_message_bytes == 8000 and settings.port == 0
    assert settings.allowed_origins == ("https://x.example",)
