"""What the engine hands out per stream (no heavy imports: the Kafka loop reads these)."""

from __future__ import annotations

from dataclasses import dataclass

from worker.engine.transcript import SegmentUpdate


class StreamError(Exception):
    """A stream's own data or state failed; the stream is dropped, the batch goes on."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class SequenceSpan:
    """Input sequence numbers whose audio a segment covers."""

    first: int
    last: int


@dataclass(frozen=True)
class StreamUpdate:
    """What one step produced for one stream."""

    stream_id: str
    segments: tuple[tuple[SegmentUpdate, SequenceSpan], ...] = ()
    ended: bool = False  # the stream is finished: its last segments are in this update
    error: StreamError | None = None  # the stream failed and was dropped
    audio_sec: float = 0.0  # audio this step consumed for the stream
