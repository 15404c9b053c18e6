"""The gateway's one configuration object: where Kafka is, and every limit a session lives under.

Built once (from the command line, or by a test), validated here, passed down; nothing else in
``producer_tools.web`` reads flags or the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from schemas import WireFormat

PCM_BYTES_PER_SAMPLE: Final = 2  # the page sends 16-bit little-endian linear PCM, mono
SAMPLE_RATE_HZ: Final = 16_000  # what the page's AudioContext captures at
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8000
DEFAULT_CHUNK_MS: Final = 200
DEFAULT_MAX_SESSIONS: Final = 4
DEFAULT_MAX_SESSION_SEC: Final = 300.0
DEFAULT_MAX_MESSAGE_BYTES: Final = 64_000  # 2 s of 16 kHz PCM: ten times what the page sends
DEFAULT_END_WAIT_SEC: Final = 60.0
DEFAULT_EVENT_QUEUE: Final = 64
DEFAULT_KAFKA_TIMEOUT_SEC: Final = 10.0
DEFAULT_MAX_AUDIO_AHEAD_SEC: Final = 5.0
DEFAULT_MIN_FRAME_MS: Final = 10
DEFAULT_SEND_TIMEOUT_SEC: Final = 10.0
# A session's librdkafka queue: audio is paced to real time, so this is minutes of it, not hours.
PRODUCER_QUEUE_KBYTES: Final = 4_096
PRODUCER_QUEUE_MESSAGES: Final = 2_000
MIN_CHUNK_MS: Final = 20
MAX_CHUNK_MS: Final = 1_000
MAX_PREFIX_LENGTH: Final = 200  # + "-" and 12 hex stay within the worker's 256-character ids


class SettingsError(ValueError):
    """A setting out of its range; the message names the setting."""


@dataclass(frozen=True)
class GatewaySettings:
    """Kafka endpoints and the limits of the web gateway (see ``--help`` of ``web``)."""

    bootstrap_servers: str = "127.0.0.1:9092"
    audio_topic: str = "call-audio"
    transcript_topic: str = "call-transcripts"
    schema_registry_url: str = ""
    wire_format: WireFormat = WireFormat.PLAIN
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    stream_prefix: str = "web"
    chunk_ms: int = DEFAULT_CHUNK_MS
    # -- limits: each one a clear message on the page when hit
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_session_sec: float = DEFAULT_MAX_SESSION_SEC
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    allowed_origins: tuple[str, ...] = field(default=())  # besides the gateway's own origin
    allow_no_origin: bool = False  # admit clients that send no Origin (scripts, not pages)
    max_audio_ahead_sec: float = DEFAULT_MAX_AUDIO_AHEAD_SEC  # audio sent vs. time in session
    min_frame_ms: int = DEFAULT_MIN_FRAME_MS  # shortest audio message, except the last one
    # -- bounds that keep a session from waiting or buffering without end
    end_wait_sec: float = DEFAULT_END_WAIT_SEC  # after end-of-stream, for the call's STREAM_END
    event_queue: int = DEFAULT_EVENT_QUEUE  # events between a session's Kafka reader and its page
    kafka_timeout_sec: float = DEFAULT_KAFKA_TIMEOUT_SEC  # to open, flush or close a session
    send_timeout_sec: float = DEFAULT_SEND_TIMEOUT_SEC  # for one message to a page that stalls

    def __post_init__(self) -> None:
        checks = [
            (self.bootstrap_servers != "", "bootstrap_servers must not be empty"),
            (self.audio_topic != "", "audio_topic must not be empty"),
            (self.transcript_topic != "", "transcript_topic must not be empty"),
            (
                0 < len(self.stream_prefix) <= MAX_PREFIX_LENGTH,
                f"stream_prefix must be 1..{MAX_PREFIX_LENGTH} characters, got "
                f"{self.stream_prefix!r}",
            ),
            (0 <= self.port <= 65_535, f"port must be 0..65535, got {self.port}"),
            (
                MIN_CHUNK_MS <= self.chunk_ms <= MAX_CHUNK_MS,
                f"chunk_ms must be {MIN_CHUNK_MS}..{MAX_CHUNK_MS}, got {self.chunk_ms}",
            ),
            (self.max_sessions >= 1, f"max_sessions must be 1 or more, got {self.max_sessions}"),
            (
                self.max_session_sec > 0,
                f"max_session_sec must be more than 0, got {self.max_session_sec}",
            ),
            (
                self.max_message_bytes >= self.chunk_bytes,
                f"max_message_bytes ({self.max_message_bytes}) must hold one chunk "
                f"({self.chunk_bytes} bytes at chunk_ms={self.chunk_ms})",
            ),
            (self.end_wait_sec >= 0, f"end_wait_sec must be 0 or more, got {self.end_wait_sec}"),
            (self.event_queue >= 1, f"event_queue must be 1 or more, got {self.event_queue}"),
            (
                self.kafka_timeout_sec > 0,
                f"kafka_timeout_sec must be more than 0, got {self.kafka_timeout_sec}",
            ),
            (
                self.max_audio_ahead_sec >= 0,
                f"max_audio_ahead_sec must be 0 or more, got {self.max_audio_ahead_sec}",
            ),
            (
                1 <= self.min_frame_ms <= self.chunk_ms,
                f"min_frame_ms must be 1..chunk_ms ({self.chunk_ms}), got {self.min_frame_ms}",
            ),
            (
                self.send_timeout_sec > 0,
                f"send_timeout_sec must be more than 0, got {self.send_timeout_sec}",
            ),
            (
                all(o.startswith(("http://", "https://")) for o in self.allowed_origins),
                f"allowed origins must be http(s)://host[:port], got {list(self.allowed_origins)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)

    @property
    def chunk_frames(self) -> int:
        return SAMPLE_RATE_HZ * self.chunk_ms // 1000

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_frames * PCM_BYTES_PER_SAMPLE

    @property
    def min_frame_bytes(self) -> int:
        return SAMPLE_RATE_HZ * self.min_frame_ms // 1000 * PCM_BYTES_PER_SAMPLE

    @property
    def producer_config(self) -> dict[str, int]:
        """librdkafka settings of a session's producer: a bounded queue (full: the session ends)."""
        return {
            "queue.buffering.max.kbytes": PRODUCER_QUEUE_KBYTES,
            "queue.buffering.max.messages": PRODUCER_QUEUE_MESSAGES,
        }
