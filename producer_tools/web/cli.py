"""``python -m producer_tools web``: the flags, and the command that starts the gateway."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from producer_tools.web.settings import (
    DEFAULT_CHUNK_MS,
    DEFAULT_END_WAIT_SEC,
    DEFAULT_EVENT_QUEUE,
    DEFAULT_HOST,
    DEFAULT_KAFKA_TIMEOUT_SEC,
    DEFAULT_MAX_AUDIO_AHEAD_SEC,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_SESSION_SEC,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_MIN_FRAME_MS,
    DEFAULT_PORT,
    DEFAULT_SEND_TIMEOUT_SEC,
    MAX_CHUNK_MS,
    MIN_CHUNK_MS,
    GatewaySettings,
    SettingsError,
)
from schemas import WireFormat

EXIT_FAILED = 1
EXIT_USAGE = 2


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def add_parser(sub: Any, kafka_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``web`` on ``producer_tools``' sub-commands; ``kafka_flags`` adds the shared
    --bootstrap-servers, --topic (of AudioChunk records), --schema-registry-url, --wire-format."""
    p = sub.add_parser(
        "web",
        help="serve the live demo page: microphone or file → Kafka → live transcript",
        description="Serve a web page that captures the microphone (or streams an audio file "
        "at real-time pace) at 16 kHz, publishes it as AudioChunk records under a new stream id "
        "per session, and shows that call's committed transcript events live, one colour per "
        "speaker. Open the printed URL in a browser. Each limit below is sent to the page as a "
        "clear message when a session hits it.",
    )
    kafka_flags(p)
    p.add_argument(
        "--transcript-topic",
        default="call-transcripts",
        help="topic of the worker's TranscriptEvent records (default: call-transcripts)",
    )
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on; 0.0.0.0 for every interface (default: {DEFAULT_HOST})",
    )
    p.add_argument(
        "--port",
        type=_int,
        default=DEFAULT_PORT,
        help=f"port to listen on, 0 for any free one (default: {DEFAULT_PORT})",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="another origin whose pages may open sessions, e.g. https://demo.example.com "
        "(repeatable; the gateway's own origin, from --host and --port, is always allowed: "
        "for a loopback or 0.0.0.0 bind, http://127.0.0.1, localhost and [::1] on the port)",
    )
    p.add_argument(
        "--allow-no-origin",
        action="store_true",
        help="admit clients that send no Origin header (scripts; browsers always send one); "
        "refused by default",
    )
    p.add_argument(
        "--max-sessions",
        type=_int,
        default=DEFAULT_MAX_SESSIONS,
        metavar="N",
        help=f"sessions (calls) at once; one more is refused (default: {DEFAULT_MAX_SESSIONS})",
    )
    p.add_argument(
        "--max-session-sec",
        type=_number,
        default=DEFAULT_MAX_SESSION_SEC,
        metavar="S",
        help="a session's longest call; at the limit the call is ended "
        f"(default: {DEFAULT_MAX_SESSION_SEC:g})",
    )
    p.add_argument(
        "--max-message-bytes",
        type=_int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        metavar="B",
        help="largest websocket message a page may send; a larger one ends the session "
        f"(default: {DEFAULT_MAX_MESSAGE_BYTES})",
    )
    p.add_argument(
        "--max-audio-ahead-sec",
        type=_number,
        default=DEFAULT_MAX_AUDIO_AHEAD_SEC,
        metavar="S",
        help="how far the audio sent may run ahead of the time since the session opened; "
        f"faster ends the session (default: {DEFAULT_MAX_AUDIO_AHEAD_SEC:g})",
    )
    p.add_argument(
        "--min-frame-ms",
        type=_int,
        default=DEFAULT_MIN_FRAME_MS,
        metavar="MS",
        help="shortest audio message; only a call's last one may be shorter "
        f"(default: {DEFAULT_MIN_FRAME_MS})",
    )
    p.add_argument(
        "--chunk-ms",
        type=_int,
        default=DEFAULT_CHUNK_MS,
        metavar="MS",
        help=f"audio per message and per AudioChunk record, {MIN_CHUNK_MS}..{MAX_CHUNK_MS} ms "
        f"(default: {DEFAULT_CHUNK_MS})",
    )
    p.add_argument(
        "--stream-prefix",
        default="web",
        help="stream ids are PREFIX-<12 random hex> (default: web)",
    )
    p.add_argument(
        "--end-wait-sec",
        type=_number,
        default=DEFAULT_END_WAIT_SEC,
        metavar="S",
        help="after a call's end-of-stream, how long to wait for its STREAM_END before "
        f"closing the session (default: {DEFAULT_END_WAIT_SEC:g})",
    )
    p.add_argument(
        "--event-queue",
        type=_int,
        default=DEFAULT_EVENT_QUEUE,
        metavar="N",
        help="transcript events buffered per session between Kafka and a slow page; when full, "
        f"reading waits (default: {DEFAULT_EVENT_QUEUE})",
    )
    p.add_argument(
        "--kafka-timeout-sec",
        type=_number,
        default=DEFAULT_KAFKA_TIMEOUT_SEC,
        metavar="S",
        help="longest wait for Kafka to open, flush or close a session's clients "
        f"(default: {DEFAULT_KAFKA_TIMEOUT_SEC:g})",
    )
    p.add_argument(
        "--send-timeout-sec",
        type=_number,
        default=DEFAULT_SEND_TIMEOUT_SEC,
        metavar="S",
        help="longest wait for a page to take one message; a page that stops reading for "
        f"longer is disconnected and its call ended (default: {DEFAULT_SEND_TIMEOUT_SEC:g})",
    )
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="session and server log lines on stderr (default: info)",
    )
    p.set_defaults(handler=cmd_web)


def settings_from(args: argparse.Namespace) -> GatewaySettings:
    """The one settings object, from parsed flags (``SettingsError`` if they disagree)."""
    return GatewaySettings(
        bootstrap_servers=args.bootstrap_servers,
        audio_topic=args.topic,
        transcript_topic=args.transcript_topic,
        schema_registry_url=args.schema_registry_url,
        wire_format=WireFormat(args.wire_format),
        host=args.host,
        port=args.port,
        stream_prefix=args.stream_prefix,
        chunk_ms=args.chunk_ms,
        max_sessions=args.max_sessions,
        max_session_sec=args.max_session_sec,
        max_message_bytes=args.max_message_bytes,
        allowed_origins=tuple(args.allow_origin),
        allow_no_origin=args.allow_no_origin,
        max_audio_ahead_sec=args.max_audio_ahead_sec,
        min_frame_ms=args.min_frame_ms,
        send_timeout_sec=args.send_timeout_sec,
        end_wait_sec=args.end_wait_sec,
        event_queue=args.event_queue,
        kafka_timeout_sec=args.kafka_timeout_sec,
    )


def cmd_web(args: argparse.Namespace) -> int:
    """Serve the demo page until interrupted."""
    try:
        settings = settings_from(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from producer_tools.web.app import serve

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )

    def announce(url: str) -> None:
        print(f"serving the live demo on {url}", flush=True)
        print(
            f"  audio → {settings.audio_topic}, transcripts ← {settings.transcript_topic} on "
            f"{settings.bootstrap_servers}; at most {settings.max_sessions} session(s) of "
            f"{settings.max_session_sec:g} s",
            file=sys.stderr,
            flush=True,
        )

    try:
        serve(settings, announce)
    except OSError as exc:
        print(f"error: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0
