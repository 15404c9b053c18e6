"""The record rules as pure verdicts: every reject has its reason, every placement its cause."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from producer_tools.stream import CallAudio, to_chunks
from schemas import AudioChunk, AudioEncoding, RecordCodec
from worker.audio import AudioDecoder
from worker.service.admission import Limits, Placement, Rejected, inspect, place
from worker.service.streams import Lane, OpenStream

LIMITS = Limits(
    max_stream_id_length=32, max_payload_bytes=64_000, max_chunk_sec=2.0, max_gap_fill_sec=1.0
)
CODEC = RecordCodec(AudioChunk)


def _chunks(n: int = 3) -> list[AudioChunk]:
    audio = np.linspace(-0.5, 0.5, 16000 * n // 5, dtype=np.float32)
    return to_chunks(CallAudio("call", audio), chunk_ms=200)


def _stream_after(chunks: list[AudioChunk]) -> OpenStream:
    """A live call that has taken ``chunks``."""
    stream = OpenStream("call", 0, first_offset=0)
    stream.lanes = [Lane(stream.engine_key, AudioDecoder(AudioEncoding.PCM_S16LE, 16000, 1))]
    for chunk in chunks:
        placed = place(chunk, stream, LIMITS)
        stream.remember(chunk.sequence, placed.digest, 8)
        stream.next_sequence = chunk.sequence + 1
        stream.last_chunk_samples = len(chunk.payload) // 2
    return stream


def _inspect(chunk: AudioChunk, key: bytes | None = b"call") -> AudioChunk | Rejected:
    return inspect(key, CODEC.encode(chunk), CODEC, LIMITS)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"sequence": -1}, "invalid_sequence"),
        ({"capture_time_ms": 2**63 - 1}, "invalid_capture_time"),  # overflowed every event
        ({"capture_time_ms": -1}, "invalid_capture_time"),
        ({"payload": b"\0" * 64_002}, "payload_too_large"),
        ({"payload": b"\0" * 3}, "misaligned_payload"),
        ({"sample_rate_hz": 12_345}, "unsupported_sample_rate"),
        ({"stream_id": "x" * 33}, "stream_id_too_long"),
    ],
)
def test_malformed_chunks_are_rejected_with_their_reason(change: dict, reason: str) -> None:
    chunk = dataclasses.replace(_chunks(1)[0], **change)
    key = chunk.stream_id.encode()
    verdict = _inspect(chunk, key)
    assert isinstance(verdict, Rejected) and verdict.reason == reason, verdict


def test_chunk_longer_than_the_limit_is_rejected() -> None:
    chunk = dataclasses.replace(_chunks(1)[0], payload=b"\0" * 8000 * 3, sample_rate_hz=8000)
    chunk = dataclasses.replace(chunk, encoding=AudioEncoding.PCM_MULAW)  # 3 s in 24 kB
    verdict = _inspect(chunk)
    assert isinstance(verdict, Rejected) and verdict.reason == "chunk_too_long"


def test_key_must_be_the_stream_id() -> None:
    chunk = _chunks(1)[0]
    assert _inspect(chunk, None).reason == "missing_key"
    assert _inspect(chunk, b"other").reason == "key_mismatch"
    assert inspect(b"call", b"\x07junk", CODEC, LIMITS).reason == "undecodable_record"
    assert _inspect(chunk) == chunk


def test_sequence_zero_starts_a_call_and_nothing_else_does() -> None:
    first, second, _ = _chunks()
    assert place(first, None, LIMITS).placement is Placement.START
    verdict = place(second, None, LIMITS)
    assert isinstance(verdict, Rejected) and verdict.reason == "stream_not_open"


def test_repeat_with_same_bytes_is_a_repeat_and_with_other_bytes_a_conflict() -> None:
    chunks = _chunks()
    stream = _stream_after(chunks[:2])
    assert place(chunks[1], stream, LIMITS).placement is Placement.REPEAT
    changed = dataclasses.replace(chunks[1], payload=bytes(len(chunks[1].payload)))
    verdict = place(changed, stream, LIMITS)
    assert isinstance(verdict, Rejected) and verdict.reason == "conflicting_duplicate"


def test_gaps_are_placed_with_their_size_and_capped() -> None:
    chunks = _chunks()
    stream = _stream_after(chunks[:1])
    later = dataclasses.replace(chunks[2], sequence=4)  # sequences 1-3 missing: 0.6 s
    placed = place(later, stream, LIMITS)
    assert placed.placement is Placement.GAP and placed.missing == 3
    absurd = dataclasses.replace(chunks[2], sequence=10**15)
    verdict = place(absurd, stream, LIMITS)
    assert isinstance(verdict, Rejected) and verdict.reason == "sequence_gap_too_large"


def test_a_chunk_in_another_format_is_rejected_before_any_gap_fill() -> None:
    chunks = _chunks()
    stream = _stream_after(chunks[:1])
    changed = dataclasses.replace(chunks[2], sample_rate_hz=8000, sequence=3)
    verdict = place(changed, stream, LIMITS)
    assert isinstance(verdict, Rejected) and verdict.reason == "format_changed"
