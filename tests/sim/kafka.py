"""A deterministic, single-threaded, in-memory Kafka: one broker, fake confluent-kafka clients.

Built for FoundationDB/TigerBeetle-style simulation tests of the worker's exactly-once
guarantees: the worker's real code runs against ``SimConsumer`` / ``SimProducer`` (the
``ConsumerLike`` / ``ProducerLike`` subset of ``worker/service/clients.py``), a harness steps
it under a seeded schedule, advances a ``SimClock``, injects faults, and audits the output
topics with ``SimBroker.committed_records``. Same seed, same run: there are no threads, no
sleeps, no wall clock, and the only randomness is the ``random.Random`` given to the broker
(keyless partitioning, the order partitions are fetched in, forced rebalances). Give the
broker its own ``Random``, not the harness's, so a change here does not shift the schedule.
All calls come from one thread. A call that would block in librdkafka never blocks here: it
returns what is available now, or raises what librdkafka would raise once its timeout ran
out. Only the harness (or the code under test, through an injected sleep) advances the
clock; the broker acts on elapsed time lazily, at the start of every client call and in
``SimBroker.tick()``, in deadline order, so the outcome is the same as if it had acted on
time.

The model
---------
Log. A partition is a list of entries with contiguous offsets; ``delete_records_before``
raises the low watermark (retention). An entry is a data record (key, value, CreateTime ms,
and the transaction that wrote it, if any) or a control marker: ending a transaction
appends a COMMIT or ABORT marker to every partition it wrote, and the marker takes an
offset, as in Kafka, so data offsets have gaps after transactions. The last stable offset
(LSO) of a partition is the first offset of its earliest open transaction, else the log end.

Reading. ``read_committed`` (librdkafka's default) returns data records below the LSO that
are plain or from committed transactions; ``read_uncommitted`` returns every data record up
to the log end. Markers are never returned. ``enable.partition.eof`` emits one
``_PARTITION_EOF`` event each time a partition's position reaches its end, and the end of a
``read_committed`` consumer is the LSO (as in librdkafka's fetcher). ``get_watermark_offsets``
returns (low watermark, end) with the same end: librdkafka sends its isolation level with
ListOffsets, and the broker answers the LSO to ``read_committed``. A position outside
[low, log end] is reset by ``auto.offset.reset``.

Transactions (KIP-98, KIP-360/588, KIP-447). Per ``transactional.id`` the broker keeps a
producer epoch and at most one open transaction. ``init_transactions`` aborts the id's open
transaction (markers written) and bumps the epoch, fencing older instances. A transaction
starts on the broker with its first record or ``send_offsets_to_transaction``; one open for
longer than its producer's ``transaction.timeout.ms`` is aborted by the broker, which bumps
the epoch so the producer's next request fails with an abortable error; after
``abort_transaction`` the producer goes on under the new epoch. A dropped producer's open
transaction stays open, stalling the LSO of every partition it wrote, until it times out or
a new instance with the same id calls ``init_transactions``. Offsets sent to a transaction
are pending until it commits (dropped if it aborts); while any are pending for a partition,
a ``read_committed`` consumer cannot read that partition's committed offset (OffsetFetch with
require_stable, which librdkafka retries until its timeout). ``send_offsets_to_transaction``
is checked against the group (KIP-447): an unknown member id or stale generation is an
abortable error, which is what fences a zombie whose partitions went to another member.

Producer states follow librdkafka's transaction manager: ``produce()`` is allowed only
inside a transaction (else ``_STATE``; after a fatal error ``_FATAL``, both without flags,
as confluent-kafka raises them); a failed delivery inside a transaction (injected, fenced,
timed out) is reported to its ``on_delivery`` callback and makes the transaction abortable;
in the abortable state every transactional call but ``abort_transaction`` raises an error
with ``txn_requires_abort``; after a fatal error (``_FENCED``) every transactional call
raises it. A retriable ``commit_transaction`` failure leaves the commit in progress: call
``commit_transaction`` again (``abort_transaction`` is then ``_STATE``). Delivery callbacks
run in ``poll``, ``flush``, ``commit_transaction`` and ``abort_transaction``; messages still in
the local queue when a transaction is aborted are reported with ``_PURGE_QUEUE``.

Groups (classic protocol, cooperative-sticky, as librdkafka runs it). Members join on
``subscribe``; each subscribed topic's partitions are spread evenly and stickily. When a
partition must move from A to B, A gets ``on_revoke`` inside its next ``consume``/``poll``;
only once A's callback has returned (and A has unassigned) does B get ``on_assign``, inside
B's next ``consume``/``poll``. Every rebalance bumps the generation of all members (joins and
leaves, evictions, forced rebalances, and the rejoin that follows a revocation).
As confluent-kafka does, a callback that did not call ``incremental_assign`` /
``incremental_unassign`` has it done for it afterwards, a missing ``on_lost`` falls back to
``on_revoke``, and an exception raised in a callback propagates out of ``consume``/``poll``.
A member is evicted when it has not called ``consume``/``poll`` for ``max.poll.interval.ms``
(librdkafka leaves the group on its own: its next poll returns ``_MAX_POLL_EXCEEDED``), or
when its heartbeats stop for ``session.timeout.ms``. librdkafka heartbeats from a background
thread, so a live member never misses them here either: its heartbeats stop only when the
harness says its process died or froze (``SimBroker.kill``), and resume with its next call.
Build the broker with ``background_heartbeats=False`` to have every consumer call count as
the only heartbeat instead. An evicted member's partitions go to the others at once, without
callbacks on it; it learns at its next poll (``on_lost``, then it rejoins as a new member).
Until then it still fetches the partitions it thinks it has, like a real zombie. Offset
commits (``Consumer.commit``) check member id and generation, not partition ownership, as
the group coordinator does. Pause flags belong to the consumer and survive unassignment: a
partition paused when revoked is still paused when assigned again (librdkafka's behaviour).

Faults. ``SimBroker.inject(kind, client=None, error=None, applied=False)`` queues a fault
that fires once, on the next matching call of ``client`` (of any client when None); ``error``
defaults as shown. Abortable and fatal errors put a producer in that state; the broker's
transaction stays open until it is aborted or times out.

- ``init_transactions``: raises ``error`` (``retriable()``); nothing changes.
- ``commit_transaction``: raises ``error`` (``abortable()``). Retriable: the commit stays in
  progress; with ``applied=True`` it did commit (the reply was lost) and the retry succeeds.
- ``abort_transaction``: raises ``error`` (``retriable()``); nothing changes.
- ``send_offsets_to_transaction``: raises ``error`` (``abortable()``); nothing is stored.
- ``produce``: the next record sent fails delivery with ``error`` (``_MSG_TIMED_OUT``),
  reported to its ``on_delivery``; a transaction becomes abortable.
- ``produce_queue_full``: the next ``produce()`` raises BufferError.
- ``consume``: the next ``consume``/``poll`` returns an error message first (``transient()``).
- ``commit`` / ``committed``: the next ``Consumer.commit`` / ``Consumer.committed`` raises
  ``error`` (REBALANCE_IN_PROGRESS / ``_TIMED_OUT``).

and, on the broker: ``rebalance(group)`` (a fresh, rng-shuffled assignment: partitions move
through the usual revoke → assign steps), ``lose(consumer, notice_after=0.0)`` (evicted now,
partitions reassigned; it gets ``on_lost`` at its first poll ``notice_after`` seconds on and
fetches as a zombie until then), ``fence(consumer, lost_first=False)`` (a static member
fenced: evicted now; at its next poll ``on_lost`` or not, then one ``_FATAL`` event, and it is
dead from then on: see the method), ``kill(consumer)``
(heartbeats stop: evicted after ``session.timeout.ms`` unless it calls again),
``set_down(True/False)`` (while down, every call that needs the broker raises a retriable
``_TRANSPORT`` error, ``consume``/``poll`` return nothing, produced records wait in the
producer's queue and ``flush`` returns their count; transaction timeouts still fire, and
session timers restart when it comes back).

Simplified, on purpose: one broker, no replication, leaders or metadata delays; no
compaction; records are appended the moment they are sent, and never time out in a
producer's queue; delivery reports carry no latency; keyless records go to an rng-chosen
partition and keyed ones to ``crc32(key) % partitions`` (not librdkafka's murmur2 — only
"same key, same partition" matters here); fetches take at most ``max_fetch_records`` records
per partition per call, partitions in rng order; the assignment is computed per topic, and
only the cooperative-sticky strategy is modelled (``subscribe`` refuses others); rebalance
callbacks are not called with empty lists; a commit's markers are written atomically; the
broker is always reachable except through ``set_down``; pending transactional offsets make
``committed()`` raise ``_TIMED_OUT`` at once instead of retrying for the call's timeout.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_INVALID,
    TIMESTAMP_CREATE_TIME,
    TIMESTAMP_NOT_AVAILABLE,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import ClusterMetadata, PartitionMetadata, TopicMetadata

__all__ = [
    "FAULT_KINDS",
    "Clock",
    "Record",
    "RecordState",
    "SimBroker",
    "SimClients",
    "SimClock",
    "SimConsumer",
    "SimGroupMetadata",
    "SimMessage",
    "SimProducer",
    "StoredRecord",
    "abortable",
    "fatal",
    "retriable",
    "transient",
]

TP = tuple[str, int]
RecordState = Literal["plain", "open", "committed", "aborted"]
DeliveryCallback = Callable[[KafkaError | None, "SimMessage"], Any]
RebalanceCallback = Callable[[Any, list[TopicPartition]], Any]

FAULT_KINDS = frozenset(
    {
        "init_transactions",
        "commit_transaction",
        "abort_transaction",
        "send_offsets_to_transaction",
        "produce",
        "produce_queue_full",
        "consume",
        "commit",
        "committed",
    }
)


# -- time ------------------------------------------------------------------------------------


class Clock(Protocol):
    def now(self) -> float: ...


class SimClock:
    """Simulated seconds; only ``advance`` moves it."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, dt: float) -> None:
        if dt < 0:
            raise ValueError(f"time cannot go back ({dt} s)")
        self._now += dt


