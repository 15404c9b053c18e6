"""Host-side facts of the calls a worker owns, per partition.

No tensors here: the engine holds the model state; this holds what Kafka needs (offsets,
sequence numbers, events emitted, the replay window, the event-time clock) and the per-call
audio decoders. A call is identified within its partition by its stream id while it is live;
once it has ended (and is only finishing in the engine) a new call may reuse the id, so the
engine knows each call by ``engine_key``, which includes the offset where the call started.

A call is one engine stream (a ``Lane``), or one per channel in ``split`` mode
(``channels.py``). Its lanes' updates are merged in a fixed turn, one update of each lane in
channel order, whatever steps they came in: each lane's sequence of updates is a function of
its audio, so the merged transcript (and so every event id) is one too, and a replay re-makes
it exactly.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from worker.audio import AudioDecoder
from worker.engine.results import StreamUpdate

NO_END = -1


@dataclass
class Replay:
    """A call being rebuilt after a rebalance or an abort: what its old owner committed."""

    events: int  # events committed before; the replay re-makes and swallows them
    last_event_id: str | None  # the last of them: the replay is caught up once it re-makes it
    made: int = 0  # events re-made so far


@dataclass
class Lane:
    """One engine stream of a call: the call's audio, or one channel of it."""

    engine_key: str
    decoder: AudioDecoder | None  # None: the call ended before its first chunk was taken
    channel: int | None = None  # the input channel it hears; None: all of them, mixed
    role: str | None = None
    speakers: dict[str, str] = field(default_factory=dict)  # diarizer slot -> label
    segments: dict[int, int] = field(default_factory=dict)  # lane segment -> call segment
    pending: deque[StreamUpdate] = field(default_factory=deque)  # not yet merged
    end_pushed: bool = False  # end_stream was called on the engine
    done: bool = False  # its last update has been merged


@dataclass
class OpenStream:
    """One call of a partition this worker owns."""

    stream_id: str
    partition: int
    first_offset: int  # offset of the record with sequence 0
    lanes: list[Lane] = field(default_factory=list)  # made when its first chunk is taken
    turn: int = 0  # the lane whose update is merged next
    next_sequence: int = 0
    capture_start_ms: int = 0
    events_emitted: int = 0  # events produced (committed or in the open transaction)
    last_event_id: str | None = None
    replay: Replay | None = None  # set while re-making committed events
    segments: int = 0  # segments opened, from the events seen
    last_chunk_samples: int = 0  # input samples per channel of the last chunk (gap filling)
    seconds_in: float = 0.0  # audio accepted, in seconds
    last_time_ms: int = 0  # timestamp of the call's last record (event-time idle end)
    recent: OrderedDict[int, bytes] = field(default_factory=OrderedDict)  # sequence -> digest
    end_at: int = NO_END  # the call ended before this offset and is finishing in the engine
    resume_end_at: int = NO_END  # rebuilt call that had ended before this offset: end it there
    dirty: bool = True  # progress needs writing in the next checkpoint

    @property
    def engine_key(self) -> str:
        return f"{self.partition}/{self.first_offset}/{self.stream_id}"

    @property
    def decoder(self) -> AudioDecoder | None:
        """The first lane's decoder: the call's audio format, once known."""
        return self.lanes[0].decoder if self.lanes else None

    @property
    def ending(self) -> bool:
        return self.end_at != NO_END

    def merged(self) -> list[tuple[Lane, StreamUpdate]]:
        """The lanes' pending updates that are next in turn (see the module docstring)."""
        out: list[tuple[Lane, StreamUpdate]] = []
        while not all(lane.done for lane in self.lanes):
            lane = self.lanes[self.turn]
            if not lane.done:
                if not lane.pending:
                    break
                update = lane.pending.popleft()
                lane.done = update.ended
                out.append((lane, update))
            self.turn = (self.turn + 1) % len(self.lanes)
        return out

    def remember(self, sequence: int, digest: bytes, window: int) -> None:
        """Keep the digest of an accepted chunk, to tell a repeat from a conflicting one."""
        self.recent[sequence] = digest
        while len(self.recent) > window:
            self.recent.popitem(last=False)


@dataclass
class PartitionStreams:
    """The calls of one partition, the replay window and the partition's event-time clock."""

    partition: int
    live: dict[str, OpenStream] = field(default_factory=dict)  # live calls by stream id
    finishing: dict[str, OpenStream] = field(default_factory=dict)  # ended calls by engine key
    # Rebuilt calls whose stream id an earlier call still holds (it ends first), by id.
    waiting: dict[str, list[OpenStream]] = field(default_factory=dict)
    replay_end: int = -1  # records below this offset were handled before: rebuild only
    partition_time_ms: int = 0  # largest record timestamp read
    idle_checked_sec: int = 0  # the partition-time second of the last idle check
    resumed_ends: int = 0  # rebuilt calls still to end at their ``resume_end_at``
    recovery_started: float = 0.0
    recovering: int = 0  # calls still re-making committed events
    caught_up_since: float | None = None  # clock time the consumer reached the partition's end
    next_quiet_probe: float = 0.0  # when to ask the broker again whether it is still quiet
    counted_until: int = -1  # records below this were counted in the metrics already

    def streams(self) -> list[OpenStream]:
        """Every call the partition holds: live, finishing and waiting."""
        waiting = [stream for queue in self.waiting.values() for stream in queue]
        return [*self.live.values(), *self.finishing.values(), *waiting]
