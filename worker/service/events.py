"""Output records built from engine updates and rejected inputs: pure functions of their inputs.

Speakers are labelled by first appearance within the call (``speaker_0`` is the first voice
heard), not by the diarizer's slot, as the schema promises; in ``split`` mode within each
channel, whose events also carry the channel, its role, and a segment index numbered across the
call in the order the merged transcript opens segments. A dead letter keeps the original
record unless it is larger than the configured cap; then it keeps the first bytes and says how
large the original was and its SHA-256, so a dead letter can always be produced.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from schemas import DeadLetter, EventKind, TranscriptEvent, Word, make_event_id
from worker.engine.results import SequenceSpan
from worker.engine.transcript import SegmentUpdate
from worker.service.streams import Lane, OpenStream


@dataclass(frozen=True)
class ModelNames:
    diarizer: str
    asr: str


def speaker_label(lane: Lane, slot: str | None) -> str | None:
    """The lane's label for a diarizer slot: numbered in order of first appearance."""
    if slot is None:
        return None
    label = lane.speakers.get(slot)
    if label is None:
        label = lane.speakers[slot] = f"speaker_{len(lane.speakers)}"
    return label


def call_segment(stream: OpenStream, lane: Lane, index: int) -> int:
    """The call's index of a lane's segment: the lane's own when it is the call's only one."""
    if len(stream.lanes) == 1:
        return index
    found = lane.segments.get(index)
    if found is None:
        found = lane.segments[index] = sum(len(other.segments) for other in stream.lanes)
    return found


def segment_event(
    stream: OpenStream,
    lane: Lane,
    segment: SegmentUpdate,
    span: SequenceSpan,
    models: ModelNames,
) -> TranscriptEvent:
    """A PARTIAL or FINAL revision of one segment."""
    index = call_segment(stream, lane, segment.segment_index)
    return TranscriptEvent(
        event_id=make_event_id(stream.stream_id, index, segment.revision, call=stream.first_offset),
        stream_id=stream.stream_id,
        kind=EventKind.FINAL if segment.final else EventKind.PARTIAL,
        segment_index=index,
        revision=segment.revision,
        speaker=speaker_label(lane, segment.speaker),
        start_s=segment.start_s,
        end_s=segment.end_s,
        start_time_ms=stream.capture_start_ms + round(segment.start_s * 1000),
        end_time_ms=stream.capture_start_ms + round(segment.end_s * 1000),
        text=segment.text,
        words=tuple(Word(w.text, w.start_s, w.end_s) for w in segment.words),
        first_sequence=span.first,
        last_sequence=span.last,
        diarizer_model=models.diarizer,
        asr_model=models.asr,
        channel=lane.channel,
        role=lane.role,
    )


def end_event(stream: OpenStream, models: ModelNames) -> TranscriptEvent:
    """The call's STREAM_END, after its last FINAL."""
    duration = stream.seconds_in
    return TranscriptEvent(
        event_id=make_event_id(stream.stream_id, stream.segments, 0, call=stream.first_offset),
        stream_id=stream.stream_id,
        kind=EventKind.STREAM_END,
        segment_index=stream.segments,
        revision=0,
        speaker=None,
        start_s=0.0,
        end_s=duration,
        start_time_ms=stream.capture_start_ms,
        end_time_ms=stream.capture_start_ms + round(duration * 1000),
        text="",
        words=(),
        first_sequence=0,
        last_sequence=max(0, stream.next_sequence - 1),
        diarizer_model=models.diarizer,
        asr_model=models.asr,
    )


@dataclass(frozen=True)
class Source:
    """Where a rejected record came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def dead_letter(
    source: Source,
    reason: str,
    text: str,
    worker_id: str,
    failed_time_ms: int,
    max_original_bytes: int,
) -> DeadLetter:
    """A dead letter for ``source``, its original value cut to ``max_original_bytes``."""
    value = source.value
    if value is not None and len(value) > max_original_bytes:
        digest = hashlib.sha256(value).hexdigest()
        text = (
            f"{text} [original value truncated to {max_original_bytes} of {len(value)} bytes; "
            f"sha256 {digest}]"
        )
        value = value[:max_original_bytes]
    key = source.key
    if key is not None and len(key) > max_original_bytes:
        key = key[:max_original_bytes]
    stream_id = key.decode("utf-8", errors="replace") if key else None
    return DeadLetter(
        reason=reason,
        message=text,
        source_topic=source.topic,
        source_partition=source.partition,
        source_offset=source.offset,
        failed_time_ms=failed_time_ms,
        stream_id=stream_id,
        original_key=key,
        original_value=value,
        worker_id=worker_id,
    )