# -- errors to inject ------------------------------------------------------------------------


def abortable(code: int = KafkaError._FAIL, reason: str = "injected abortable error") -> KafkaError:
    """A transactional error after which the app must abort the transaction."""
    return KafkaError(code, reason, txn_requires_abort=True)


def retriable(
    code: int = KafkaError._TIMED_OUT, reason: str = "injected retriable error"
) -> KafkaError:
    """An error after which the same call may simply be made again."""
    return KafkaError(code, reason, retriable=True)


def fatal(code: int = KafkaError._FENCED, reason: str = "injected fatal error") -> KafkaError:
    """An error after which the client is unusable."""
    return KafkaError(code, reason, fatal=True)


def transient(
    code: int = KafkaError._TRANSPORT, reason: str = "injected transient error"
) -> KafkaError:
    """A non-fatal consumer error event (e.g. a broker connection dropped)."""
    return KafkaError(code, reason)


def _down_error() -> KafkaError:
    return KafkaError(KafkaError._TRANSPORT, "broker is down (simulated)", retriable=True)


# -- value types -----------------------------------------------------------------------------


class SimMessage:
    """What ``confluent_kafka.Message`` offers the worker: a record, an error event, or the
    message handed to a delivery callback. ``offset()``/``partition()`` are None when unknown."""

    __slots__ = ("_error", "_key", "_offset", "_partition", "_timestamp", "_topic", "_value")

    def __init__(
        self,
        topic: str | None,
        partition: int | None,
        offset: int | None,
        key: bytes | None = None,
        value: bytes | None = None,
        timestamp_ms: int | None = None,
        error: KafkaError | None = None,
    ) -> None:
        self._topic = topic
        self._partition = partition if partition is not None and partition >= 0 else None
        self._offset = offset if offset is not None and offset >= 0 else None
        self._key = key
        self._value = value
        self._timestamp = timestamp_ms
        self._error = error

    def topic(self) -> str | None:
        return self._topic

    def partition(self) -> int | None:
        return self._partition

    def offset(self) -> int | None:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def error(self) -> KafkaError | None:
        return self._error

    def headers(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        if self._timestamp is None:
            return (TIMESTAMP_NOT_AVAILABLE, -1)
        return (TIMESTAMP_CREATE_TIME, self._timestamp)

    def __len__(self) -> int:
        return len(self._value) if self._value is not None else 0

    def __repr__(self) -> str:
        where = f"{self._topic}[{self._partition}]@{self._offset}"
        return (
            f"SimMessage({where}, error={self._error!r})" if self._error else f"SimMessage({where})"
        )


@dataclass(frozen=True)
class SimGroupMetadata:
    """What ``consumer_group_metadata()`` returns: opaque to the worker, checked by the broker."""

    group_id: str
    member_id: str
    generation: int


class Record(NamedTuple):
    """A record as ``committed_records`` returns it."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class StoredRecord(NamedTuple):
    """A record as ``all_records`` returns it, with the state of the transaction that wrote it."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    state: RecordState


# -- broker state ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    txn: int | None = None  # serial of the transaction that wrote it; None: plain record
    marker: Literal["commit", "abort"] | None = None  # set on control records


class _Partition:
    __slots__ = ("entries", "log_start", "open_txns")

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.log_start = 0
        self.open_txns: dict[int, int] = {}  # transaction serial -> its first offset here

    @property
    def end(self) -> int:
        return len(self.entries)

    @property
    def lso(self) -> int:
        return min(self.open_txns.values(), default=self.end)


@dataclass
class _Txn:
    serial: int
    epoch: int
    timeout_s: float
    started_at: float | None = None
    partitions: dict[TP, None] = field(default_factory=dict)  # an ordered set
    offsets: dict[str, dict[TP, int]] = field(default_factory=dict)  # group -> pending offsets


@dataclass
class _TxnIdState:
    epoch: int = -1
    timed_out_epoch: int | None = None  # the epoch whose transaction the broker timed out
    open: _Txn | None = None


@dataclass
class _Member:
    member_id: str
    consumer: SimConsumer
    topics: tuple[str, ...]
    generation: int
    last_poll: float
    last_heartbeat: float
    owned: set[TP] = field(default_factory=set)  # handed over by on_assign, not yet revoked
    target: set[TP] = field(default_factory=set)  # what the current assignment gives it


@dataclass
class _Group:
    group_id: str
    generation: int = 0
    members: dict[str, _Member] = field(default_factory=dict)  # in join order


@dataclass(frozen=True)
class _Eviction:
    reason: Literal["max_poll", "session", "lost", "fenced"]
    notice_at: float
    lost_callback: bool = True  # "fenced": whether ``on_lost`` comes before the fatal error


@dataclass
class _Fault:
    kind: str
    client: object | None
    error: KafkaError | None
    applied: bool


class SimBroker:
    """One in-memory broker: topics, transaction and group coordinators, fault injection."""

    def __init__(
        self,
        clock: Clock,
        rng: random.Random,
        *,
        background_heartbeats: bool = True,
        max_fetch_records: int = 500,
    ) -> None:
        self.clock = clock
        self.rng = rng
        self.background_heartbeats = background_heartbeats
        self.max_fetch_records = max_fetch_records
        self._topics: dict[str, list[_Partition]] = {}
        self._groups: dict[str, _Group] = {}
        self._committed: dict[tuple[str, str, int], int] = {}
        self._txn_ids: dict[str, _TxnIdState] = {}
        self._outcome: dict[int, Literal["open", "committed", "aborted"]] = {}
        self._faults: list[_Fault] = []
        self._down = False
        self._counter = 0

    # -- administration ----------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int) -> None:
        if name in self._topics:
            raise ValueError(f"topic {name!r} exists")
        if partitions < 1:
            raise ValueError("a topic needs at least one partition")
        self._topics[name] = [_Partition() for _ in range(partitions)]
        for group in self._groups.values():
            if any(name in m.topics for m in group.members.values()):
                self._rebalance(group)

    def delete_records_before(self, topic: str, partition: int, offset: int) -> None:
        """Raise the low watermark to ``offset`` (at most the log end), as retention would."""
        part = self._require_partition(topic, partition)
        part.log_start = max(part.log_start, min(offset, part.end))

    @property
    def down(self) -> bool:
        return self._down

    def set_down(self, down: bool) -> None:
        """Make the broker unreachable (or reachable again); see the module docstring."""
        self.tick()
        if self._down and not down:
            now = self.clock.now()
            for group in self._groups.values():
                for member in group.members.values():
                    member.last_heartbeat = now  # a coordinator coming back restarts sessions
        self._down = down

    def tick(self) -> None:
        """Act on elapsed time: time out transactions and evict members, in deadline order."""
        now = self.clock.now()
        due: list[tuple[float, int, str, str, str]] = []
        for txn_id in sorted(self._txn_ids):
            txn = self._txn_ids[txn_id].open
            if txn is not None and txn.started_at is not None:
                deadline = txn.started_at + txn.timeout_s
                if deadline <= now:
                    due.append((deadline, 0, txn_id, "", "timeout"))
        if not self._down:
            for group_id in sorted(self._groups):
                for member in self._groups[group_id].members.values():
                    deadline, reason = self._member_deadline(member)
                    if deadline <= now:
                        due.append((deadline, 1, group_id, member.member_id, reason))
        for _, order, key, member_id, reason in sorted(due):
            if order == 0:
                state = self._txn_ids[key]
                if state.open is not None:
                    self._end_txn(state, commit=False)
                    state.timed_out_epoch = state.epoch
                    state.epoch += 1
            else:
                group = self._groups[key]
                if member_id in group.members:
                    evicted = "max_poll" if reason == "max_poll" else "session"
                    self._remove_member(group, member_id, _Eviction(evicted, now))

    # -- faults ------------------------------------------------------------------------------

    def inject(
        self,
        kind: str,
        client: object | None = None,
        error: KafkaError | None = None,
        *,
        applied: bool = False,
    ) -> None:
        """Queue a one-shot fault (kinds and defaults: module docstring)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(FAULT_KINDS)}")
        if applied and kind != "commit_transaction":
            raise ValueError("applied=True only makes sense for commit_transaction")
        self._faults.append(_Fault(kind, client, error, applied))

    def pending_faults(self) -> list[str]:
        """Kinds of the injected faults that have not fired yet, in order."""
        return [f.kind for f in self._faults]

    def rebalance(self, group_id: str) -> None:
        """Force a rebalance with a fresh, rng-shuffled (not sticky) assignment."""
        self.tick()
        self._rebalance(self._groups[group_id], shuffle=True)

    def lose(self, consumer: SimConsumer, notice_after: float = 0.0) -> None:
        """Evict ``consumer`` now; it gets ``on_lost`` at its first poll ``notice_after`` s on."""
        self.tick()
        group = self._groups.get(consumer._group_id)
        if group is None or consumer._member_id not in group.members:
            raise ValueError("that consumer is not a group member")
        eviction = _Eviction("lost", self.clock.now() + notice_after)
        self._remove_member(group, consumer._member_id, eviction)

    def fence(self, consumer: SimConsumer, lost_first: bool = False) -> None:
        """A static member fenced (FENCED_INSTANCE_ID: its group.instance.id taken by another
        instance, or by its own rejoin after a coordinator restart): evicted now. At its next
        poll, as librdkafka does: with ``lost_first`` an ``on_lost`` (a heartbeat's
        UNKNOWN_MEMBER_ID came first), else the assignment is dropped without a callback; then
        one ``_FATAL`` event (its ``fatal()`` flag False, as confluent-kafka builds it), and
        nothing ever after: it never rejoins, ``commit`` raises ``_FATAL``, ``close`` serves
        no callbacks. ``committed`` still answers (OffsetFetch has no fatal check)."""
        self.tick()
        group = self._groups.get(consumer._group_id)
        if group is None or consumer._member_id not in group.members:
            raise ValueError("that consumer is not a group member")
        eviction = _Eviction("fenced", self.clock.now(), lost_callback=lost_first)
        self._remove_member(group, consumer._member_id, eviction)

    def kill(self, consumer: SimConsumer) -> None:
        """The consumer's process died or froze: its heartbeats stop until it calls again."""
        self.tick()
        consumer._heartbeats_stopped = True
        member = self._member(consumer)
        if member is not None:
            member.last_heartbeat = self.clock.now()

    # -- reading, for the harness and its auditor ------------------------------------------

    def committed_records(self, topic: str) -> list[Record]:
        """Data records a ``read_committed`` consumer can see, in partition/offset order."""
        self.tick()
        out = []
        for pid, part in enumerate(self._topics[topic]):
            for offset in range(part.log_start, part.lso):
                entry = part.entries[offset]
                if entry.marker is None and self._visible_committed(entry):
                    out.append(Record(pid, offset, entry.key, entry.value))
        return out

    def all_records(self, topic: str) -> list[StoredRecord]:
        """Every retained data record, with the state of the transaction that wrote it."""
        self.tick()
        out = []
        for pid, part in enumerate(self._topics[topic]):
            for offset in range(part.log_start, part.end):
                entry = part.entries[offset]
                if entry.marker is None:
                    state: RecordState = "plain" if entry.txn is None else self._outcome[entry.txn]
                    out.append(StoredRecord(pid, offset, entry.key, entry.value, state))
        return out

    def watermarks(self, topic: str, partition: int) -> tuple[int, int, int]:
        """(low watermark, last stable offset, log end)."""
        self.tick()
        part = self._require_partition(topic, partition)
        return part.log_start, part.lso, part.end

    def committed_offset(self, group_id: str, topic: str, partition: int) -> int | None:
        self.tick()
        return self._committed.get((group_id, topic, partition))

    def open_transactions(self) -> dict[str, float | None]:
        """transactional.id -> when its open transaction started on the broker (None: empty)."""
        self.tick()
        return {
            txn_id: state.open.started_at
            for txn_id, state in sorted(self._txn_ids.items())
            if state.open is not None
        }

    def assignments(self, group_id: str) -> dict[str, list[TP]]:
        """member id -> partitions it holds (handed over and not yet revoked), in join order."""
        self.tick()
        group = self._groups.get(group_id)
        if group is None:
            return {}
        return {mid: sorted(m.owned) for mid, m in group.members.items()}

    def generation(self, group_id: str) -> int:
        return self._groups[group_id].generation if group_id in self._groups else 0

    # -- internals: log ------------------------------------------------------------------------

    def _partition(self, topic: str, partition: int) -> _Partition | None:
        parts = self._topics.get(topic)
        if parts is None or not 0 <= partition < len(parts):
            return None
        return parts[partition]

    def _require_partition(self, topic: str, partition: int) -> _Partition:
        part = self._partition(topic, partition)
        if part is None:
            raise KafkaException(
                KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, f"{topic} [{partition}] is unknown")
            )
        return part

    def _visible_committed(self, entry: _Entry) -> bool:
        return entry.txn is None or self._outcome[entry.txn] == "committed"

    def _append(self, topic: str, partition: int, entry: _Entry, txn: _Txn | None) -> int:
        part = self._topics[topic][partition]
        offset = part.end
        part.entries.append(entry)
        if txn is not None:
            entry.txn = txn.serial
            self._start(txn)
            key = (topic, partition)
            if key not in txn.partitions:
                txn.partitions[key] = None
                part.open_txns[txn.serial] = offset
        return offset

    def _now_ms(self) -> int:
        return int(self.clock.now() * 1000)

    def _next_id(self) -> int:
        self._counter += 1
        return self._counter

    # -- internals: transactions ---------------------------------------------------------------

    def _check_up(self) -> None:
        if self._down:
            raise KafkaException(_down_error())

    def _init_producer(self, txn_id: str) -> int:
        state = self._txn_ids.setdefault(txn_id, _TxnIdState())
        if state.open is not None:
            self._end_txn(state, commit=False)
        state.epoch += 1
        state.timed_out_epoch = None
        return state.epoch

    def _producer_status(self, txn_id: str, epoch: int) -> Literal["ok", "timed_out", "fenced"]:
        state = self._txn_ids[txn_id]
        if epoch == state.epoch:
            return "ok"
        if epoch == state.timed_out_epoch:
            return "timed_out"
        return "fenced"

    def _open_txn(self, txn_id: str, epoch: int, timeout_s: float) -> _Txn:
        state = self._txn_ids[txn_id]
        if state.open is None:
            serial = self._next_id()
            state.open = _Txn(serial, epoch, timeout_s)
            self._outcome[serial] = "open"
        return state.open

    def _start(self, txn: _Txn) -> None:
        if txn.started_at is None:
            txn.started_at = self.clock.now()

    def _end_txn(self, state: _TxnIdState, commit: bool) -> None:
        txn, state.open = state.open, None
        if txn is None:
            return
        marker: Literal["commit", "abort"] = "commit" if commit else "abort"
        for topic, pid in sorted(txn.partitions):
            part = self._topics[topic][pid]
            part.entries.append(_Entry(None, None, self._now_ms(), txn.serial, marker))
            del part.open_txns[txn.serial]
        self._outcome[txn.serial] = "committed" if commit else "aborted"
        if commit:
            for group_id, offsets in sorted(txn.offsets.items()):
                for (topic, pid), offset in sorted(offsets.items()):
                    self._committed[(group_id, topic, pid)] = offset

    def _bump_after_timeout(self, txn_id: str) -> int:
        state = self._txn_ids[txn_id]
        state.epoch += 1
        state.timed_out_epoch = None
        return state.epoch

    def _stable(self, group_id: str, key: TP) -> bool:
        """No open transaction holds a pending offset of ``group_id`` for ``key``."""
        return not any(
            state.open is not None and key in state.open.offsets.get(group_id, {})
            for state in self._txn_ids.values()
        )

    def _check_group_metadata(self, meta: SimGroupMetadata) -> KafkaError | None:
        if not meta.member_id:
            return None  # a consumer outside any group: nothing to fence
        group = self._groups.get(meta.group_id)
        member = group.members.get(meta.member_id) if group is not None else None
        if member is None:
            return KafkaError(
                KafkaError.UNKNOWN_MEMBER_ID,
                f"member {meta.member_id} is not in group {meta.group_id}",
                txn_requires_abort=True,
            )
        if member.generation != meta.generation:
            return KafkaError(
                KafkaError.ILLEGAL_GENERATION,
                f"generation {meta.generation} is stale (now {member.generation})",
                txn_requires_abort=True,
            )
        return None

    # -- internals: groups ---------------------------------------------------------------------

    def _member(self, consumer: SimConsumer) -> _Member | None:
        group = self._groups.get(consumer._group_id)
        if group is None or not consumer._member_id:
            return None
        member = group.members.get(consumer._member_id)
        return member if member is not None and member.consumer is consumer else None

    def _member_deadline(self, member: _Member) -> tuple[float, str]:
        consumer = member.consumer
        deadline, reason = member.last_poll + consumer._max_poll_s, "max_poll"
        if not self.background_heartbeats or consumer._heartbeats_stopped:
            session = member.last_heartbeat + consumer._session_s
            if session < deadline:
                deadline, reason = session, "session"
        return deadline, reason

    def _join(self, consumer: SimConsumer, topics: tuple[str, ...]) -> _Member:
        group = self._groups.setdefault(consumer._group_id, _Group(consumer._group_id))
        now = self.clock.now()
        member_id = f"{consumer._client_id}-{self._next_id()}"
        member = _Member(member_id, consumer, topics, group.generation, now, now)
        group.members[member_id] = member
        consumer._member_id = member_id
        self._rebalance(group)
        return member

    def _leave(self, consumer: SimConsumer) -> None:
        member = self._member(consumer)
        if member is not None:
            self._remove_member(self._groups[consumer._group_id], member.member_id, None)

    def _remove_member(self, group: _Group, member_id: str, eviction: _Eviction | None) -> None:
        member = group.members.pop(member_id)
        if eviction is not None:
            member.consumer._eviction = eviction
        self._rebalance(group)

    def _rebalance(self, group: _Group, shuffle: bool = False) -> None:
        members = list(group.members.values())
        targets: dict[str, set[TP]] = {m.member_id: set() for m in members}
        for topic in sorted({t for m in members for t in m.topics}):
            parts = self._topics.get(topic)
            eligible = [m for m in members if topic in m.topics]
            if parts is None or not eligible:
                continue
            tps = [(topic, pid) for pid in range(len(parts))]
            if shuffle:
                self.rng.shuffle(eligible)
                self.rng.shuffle(tps)
                chosen = {m.member_id: tps[i :: len(eligible)] for i, m in enumerate(eligible)}
            else:
                chosen = _sticky(eligible, tps)
            for member_id, assigned in chosen.items():
                targets[member_id].update(assigned)
        for member in members:
            member.target = targets[member.member_id]
        self._bump(group)

    def _bump(self, group: _Group) -> None:
        group.generation += 1
        for member in group.members.values():
            member.generation = group.generation
            member.consumer._generation = group.generation

    def _owned_elsewhere(self, group: _Group, key: TP, member: _Member) -> bool:
        return any(m is not member and key in m.owned for m in group.members.values())

    def _take_fault(self, kind: str, client: object) -> _Fault | None:
        for i, fault in enumerate(self._faults):
            if fault.kind == kind and (fault.client is None or fault.client is client):
                return self._faults.pop(i)
        return None


