"""Pure verdicts on what a page may do: open a session, send a message.

Each refusal is a ``Refusal``: a code the page can show a tailored hint for, a sentence for the
person in front of it, and the websocket close code. No I/O here, so every rule is unit-tested.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Final

from producer_tools.web.settings import PCM_BYTES_PER_SAMPLE, SAMPLE_RATE_HZ, GatewaySettings

# RFC 6455 close codes.
CLOSE_NORMAL: Final = 1000
CLOSE_POLICY: Final = 1008  # origin not allowed, session too long
CLOSE_UNSUPPORTED: Final = 1003  # a message the protocol does not have
CLOSE_TOO_BIG: Final = 1009
CLOSE_SERVER_ERROR: Final = 1011
CLOSE_TRY_LATER: Final = 1013
# The one control message is {"type": "stop"}; this leaves room for whitespace, not for nesting.
MAX_CONTROL_BYTES: Final = 256


@dataclass(frozen=True)
class Refusal:
    """Why the gateway said no: ``code`` for machines, ``message`` for people."""

    code: str
    message: str
    close_code: int

    def to_json(self) -> dict[str, str]:
        return {"type": "error", "code": self.code, "message": self.message}


def own_origins(settings: GatewaySettings, port: int) -> frozenset[str]:
    """The origins of the gateway's own page, from the address it listens on.

    Never from the request's Host header: a DNS-rebinding page (evil.example resolving to
    127.0.0.1) sends a Host and an Origin that agree. A loopback or wildcard bind is reached as
    ``127.0.0.1``, ``localhost`` or ``[::1]``; any other origin (a TLS proxy, a LAN address)
    must be named with ``--allow-origin``.
    """
    host = settings.host.strip("[]")
    if host in ("", "localhost", "0.0.0.0", "::") or _is_loopback(host):
        names = ["127.0.0.1", "localhost", "[::1]"]
    else:
        names = [f"[{host}]" if ":" in host else host]
    origins = {f"http://{name}:{port}" for name in names}
    if port == 80:  # browsers leave the default port out of an Origin
        origins |= {f"http://{name}" for name in names}
    return frozenset(origins)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_origin(origin: str | None, port: int, settings: GatewaySettings) -> Refusal | None:
    """None if a page from ``origin`` may open a session on the gateway listening on ``port``.

    Its own origins (``own_origins``) and ``allowed_origins`` pass. A client that sends no
    Origin is refused unless ``allow_no_origin``: browsers always send one, but so may a
    non-browser client be anything at all.
    """
    if origin is None:
        if settings.allow_no_origin:
            return None
        return Refusal(
            "origin_missing",
            "the request has no Origin header; open the gateway's page in a browser, or start "
            "it with --allow-no-origin to admit other clients",
            CLOSE_POLICY,
        )
    if origin in own_origins(settings, port) or origin in settings.allowed_origins:
        return None
    return Refusal(
        "origin_not_allowed",
        f"pages from {origin} may not use this gateway; open it at its own address, or start "
        "it with --allow-origin " + origin,
        CLOSE_POLICY,
    )


class SessionSlots:
    """At most ``limit`` sessions at once. Used from the event loop thread only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    def acquire(self) -> Refusal | None:
        if self.in_use >= self.limit:
            return Refusal(
                "too_many_sessions",
                f"the gateway is busy: all {self.limit} session(s) are in use; try again when "
                "one ends",
                CLOSE_TRY_LATER,
            )
        self.in_use += 1
        return None

    def release(self) -> None:
        if self.in_use <= 0:
            raise RuntimeError("released a session slot that was not held")
        self.in_use -= 1


def check_audio(size: int, settings: GatewaySettings) -> Refusal | None:
    """None if a binary message of ``size`` bytes is a chunk the gateway takes."""
    if size > settings.max_message_bytes:
        return too_large(size, settings)
    if size == 0 or size % PCM_BYTES_PER_SAMPLE:
        return Refusal(
            "bad_message",
            f"an audio message must be whole 16-bit samples, got {size} bytes",
            CLOSE_UNSUPPORTED,
        )
    return None


def too_large(size: int, settings: GatewaySettings) -> Refusal:
    return Refusal(
        "message_too_large",
        f"a message of {size} bytes is over the limit of {settings.max_message_bytes} bytes "
        f"(the page sends {settings.chunk_bytes}-byte chunks)",
        CLOSE_TOO_BIG,
    )


def parse_control(text: str, settings: GatewaySettings) -> tuple[str | None, Refusal | None]:
    """The command of a text message (``stop``), or the refusal."""
    size = len(text.encode())
    if size > settings.max_message_bytes:
        return None, too_large(size, settings)
    message = None
    if size <= MAX_CONTROL_BYTES:
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):  # deep nesting fits in few bytes
            message = None
    kind = message.get("type") if isinstance(message, dict) else None
    if kind != "stop":
        return None, Refusal(
            "bad_message",
            f"unknown message {text[:80]!r}: send audio as binary messages and "
            '{"type": "stop"} to end the call',
            CLOSE_UNSUPPORTED,
        )
    return kind, None


class AudioPace:
    """The audio one session has taken, held to real time. Pure: the caller passes the clock.

    Audio may run ``max_audio_ahead_sec`` ahead of the time since ``started_sec`` (a page sends
    what it captured; a file is played at real-time pace), so no client publishes hours of audio
    in minutes. A message shorter than ``min_frame_ms`` may only be the last one (the page's
    flush at stop), so no client floods Kafka with tiny records.
    """

    def __init__(self, settings: GatewaySettings, started_sec: float) -> None:
        self.settings = settings
        self.started_sec = started_sec
        self.bytes_taken = 0
        self._short_frame_bytes: int | None = None  # a short message taken: it must be last

    @property
    def seconds_taken(self) -> float:
        return self.bytes_taken / (PCM_BYTES_PER_SAMPLE * SAMPLE_RATE_HZ)

    def admit(self, size: int, now_sec: float) -> Refusal | None:
        """None if a ``size``-byte audio message may be published now (and count it)."""
        settings = self.settings
        if self._short_frame_bytes is not None:
            return Refusal(
                "frame_too_short",
                f"an audio message of {self._short_frame_bytes} bytes was not the last one: "
                f"only a call's last message may hold less than {settings.min_frame_ms} ms "
                f"({settings.min_frame_bytes} bytes)",
                CLOSE_POLICY,
            )
        audio_sec = (self.bytes_taken + size) / (PCM_BYTES_PER_SAMPLE * SAMPLE_RATE_HZ)
        elapsed_sec = max(0.0, now_sec - self.started_sec)
        if audio_sec > elapsed_sec + settings.max_audio_ahead_sec:
            return Refusal(
                "audio_too_fast",
                f"the page sent {audio_sec:.1f} s of audio in {elapsed_sec:.1f} s: audio may "
                f"run at most {settings.max_audio_ahead_sec:g} s ahead of real time",
                CLOSE_POLICY,
            )
        self.bytes_taken += size
        if size < settings.min_frame_bytes:
            self._short_frame_bytes = size
        return None


def close_reason(message: str) -> str:
    """``message`` cut to the 123 bytes a close frame's reason may hold (UTF-8, whole chars)."""
    return message.encode()[:123].decode(errors="ignore")


def session_too_long(settings: GatewaySettings) -> Refusal:
    return Refusal(
        "session_too_long",
        f"the call reached the gateway's limit of {settings.max_session_sec:g} s and was ended; "
        "start again to continue",
        CLOSE_POLICY,
    )
