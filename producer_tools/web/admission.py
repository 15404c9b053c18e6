"""Pure verdicts on what a page may do: open a session, send a message.

Each refusal is a ``Refusal``: a code the page can show a tailored hint for, a sentence for the
person in front of it, and the websocket close code. No I/O here, so every rule is unit-tested.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from producer_tools.web.settings import PCM_BYTES_PER_SAMPLE, GatewaySettings

# RFC 6455 close codes.
CLOSE_NORMAL: Final = 1000
CLOSE_POLICY: Final = 1008  # origin not allowed, session too long
CLOSE_UNSUPPORTED: Final = 1003  # a message the protocol does not have
CLOSE_TOO_BIG: Final = 1009
CLOSE_SERVER_ERROR: Final = 1011
CLOSE_TRY_LATER: Final = 1013


@dataclass(frozen=True)
class Refusal:
    """Why the gateway said no: ``code`` for machines, ``message`` for people."""

    code: str
    message: str
    close_code: int

    def to_json(self) -> dict[str, str]:
        return {"type": "error", "code": self.code, "message": self.message}


def check_origin(origin: str | None, host: str | None, scheme: str, settings: GatewaySettings):
    """None if a page from ``origin`` may open a session, else the refusal.

    The gateway's own origin (``scheme://Host``) and ``allowed_origins`` pass. A client that
    sends no Origin is not a browser page (browsers always send one on a websocket), so it cannot
    be a cross-site hijack and passes too.
    """
    if origin is None:
        return None
    own = f"{'https' if scheme in ('https', 'wss') else 'http'}://{host}" if host else None
    if origin == own or origin in settings.allowed_origins:
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
    try:
        message = json.loads(text)
    except ValueError:
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