def _sticky(members: Sequence[_Member], tps: Sequence[TP]) -> dict[str, list[TP]]:
    """Even and sticky: each member keeps what it was given, up to its fair share; the rest
    goes to whoever has least (ties: join order)."""
    base, extra = divmod(len(tps), len(members))
    valid = set(tps)
    out: dict[str, list[TP]] = {m.member_id: [] for m in members}
    previous = {m.member_id: sorted(tp for tp in m.target if tp in valid) for m in members}
    taken: set[TP] = set()
    for m in members:
        keep = previous[m.member_id][:base]
        out[m.member_id].extend(keep)
        taken.update(keep)
    for m in members:
        if extra and len(previous[m.member_id]) > base:
            tp = previous[m.member_id][base]
            out[m.member_id].append(tp)
            taken.add(tp)
            extra -= 1
    for tp in tps:
        if tp in taken:
            continue
        room = [
            m
            for m in members
            if len(out[m.member_id]) < base or (len(out[m.member_id]) == base and extra)
        ]
        pick = min(room, key=lambda m: len(out[m.member_id]))
        if len(out[pick.member_id]) == base:
            extra -= 1
        out[pick.member_id].append(tp)
    return out


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _bytes(data: bytes | str | None) -> bytes | None:
    return data.encode() if isinstance(data, str) else data


