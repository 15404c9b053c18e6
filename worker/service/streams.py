"""Host-side facts of the streams a worker owns, and the order rules for their chunks.

No tensors here: the engine holds the model state; this holds what Kafka needs (offsets,
sequence numbers, events emitted, the replay window) and the per-stream audio decoder.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum

from worker.audio import AudioDecoder


class Order(StrEnum):
    """Where a chunk stands against its stream's next expected sequence number."""

    NEXT = "next"
    DUPLICATE = "duplicate"
    GAP = "gap"


@dataclass
class OpenStream:
    """One open stream of a partition this worker owns."""

    stream_id: str
    partition: int
    first_offset: int  # offset of the record with sequence 0
    decoder: AudioDecoder | None = None
    next_sequence: int = 0
    capture_start_ms: int = 0
    events_emitted: int = 0  # events produced (committed or in the open transaction)
    suppress: int = 0  # events still to swallow while a replay catches up
    segments: int = 0  # segments opened, from the events seen
    last_chunk_samples: int = 0  # input samples per channel of the last chunk (gap filling)
    seconds_in: float = 0.0  # audio accepted, in seconds
    last_seen: float = 0.0  # clock time of the last chunk
    dirty: bool = True  # progress needs writing in the next checkpoint
    ending: bool = False  # end_stream was called; waiting for the engine's last update

    def order(self, sequence: int) -> Order:
        if sequence < self.next_sequence:
            return Order.DUPLICATE
        if sequence > self.next_sequence:
            return Order.GAP
        return Order.NEXT


@dataclass
class PartitionStreams:
    """Open streams of one partition, and where the replay of them ends."""

    partition: int
    streams: dict[str, OpenStream] = field(default_factory=dict)
    replay_end: int = -1  # records below this offset were processed before: rebuild only
    recovering: set[str] = field(default_factory=set)  # streams still swallowing old events
    recovery_started: float = 0.0


class EndedStreams:
    """A bounded memory of streams that are over, and why, to reject chunks arriving after."""

    def __init__(self, capacity: int) -> None:
        self._ids: OrderedDict[str, str] = OrderedDict()
        self._capacity = capacity

    def add(self, stream_id: str, reason: str) -> None:
        self._ids[stream_id] = reason
        self._ids.move_to_end(stream_id)
        while len(self._ids) > self._capacity:
            self._ids.popitem(last=False)

    def reason(self, stream_id: str) -> str | None:
        return self._ids.get(stream_id)
