"""The rules for one input record, as pure verdicts: no Kafka, no engine, no clock.

``inspect`` says whether a record is a well-formed chunk; ``place`` says what a well-formed
chunk means for its call (start it, continue it, repeat, gap, or reject). Every decision is a
function of the record and of the call's own earlier records, so a replay of the same records
decides the same way on any worker. The same rule holds everywhere for a stream id: a chunk
with sequence 0 for a stream id with no live call on its partition starts a call; any other
chunk for it is rejected (``stream_not_open``), whether the call ended or never started.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

from schemas import AudioChunk, Codec, CodecError
from worker.audio import BYTES_PER_SAMPLE, AudioFormatError, check_format, parse_encoding
from worker.service.streams import OpenStream


@dataclass(frozen=True)
class Limits:
    """The sizes a record must stay within (from ``WorkerConfig``)."""

    max_stream_id_length: int
    max_payload_bytes: int
    max_chunk_sec: float
    max_gap_fill_sec: float


@dataclass(frozen=True)
class Rejected:
    """The record is dead-lettered with this reason code and message."""

    reason: str
    message: str


# A chunk's capture time must be a date (up to 9999-12-31): events add seconds to it, and an
# absurd one would overflow an Avro long in every event of the call.
MAX_CAPTURE_TIME_MS = 253_402_300_799_999


def inspect(
    key: bytes | None, value: bytes | None, codec: Codec[AudioChunk], limits: Limits
) -> AudioChunk | Rejected:
    """The chunk in a record, or why the record is not one we can take."""
    if not key:
        return Rejected("missing_key", "record has no key; the key must be the stream id")
    try:
        chunk = codec.decode(value)
    except CodecError as exc:
        return Rejected(exc.reason, exc.message)
    stream_id = key.decode("utf-8", errors="replace")
    if chunk.stream_id != stream_id:
        return Rejected("key_mismatch", f"key {stream_id!r} != stream_id {chunk.stream_id!r}")
    if len(chunk.stream_id) > limits.max_stream_id_length:
        return Rejected(
            "stream_id_too_long", f"stream id longer than {limits.max_stream_id_length}"
        )
    if chunk.sequence < 0:
        return Rejected("invalid_sequence", f"sequence {chunk.sequence} is negative")
    if not 0 <= chunk.capture_time_ms <= MAX_CAPTURE_TIME_MS:
        return Rejected(
            "invalid_capture_time",
            f"capture_time_ms {chunk.capture_time_ms} is not a time between 1970 and 9999",
        )
    if len(chunk.payload) > limits.max_payload_bytes:
        return Rejected(
            "payload_too_large",
            f"payload of {len(chunk.payload)} bytes exceeds {limits.max_payload_bytes}",
        )
    try:
        encoding = check_format(chunk.encoding, chunk.sample_rate_hz, chunk.channels)
    except AudioFormatError as exc:
        return Rejected(exc.reason, exc.message)
    frame = chunk.channels * BYTES_PER_SAMPLE[encoding]
    if len(chunk.payload) % frame:
        return Rejected(
            "misaligned_payload",
            f"payload of {len(chunk.payload)} bytes is not a whole number of "
            f"{frame}-byte sample frames",
        )
    seconds = chunk_seconds(chunk)
    if seconds > limits.max_chunk_sec:
        return Rejected(
            "chunk_too_long", f"chunk of {seconds:.1f} s exceeds {limits.max_chunk_sec} s"
        )
    return chunk


def chunk_seconds(chunk: AudioChunk) -> float:
    """Seconds of audio in a well-formed chunk."""
    frame = chunk.channels * BYTES_PER_SAMPLE[parse_encoding(chunk.encoding)]
    return len(chunk.payload) / frame / chunk.sample_rate_hz


class Placement(StrEnum):
    START = "start"  # sequence 0 of a stream id with no live call: a new call
    NEXT = "next"  # the call's next chunk
    GAP = "gap"  # later than the next: the missing chunks are filled per the gap policy
    REPEAT = "repeat"  # a chunk already taken, with the same bytes: dropped, counted


@dataclass(frozen=True)
class Placed:
    placement: Placement
    digest: bytes
    missing: int = 0  # chunks missing before this one (GAP)


def place(chunk: AudioChunk, stream: OpenStream | None, limits: Limits) -> Placed | Rejected:
    """Where a well-formed chunk goes in its call (``stream``: the live call of its id)."""
    digest = hashlib.blake2b(chunk.payload, digest_size=16).digest()
    if stream is None:
        if chunk.sequence == 0:
            return Placed(Placement.START, digest)
        return Rejected(
            "stream_not_open",
            f"no live call {chunk.stream_id!r} on this partition for sequence "
            f"{chunk.sequence}: it ended, or its start (sequence 0) was never seen",
        )
    if stream.decoder is not None:
        try:
            stream.decoder.check_same_format(chunk.encoding, chunk.sample_rate_hz, chunk.channels)
        except AudioFormatError as exc:
            return Rejected(exc.reason, exc.message)
    if chunk.sequence < stream.next_sequence:
        seen = stream.recent.get(chunk.sequence)
        if seen is not None and seen != digest:
            return Rejected(
                "conflicting_duplicate",
                f"sequence {chunk.sequence} came again with different audio",
            )
        return Placed(Placement.REPEAT, digest)
    missing = chunk.sequence - stream.next_sequence
    if missing == 0:
        return Placed(Placement.NEXT, digest)
    fill_sec = missing * stream.last_chunk_samples / chunk.sample_rate_hz
    if fill_sec > limits.max_gap_fill_sec:
        return Rejected(
            "sequence_gap_too_large",
            f"expected sequence {stream.next_sequence}, got {chunk.sequence}: "
            f"{fill_sec:.1f} s missing exceeds max_gap_fill_sec {limits.max_gap_fill_sec}",
        )
    return Placed(Placement.GAP, digest, missing)