def _key(tp: TopicPartition) -> TP:
    return (tp.topic, tp.partition)


# -- consumer --------------------------------------------------------------------------------


@dataclass
class _Fetch:
    """One assigned partition, client side."""

    position: int | None  # next offset to read; None: from the committed offset, when readable
    eof_at: int | None = None  # the end at which _PARTITION_EOF was last emitted
    stalled: bool = False  # auto.offset.reset=error fired: no more fetching until a seek


_RESET = {
    "earliest": "earliest",
    "smallest": "earliest",
    "beginning": "earliest",
    "latest": "latest",
    "largest": "latest",
    "end": "latest",
    "error": "error",
}


class SimConsumer:
    """The confluent-kafka ``Consumer`` subset the worker uses, on a ``SimBroker``."""

    def __init__(self, broker: SimBroker, conf: dict[str, Any]) -> None:
        if "group.id" not in conf:
            raise ValueError("Failed to create consumer: group.id must be set")
        self._broker = broker
        self._group_id = str(conf["group.id"])
        self._client_id = str(conf.get("client.id", "consumer"))
        self._read_committed = conf.get("isolation.level", "read_committed") == "read_committed"
        reset = str(conf.get("auto.offset.reset", "largest"))
        if reset not in _RESET:
            raise ValueError(f"auto.offset.reset={reset!r} is not supported")
        self._reset = _RESET[reset]
        self._eof = _flag(conf.get("enable.partition.eof", False))
        self._session_s = float(conf.get("session.timeout.ms", 45_000)) / 1000
        self._max_poll_s = float(conf.get("max.poll.interval.ms", 300_000)) / 1000
        self._auto_commit = _flag(conf.get("enable.auto.commit", True))
        self._auto_commit_s = float(conf.get("auto.commit.interval.ms", 5_000)) / 1000
        self._strategy = str(conf.get("partition.assignment.strategy", "range,roundrobin"))
        self._on_commit: Callable[..., Any] | None = conf.get("on_commit")
        self._closed = False
        self._subscription: tuple[str, ...] | None = None
        self._on_assign: RebalanceCallback | None = None
        self._on_revoke: RebalanceCallback | None = None
        self._on_lost: RebalanceCallback | None = None
        self._member_id = ""
        self._generation = -1
        self._eviction: _Eviction | None = None
        self._heartbeats_stopped = False
        self._assignment: dict[TP, _Fetch] = {}
        self._paused: set[TP] = set()
        self._events: list[SimMessage] = []  # error events not yet returned
        self._fatal: KafkaError | None = None  # fenced: commits fail with this
        self._in_callback = False
        self._callback_changed_assignment = False
        self._last_auto_commit = broker.clock.now()

    # -- group ---------------------------------------------------------------------------------

    def subscribe(
        self,
        topics: list[str],
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
        on_lost: RebalanceCallback | None = None,
    ) -> None:
        self._enter()
        if self._strategy != "cooperative-sticky":
            raise ValueError(
                "SimConsumer models only partition.assignment.strategy=cooperative-sticky "
                f"(got {self._strategy!r})"
            )
        self._subscription = tuple(topics)
        self._on_assign, self._on_revoke, self._on_lost = on_assign, on_revoke, on_lost
        member = self._broker._member(self)
        if member is not None:
            member.topics = self._subscription
            self._broker._rebalance(self._broker._groups[self._group_id])
        elif not self._broker.down and self._eviction is None:
            self._broker._join(self, self._subscription)

    def consumer_group_metadata(self) -> SimGroupMetadata:
        self._check_open()
        return SimGroupMetadata(self._group_id, self._member_id, self._generation)

    def memberid(self) -> str | None:
        self._check_open()
        return self._member_id or None

    # -- fetching ------------------------------------------------------------------------------

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[SimMessage]:
        """Up to ``num_messages`` records and events available now; never waits."""
        if num_messages < 0:
            raise ValueError("num_messages must be >= 0")
        self._enter()
        broker = self._broker
        member = broker._member(self)
        if member is not None:
            member.last_poll = broker.clock.now()
        if broker.down:
            return []
        if self._fatal is not None:
            out = self._events[:num_messages]  # the fatal event, if not taken yet
            del self._events[:num_messages]
            return out
        fault = broker._take_fault("consume", self)
        if fault is not None:
            self._events.append(SimMessage(None, None, None, error=fault.error or transient()))
        self._serve_group()
        self._maybe_auto_commit()
        out = self._events[:num_messages]
        del self._events[:num_messages]
        out.extend(self._fetch(num_messages - len(out)))
        return out

    def poll(self, timeout: float | None = None) -> SimMessage | None:
        messages = self.consume(1, -1 if timeout is None else timeout)
        return messages[0] if messages else None

    def _fetch(self, limit: int) -> list[SimMessage]:
        broker = self._broker
        out: list[SimMessage] = []
        keys = [key for key in self._assignment if key not in self._paused]
        broker.rng.shuffle(keys)
        for key in keys:
            if len(out) >= limit:
                break
            state = self._assignment[key]
            part = broker._partition(*key)
            if state.stalled:
                continue
            if part is None:
                state.stalled = True
                error = KafkaError(KafkaError._UNKNOWN_PARTITION, f"{key} does not exist")
                out.append(SimMessage(key[0], key[1], None, error=error))
                continue
            position = self._position(key, state, part, out)
            if position is None:
                continue
            end = self._end(part)
            taken = 0
            while position < end and len(out) < limit and taken < broker.max_fetch_records:
                entry = part.entries[position]
                position += 1
                if entry.marker is not None:
                    continue
                if self._read_committed and not broker._visible_committed(entry):
                    continue
                out.append(
                    SimMessage(
                        key[0], key[1], position - 1, entry.key, entry.value, entry.timestamp_ms
                    )
                )
                taken += 1
            state.position = position
            if self._eof and position == end and state.eof_at != end and len(out) < limit:
                error = KafkaError(KafkaError._PARTITION_EOF, f"reached end of {key} at {end}")
                out.append(SimMessage(key[0], key[1], end, error=error))
                state.eof_at = end
        return out

    def _position(
        self, key: TP, state: _Fetch, part: _Partition, events: list[SimMessage]
    ) -> int | None:
        """Where to fetch from: resolves a pending start offset (the committed one, once it is
        stable) and applies ``auto.offset.reset``. None: nothing to fetch now."""
        if state.position is None:
            if self._read_committed and not self._broker._stable(self._group_id, key):
                return None  # librdkafka keeps retrying the OffsetFetch (require_stable)
            state.position = self._broker._committed.get((self._group_id, *key))
        if state.position is not None and part.log_start <= state.position <= part.end:
            return state.position
        if self._reset == "error":
            state.stalled = True
            error = KafkaError(
                KafkaError._AUTO_OFFSET_RESET,
                f"{key}: offset {state.position} is outside [{part.log_start}, {part.end}]",
            )
            events.append(SimMessage(key[0], key[1], state.position, error=error))
            return None
        state.position = part.log_start if self._reset == "earliest" else self._end(part)
        return state.position

    def _end(self, part: _Partition) -> int:
        return part.lso if self._read_committed else part.end

    # -- assignment ----------------------------------------------------------------------------

    def assign(self, partitions: list[TopicPartition]) -> None:
        """Replace the whole assignment (no group involved)."""
        self._enter()
        self._assignment = {}
        self._add(partitions)
        self._note_assignment_change()

    def unassign(self) -> None:
        self._enter()
        self._assignment = {}
        self._note_assignment_change()

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        self._enter()
        for tp in partitions:
            if _key(tp) in self._assignment:
                raise KafkaException(
                    KafkaError(
                        KafkaError._CONFLICT,
                        f"{tp.topic} [{tp.partition}] is already part of the current assignment",
                    )
                )
        self._add(partitions)
        self._note_assignment_change()

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None:
        self._enter()
        for tp in partitions:
            if _key(tp) not in self._assignment:
                raise KafkaException(
                    KafkaError(
                        KafkaError._INVALID_ARG,
                        f"{tp.topic} [{tp.partition}] can't be unassigned since it is not in "
                        "the current assignment",
                    )
                )
        for tp in partitions:
            del self._assignment[_key(tp)]
        self._note_assignment_change()

    def assignment(self) -> list[TopicPartition]:
        self._check_open()
        return [TopicPartition(t, p) for t, p in self._assignment]

    def _add(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self._assignment[_key(tp)] = _Fetch(self._start_offset(_key(tp), tp.offset))

    def _start_offset(self, key: TP, offset: int) -> int | None:
        """An explicit offset, or a special one resolved now; None: the committed offset."""
        if offset >= 0:
            return offset
        part = self._broker._partition(*key)
        if part is not None and offset == OFFSET_BEGINNING:
            return part.log_start
        if part is not None and offset == OFFSET_END:
            return self._end(part)
        return None  # OFFSET_INVALID / OFFSET_STORED: the committed offset, once readable

    def _note_assignment_change(self) -> None:
        if self._in_callback:
            self._callback_changed_assignment = True

    def seek(self, partition: TopicPartition) -> None:
        """Move the fetch position of an assigned partition (a no-op for others)."""
        self._enter()
        key = _key(partition)
        if key in self._assignment:
            self._assignment[key] = _Fetch(self._start_offset(key, partition.offset))

    def pause(self, partitions: list[TopicPartition]) -> None:
        self._enter()
        self._paused.update(_key(tp) for tp in partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        self._enter()
        self._paused.difference_update(_key(tp) for tp in partitions)

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        self._enter()
        out = []
        for tp in partitions:
            state = self._assignment.get(_key(tp))
            offset = state.position if state is not None and state.position is not None else None
            out.append(
                TopicPartition(tp.topic, tp.partition, OFFSET_INVALID if offset is None else offset)
            )
        return out

    # -- offsets and metadata ------------------------------------------------------------------

    def committed(
        self, partitions: list[TopicPartition], timeout: float | None = None
    ) -> list[TopicPartition]:
        self._enter()
        broker = self._broker
        broker._check_up()
        fault = broker._take_fault("committed", self)
        if fault is not None:
            raise KafkaException(fault.error or KafkaError(KafkaError._TIMED_OUT, "injected"))
        out = []
        for tp in partitions:
            key = _key(tp)
            if self._read_committed and not broker._stable(self._group_id, key):
                raise KafkaException(
                    KafkaError(
                        KafkaError._TIMED_OUT,
                        f"Failed to get committed offsets: {key} has a pending transactional "
                        "offset commit (UNSTABLE_OFFSET_COMMIT)",
                    )
                )
            offset = broker._committed.get((self._group_id, *key), OFFSET_INVALID)
            out.append(TopicPartition(tp.topic, tp.partition, offset))
        return out

    def commit(
        self,
        message: SimMessage | None = None,
        offsets: list[TopicPartition] | None = None,
        asynchronous: bool = True,
    ) -> list[TopicPartition] | None:
        self._enter()
        try:
            committed = self._commit(message, offsets)
        except KafkaException as exc:
            if not asynchronous:
                raise
            if self._on_commit is not None:
                self._on_commit(exc.args[0], list(offsets or []))
            return None
        if asynchronous:
            if self._on_commit is not None:
                self._on_commit(None, committed)
            return None
        return committed

    def _commit(
        self, message: SimMessage | None, offsets: list[TopicPartition] | None
    ) -> list[TopicPartition]:
        self._check_usable()
        broker = self._broker
        broker._check_up()
        fault = broker._take_fault("commit", self)
        if fault is not None:
            raise KafkaException(
                fault.error or KafkaError(KafkaError.REBALANCE_IN_PROGRESS, "injected")
            )
        if offsets is None and message is not None:
            offsets = [
                TopicPartition(message.topic(), message.partition(), (message.offset() or 0) + 1)
            ]
        if offsets is None:
            offsets = [
                TopicPartition(t, p, state.position)
                for (t, p), state in self._assignment.items()
                if state.position is not None
            ]
        if not offsets:
            raise KafkaException(KafkaError(KafkaError._NO_OFFSET, "no offsets to commit"))
        if self._member_id:
            group = broker._groups.get(self._group_id)
            member = group.members.get(self._member_id) if group is not None else None
            if member is None or member.consumer is not self:
                raise KafkaException(
                    KafkaError(KafkaError.UNKNOWN_MEMBER_ID, f"{self._member_id} left the group")
                )
            if member.generation != self._generation:
                raise KafkaException(KafkaError(KafkaError.ILLEGAL_GENERATION, "stale generation"))
        out = []
        for tp in offsets:
            broker._committed[(self._group_id, tp.topic, tp.partition)] = tp.offset
            out.append(TopicPartition(tp.topic, tp.partition, tp.offset))
        return out

    def _maybe_auto_commit(self) -> None:
        now = self._broker.clock.now()
        if not self._auto_commit or now - self._last_auto_commit < self._auto_commit_s:
            return
        self._last_auto_commit = now
        if any(s.position is not None for s in self._assignment.values()):
            self.commit(asynchronous=True)

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float | None = None, cached: bool = False
    ) -> tuple[int, int]:
        """(low watermark, end): the end is the LSO for ``read_committed``, as in librdkafka."""
        self._enter()
        self._broker._check_up()
        part = self._broker._require_partition(partition.topic, partition.partition)
        return part.log_start, self._end(part)

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> ClusterMetadata:
        """Metadata; a missing topic asked for by name comes back with UNKNOWN_TOPIC_OR_PART."""
        self._enter()
        broker = self._broker
        broker._check_up()
        meta = ClusterMetadata()
        meta.cluster_id = "sim"
        meta.controller_id = 0
        meta.orig_broker_id = 0
        meta.orig_broker_name = "sim:9092/0"
        names = [topic] if topic is not None else sorted(broker._topics)
        for name in names:
            tmeta = TopicMetadata()
            tmeta.topic = name
            parts = broker._topics.get(name)
            if parts is None:
                tmeta.error = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
            else:
                for pid in range(len(parts)):
                    pmeta = PartitionMetadata()
                    pmeta.id, pmeta.leader, pmeta.replicas, pmeta.isrs = pid, 0, [0], [0]
                    tmeta.partitions[pid] = pmeta
            meta.topics[name] = tmeta
        return meta

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Revoke the assignment (``on_revoke``, or ``on_lost`` if evicted), leave the group."""
        if self._closed:
            return
        self._broker.tick()
        broker = self._broker
        try:
            if self._subscription is not None and self._assignment:
                if broker._member(self) is None:
                    self._eviction = None
                    self._rebalance_callback("lost", list(self._assignment))
                else:
                    if self._auto_commit and not broker.down:
                        self.commit(asynchronous=True)
                    self._rebalance_callback("revoke", list(self._assignment))
        finally:
            member = broker._member(self)
            if member is not None:
                if broker.down:  # the LeaveGroup never arrives: the session has to time out
                    self._heartbeats_stopped = True
                    member.last_heartbeat = broker.clock.now()
                else:
                    broker._leave(self)
            self._assignment = {}
            self._closed = True

    # -- internals -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("Consumer closed")

    def _check_usable(self) -> None:
        if self._fatal is not None:
            raise KafkaException(self._fatal)

    def _enter(self) -> None:
        """Every call: the clock may have moved, and the call itself is a sign of life."""
        self._check_open()
        broker = self._broker
        broker.tick()
        self._heartbeats_stopped = False
        member = broker._member(self)
        if member is not None:
            member.last_heartbeat = broker.clock.now()

    def _serve_group(self) -> None:
        """The rebalance steps due for this member, in order: lost → rejoin, revoke, assign."""
        broker = self._broker
        if self._subscription is None:
            return
        if self._eviction is not None:
            eviction = self._eviction
            if broker.clock.now() < eviction.notice_at:
                return  # a zombie: it does not know yet, and goes on fetching
            self._eviction = None
            self._member_id, self._generation = "", -1
            if eviction.reason == "fenced":
                self._fatal = KafkaError(
                    KafkaError._FATAL,
                    "Fatal error: Broker: Static consumer fenced by other consumer with same "
                    "group.instance.id",
                )
                self._events.append(SimMessage(None, None, None, error=self._fatal))
                if self._assignment and eviction.lost_callback:
                    self._rebalance_callback("lost", list(self._assignment))
                self._assignment = {}  # librdkafka's unconditional unassign
                return
            if eviction.reason == "max_poll":
                error = KafkaError(
                    KafkaError._MAX_POLL_EXCEEDED,
                    f"Application maximum poll interval ({int(self._max_poll_s * 1000)}ms) "
                    "exceeded",
                )
                self._events.append(SimMessage(None, None, None, error=error))
            try:
                if self._assignment:
                    self._rebalance_callback("lost", list(self._assignment))
            finally:
                broker._join(self, self._subscription)
        if broker._member(self) is None:
            broker._join(self, self._subscription)
        member = broker._member(self)
        if member is None:
            return
        group = broker._groups[self._group_id]
        revoke = sorted(member.owned - member.target)
        if revoke:
            try:
                self._rebalance_callback("revoke", revoke)
            finally:
                member.owned.difference_update(revoke)
                broker._bump(group)  # the revoking member rejoins: one more generation
        member = broker._member(self)
        if member is None:
            return
        assign = sorted(
            key
            for key in member.target - member.owned
            if not broker._owned_elsewhere(group, key, member)
        )
        if assign:
            member.owned.update(assign)
            self._rebalance_callback("assign", assign)

    def _rebalance_callback(
        self, kind: Literal["assign", "revoke", "lost"], keys: list[TP]
    ) -> None:
        """Call the app's callback; then, as confluent-kafka does, (un)assign if it did not."""
        if kind == "assign":
            callback = self._on_assign
        elif kind == "lost" and self._on_lost is not None:
            callback = self._on_lost
        else:
            callback = self._on_revoke
        partitions = [TopicPartition(t, p) for t, p in keys]
        self._in_callback, self._callback_changed_assignment = True, False
        try:
            if callback is not None:
                callback(self, partitions)
        finally:
            self._in_callback = False
            if not self._callback_changed_assignment:
                if kind == "assign":
                    self._add(tp for tp in partitions if _key(tp) not in self._assignment)
                else:
                    for key in keys:
                        self._assignment.pop(key, None)


# -- producer --------------------------------------------------------------------------------


@dataclass
class _Outgoing:
    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    callback: DeliveryCallback | None


ProducerState = Literal["init", "ready", "in_txn", "committing", "abortable", "fatal"]


class SimProducer:
    """The confluent-kafka ``Producer`` subset the worker uses, on a ``SimBroker``."""

    def __init__(self, broker: SimBroker, conf: dict[str, Any]) -> None:
        self._broker = broker
        txn_id = conf.get("transactional.id")
        self._txn_id: str | None = str(txn_id) if txn_id else None
        self._txn_timeout_s = float(conf.get("transaction.timeout.ms", 60_000)) / 1000
        self._default_callback: DeliveryCallback | None = conf.get("on_delivery")
        self._state: ProducerState = "init" if self._txn_id else "ready"
        self._error: KafkaError | None = None  # the abortable or fatal error of that state
        self._epoch = -1
        self._commit_done = False  # a retriable commit failure that had in fact committed
        self._queue: list[_Outgoing] = []  # produced, not yet sent (the broker is down)
        self._reports: list[tuple[DeliveryCallback | None, KafkaError | None, SimMessage]] = []

    # -- transactions ------------------------------------------------------------------------

    def init_transactions(self, timeout: float = -1) -> None:
        broker = self._enter_txn_api()
        self._require("init")
        broker._check_up()
        self._inject("init_transactions", retriable())
        assert self._txn_id is not None
        self._epoch = broker._init_producer(self._txn_id)
        self._state = "ready"

    def begin_transaction(self) -> None:
        self._enter_txn_api()
        self._require("ready")
        self._state = "in_txn"

    def send_offsets_to_transaction(
        self, positions: list[TopicPartition], group_metadata: SimGroupMetadata, timeout: float = -1
    ) -> None:
        broker = self._enter_txn_api()
        self._require("in_txn")
        if not isinstance(group_metadata, SimGroupMetadata):
            raise TypeError("group_metadata must come from SimConsumer.consumer_group_metadata()")
        broker._check_up()
        self._inject("send_offsets_to_transaction", abortable())
        self._check_epoch()
        error = broker._check_group_metadata(group_metadata)
        if error is not None:
            self._fail(error)
        assert self._txn_id is not None
        txn = broker._open_txn(self._txn_id, self._epoch, self._txn_timeout_s)
        broker._start(txn)
        pending = txn.offsets.setdefault(group_metadata.group_id, {})
        for tp in positions:
            if tp.offset < 0:
                raise KafkaException(KafkaError(KafkaError._INVALID_ARG, f"bad offset in {tp}"))
            pending[_key(tp)] = tp.offset

    def commit_transaction(self, timeout: float = -1) -> None:
        broker = self._enter_txn_api()
        if self._state == "committing" and self._commit_done:
            self._commit_done = False
            self._state = "ready"
            self._serve_reports()
            return
        self._require("in_txn", "committing")
        if broker.down:
            self._state = "committing"
            raise KafkaException(_down_error())
        self._send()
        self._serve_reports()
        if self._state in ("abortable", "fatal"):
            assert self._error is not None
            raise KafkaException(self._error)
        self._check_epoch()
        assert self._txn_id is not None
        fault = broker._take_fault("commit_transaction", self)
        if fault is not None:
            error = fault.error or abortable()
            if error.retriable() and not error.fatal() and not error.txn_requires_abort():
                if fault.applied:
                    broker._end_txn(broker._txn_ids[self._txn_id], commit=True)
                    self._commit_done = True
                self._state = "committing"
                raise KafkaException(error)
            self._fail(error)
        broker._end_txn(broker._txn_ids[self._txn_id], commit=True)
        self._state = "ready"

    def abort_transaction(self, timeout: float = -1) -> None:
        broker = self._enter_txn_api()
        self._require("in_txn", "abortable")
        broker._check_up()
        self._inject("abort_transaction", retriable())
        assert self._txn_id is not None
        status = broker._producer_status(self._txn_id, self._epoch)
        if status == "fenced":
            self._fail(self._fenced_error())
        for out in self._queue:
            self._report(out, KafkaError(KafkaError._PURGE_QUEUE, "purged by abort_transaction"))
        self._queue.clear()
        if status == "timed_out":
            self._epoch = broker._bump_after_timeout(self._txn_id)
        else:
            broker._end_txn(broker._txn_ids[self._txn_id], commit=False)
        self._state, self._error = "ready", None
        self._serve_reports()

    # -- producing -----------------------------------------------------------------------------

    def produce(
        self,
        topic: str,
        value: bytes | str | None = None,
        key: bytes | str | None = None,
        partition: int = -1,
        on_delivery: DeliveryCallback | None = None,
        timestamp: int = 0,
        headers: Any = None,
        callback: DeliveryCallback | None = None,
    ) -> None:
        broker = self._broker
        broker.tick()
        if broker._take_fault("produce_queue_full", self) is not None:
            raise BufferError("Local: Queue full")
        if self._txn_id is not None:
            if self._state == "fatal":
                raise KafkaException(
                    KafkaError(
                        KafkaError._FATAL,
                        f"Producing not allowed since a previous fatal error was raised: "
                        f"{self._error.str() if self._error else ''}",
                    )
                )
            if self._state != "in_txn":
                raise KafkaException(
                    KafkaError(
                        KafkaError._STATE,
                        f"Producing not allowed in transactional state {self._state}",
                    )
                )
        ts = timestamp or broker._now_ms()
        cb = on_delivery or callback or self._default_callback
        self._queue.append(_Outgoing(topic, partition, _bytes(key), _bytes(value), ts, cb))
        self._send()

    def poll(self, timeout: float | None = None) -> int:
        self._broker.tick()
        self._send()
        return self._serve_reports()

    def flush(self, timeout: float | None = None) -> int:
        """Send what can be sent, run delivery callbacks; returns how many are still queued."""
        self._broker.tick()
        self._send()
        self._serve_reports()
        return len(self._queue)

    def __len__(self) -> int:
        return len(self._queue) + len(self._reports)

    # -- internals -----------------------------------------------------------------------------

    def _send(self) -> None:
        broker = self._broker
        while self._queue and not broker.down:
            if self._txn_id is not None and self._state in ("abortable", "fatal"):
                return  # left for abort_transaction to purge
            out = self._queue.pop(0)
            error = self._deliver(out)
            if error is not None:
                self._report(out, error)

    def _deliver(self, out: _Outgoing) -> KafkaError | None:
        """Append one record; the delivery error if it failed."""
        broker = self._broker
        parts = broker._topics.get(out.topic)
        if parts is None:
            return self._delivery_failed(KafkaError(KafkaError._UNKNOWN_TOPIC, out.topic))
        if out.partition < 0:
            out.partition = (
                zlib.crc32(out.key) % len(parts)
                if out.key is not None
                else broker.rng.randrange(len(parts))
            )
        if out.partition >= len(parts):
            return self._delivery_failed(
                KafkaError(KafkaError._UNKNOWN_PARTITION, f"{out.topic} [{out.partition}]")
            )
        fault = broker._take_fault("produce", self)
        if fault is not None:
            error = fault.error or KafkaError(KafkaError._MSG_TIMED_OUT, "injected")
            return self._delivery_failed(error)
        txn: _Txn | None = None
        if self._txn_id is not None:
            status = broker._producer_status(self._txn_id, self._epoch)
            if status == "fenced":
                return self._delivery_failed(self._fenced_error())
            if status == "timed_out":
                return self._delivery_failed(self._timed_out_error())
            txn = broker._open_txn(self._txn_id, self._epoch, self._txn_timeout_s)
        entry = _Entry(out.key, out.value, out.timestamp_ms)
        offset = broker._append(out.topic, out.partition, entry, txn)
        message = SimMessage(out.topic, out.partition, offset, out.key, out.value, out.timestamp_ms)
        self._reports.append((out.callback, None, message))
        return None

    def _delivery_failed(self, error: KafkaError) -> KafkaError:
        """A failed delivery in a transaction makes the transaction abortable (or fatal)."""
        if self._txn_id is not None and self._state not in ("abortable", "fatal"):
            if error.fatal():
                self._state, self._error = "fatal", error
            else:
                self._state = "abortable"
                self._error = KafkaError(error.code(), error.str(), txn_requires_abort=True)
        return error

    def _report(self, out: _Outgoing, error: KafkaError) -> None:
        partition = out.partition if out.partition >= 0 else None
        message = SimMessage(
            out.topic, partition, None, out.key, out.value, out.timestamp_ms, error
        )
        self._reports.append((out.callback, error, message))

    def _serve_reports(self) -> int:
        served = 0
        while self._reports:
            callback, error, message = self._reports.pop(0)
            served += 1
            if callback is not None:
                callback(error, message)
        return served

    def _enter_txn_api(self) -> SimBroker:
        self._broker.tick()
        if self._txn_id is None:
            raise KafkaException(
                KafkaError(
                    KafkaError._NOT_CONFIGURED,
                    "The Transactional API requires transactional.id to be configured",
                )
            )
        if self._state == "fatal":
            assert self._error is not None
            raise KafkaException(self._error)
        return self._broker

    def _require(self, *states: ProducerState) -> None:
        if self._state in states:
            return
        if self._state == "abortable":
            assert self._error is not None
            raise KafkaException(self._error)
        raise KafkaException(
            KafkaError(KafkaError._STATE, f"Operation not valid in state {self._state}")
        )

    def _inject(self, kind: str, default: KafkaError) -> None:
        fault = self._broker._take_fault(kind, self)
        if fault is not None:
            self._fail(fault.error or default)

    def _check_epoch(self) -> None:
        assert self._txn_id is not None
        status = self._broker._producer_status(self._txn_id, self._epoch)
        if status == "fenced":
            self._fail(self._fenced_error())
        if status == "timed_out":
            self._fail(self._timed_out_error())

    def _fail(self, error: KafkaError) -> None:
        """Enter the state ``error`` calls for, and raise it."""
        if error.fatal():
            self._state, self._error = "fatal", error
        elif error.txn_requires_abort():
            self._state, self._error = "abortable", error
        raise KafkaException(error)

    def _fenced_error(self) -> KafkaError:
        return KafkaError(
            KafkaError._FENCED,
            f"producer {self._txn_id} (epoch {self._epoch}) fenced by a newer instance",
            fatal=True,
        )

    @staticmethod
    def _timed_out_error() -> KafkaError:
        return KafkaError(
            KafkaError.INVALID_PRODUCER_EPOCH,
            "the transaction timed out and was aborted by the coordinator",
            txn_requires_abort=True,
        )


# -- factory ---------------------------------------------------------------------------------


class SimClients:
    """The ``KafkaClients`` shape (``worker/service/clients.py``) over one ``SimBroker``."""

    def __init__(self, broker: SimBroker) -> None:
        self.broker = broker
        self.consumers: list[SimConsumer] = []
        self.producers: list[SimProducer] = []

    def consumer(self, conf: dict[str, Any]) -> SimConsumer:
        consumer = SimConsumer(self.broker, conf)
        self.consumers.append(consumer)
        return consumer

    def producer(self, conf: dict[str, Any]) -> SimProducer:
        producer = SimProducer(self.broker, conf)
        self.producers.append(producer)
        return producer
