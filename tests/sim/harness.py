"""Deterministic simulation of workers under faults, and the auditor of what they committed.

One seed fixes everything: the calls (lengths, which end by end-of-stream and which just stop),
the input records (chunking, repeats a producer retry would make, a few bad records), the
publishing schedule, and, in a faulted run, the faults: worker kills and replacements, graceful
stops, forced rebalances, lost partitions, fenced consumers, aborted/retried/fenced
transactions, lost delivery, the broker down for a while. The real ``Worker`` and the real
engine (tiny models) run against the in-memory broker of ``tests/sim/kafka.py`` on a simulated
clock; nothing sleeps.

The auditor compares a faulted run with an uninterrupted one on the same input: every call's
committed events must be the same list (ids and content), no event id twice, exactly one
STREAM_END per call and last, and the same dead letters (a fault must never put one there).
``python -m tests.sim SEEDS`` runs many seeds; a failing seed replays exactly.
"""

from __future__ import annotations

import logging
import random
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from producer_tools.stream import CallAudio, to_chunks
from schemas import AudioChunk, CodecError, DeadLetter, RecordCodec, TranscriptEvent, make_event_id
from tests.sim.kafka import SimBroker, SimClients, SimClock, abortable, fatal, retriable
from worker.config import WorkerConfig, load_config
from worker.metrics import Health, Metrics
from worker.service.loop import Engine, FatalWorkerError, ModelNames, Worker

log = logging.getLogger(__name__)

INPUT, OUTPUT, DEAD, PROGRESS = "audio", "transcripts", "dead", "progress"
PARTITIONS = 3
TICK_SEC = 0.05
MAX_TICKS = 40_000


@dataclass(frozen=True)
class Published:
    """An input record and the simulated time it is sent at."""

    at: float
    key: bytes | None
    value: bytes


def _partition_of(key: bytes) -> int:
    return zlib.crc32(key) % PARTITIONS  # the sim broker's partitioner


def call_records(
    sid: str,
    clip: np.ndarray,
    *,
    start: float = 0.0,
    chunk_ms: int = 200,
    burst: bool = False,
    end_of_stream: bool = True,
    metadata: dict[str, str] | None = None,
) -> list[Published]:
    """One call's records: at real-time pace from ``start``, or all at ``start`` (a backlog).
    ``clip`` is mono, or ``(n, channels)``; ``metadata`` goes on the first chunk."""
    codec = RecordCodec(AudioChunk)
    chunks = to_chunks(
        CallAudio(sid, clip),
        chunk_ms=chunk_ms,
        start_ms=1_700_000_000_000 + int(start * 1000),
        metadata=metadata,
    )
    if not end_of_stream:  # the caller's producer died
        chunks[-1] = _replace(chunks[-1], end_of_stream=False)
    return [
        Published(
            start if burst else start + c.sequence * chunk_ms / 1000, sid.encode(), codec.encode(c)
        )
        for c in chunks
    ]


def late_calls(after: float, clip: np.ndarray) -> list[Published]:
    """A short call on every partition at ``after``: event time moves past calls that stopped."""
    out = []
    for p in range(PARTITIONS):
        key = next(
            f"late-{p}-{n}" for n in range(1000) if _partition_of(f"late-{p}-{n}".encode()) == p
        )
        out += call_records(key, clip[:16000], start=after)
    return out


def make_input(rng: random.Random, calls: int, audio: list[np.ndarray]) -> list[Published]:
    """Calls at real-time pace (some all at once, as a backlog; a few long) with staggered
    starts, a few repeats, bad records and reused stream ids, and a late call per partition
    that moves event time past every call that just stopped."""
    out: list[Published] = []
    ended: list[tuple[str, float]] = []  # calls that sent end-of-stream, and when
    for i in range(calls):
        sid = f"call-{i}"
        clip = audio[rng.randrange(len(audio))]
        long = rng.random() < 0.1
        seconds = rng.uniform(15.0, 25.0) if long else rng.uniform(2.0, 7.0)
        seconds = min(seconds, len(clip) / 16000)
        start = rng.uniform(0.0, 6.0)
        if ended and rng.random() < 0.1:  # the id of a call that is over, for a new call
            sid, after = ended[rng.randrange(len(ended))]
            start = after + rng.uniform(0.5, 3.0)
        eos = rng.random() >= 0.25
        records = call_records(
            sid,
            clip[: int(seconds * 16000)],
            start=start,
            chunk_ms=rng.choice([100, 200, 320]),
            burst=rng.random() < 0.3,
            end_of_stream=eos,
        )
        if eos:
            ended.append((sid, records[-1].at))
        for rec in records:
            out.append(rec)
            if rng.random() < 0.03:  # a producer retry without idempotence: the same bytes
                out.append(Published(rec.at + 0.01, rec.key, rec.value))
        if rng.random() < 0.3:
            out.append(Published(start + 0.5, sid.encode(), b"\x07not avro"))
    end = max(r.at for r in out)
    out += late_calls(end + 40.0, audio[0])
    out.sort(key=lambda r: r.at)
    return out


def seed_config(seed: int) -> WorkerConfig:
    """The settings a seed runs with: some at least once, some with very few call slots."""
    rng = random.Random(seed * 31 + 7)
    overrides: dict[str, Any] = {}
    if rng.random() < 0.25:
        overrides["delivery"] = "at_least_once"
    if rng.random() < 0.2:
        overrides["max_streams"] = overrides["max_streams_hard"] = 2
    return sim_config(**overrides)


def _replace(chunk: AudioChunk, **changes: Any) -> AudioChunk:
    import dataclasses

    return dataclasses.replace(chunk, **changes)


def sim_config(**overrides: Any) -> WorkerConfig:
    return load_config(
        environ={},
        overrides={
            "input_topic": INPUT,
            "output_topic": OUTPUT,
            "dead_letter_topic": DEAD,
            "progress_topic": PROGRESS,
            "group_id": "sim",
            "idle_timeout_sec": 30,
            "transaction_timeout_ms": 10_000,
            "recovery_timeout_sec": 60,
            "kafka_retry_sec": 20,
            "session_timeout_ms": 6_000,
            "max_streams": 8,
            "transaction_interval_ms": 1000,  # wide windows between checkpoints for faults
            "float64": True,
            **overrides,
        },
    )


@dataclass
class _SimWorker:
    name: str
    worker: Worker
    alive: bool = True


@dataclass
class RunResult:
    events: dict[str, list[TranscriptEvent]]  # committed, per call, in order
    dead: list[tuple[int, int, str]]  # committed dead letters: (partition, offset, reason)
    faults: Counter[str] = field(default_factory=Counter)
    leftover_progress: list[str] = field(default_factory=list)  # calls never tombstoned
    replays: int = 0  # partitions rebuilt from a checkpoint
    ticks: int = 0


class Simulation:
    """One run: workers, broker, clock and (optionally) faults, all from one seed."""

    def __init__(
        self,
        seed: int,
        records: list[Published],
        engine_factory: Callable[[], Engine],
        faults: bool,
        config: WorkerConfig | None = None,
        script: dict[int, Callable[[Simulation], None]] | None = None,
        workers: int | None = None,
        done: Callable[[Simulation], bool] | None = None,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed * 7919 + (1 if faults else 0))
        self.clock = SimClock()
        self.broker = SimBroker(self.clock, random.Random(seed))
        for topic in (INPUT, OUTPUT, DEAD, PROGRESS):
            self.broker.create_topic(topic, PARTITIONS)
        self.clients = SimClients(self.broker)
        self.records = records
        self.engine_factory = engine_factory
        self.faults = faults
        self.cfg = config or sim_config()
        self.workers: list[_SimWorker] = []
        self.script = script or {}  # tick -> an action on the simulation (named scenarios)
        self.first_workers = workers or (2 if faults else 1)
        self.done = done or Simulation.quiescent  # when the run is over
        # Some seeds publish the input transactionally: its topic then has commit markers.
        self.input_txn = random.Random(seed * 13 + 5).random() < 0.25
        input_conf = {"bootstrap.servers": "sim"}
        if self.input_txn:
            input_conf["transactional.id"] = "input"
        self.input = self.clients.producer(input_conf)
        if self.input_txn:
            self.input.init_transactions(5)
        self.result = RunResult({}, [])
        self._next_worker = 0
        self._busy: set[str] = set()  # workers inside a blocking call (sleeping)
        self.cursor = 0  # input records published so far
        self._down_until: float | None = None

    # -- actors ------------------------------------------------------------------------------

    def _start_worker(self) -> None:
        self._next_worker += 1
        name = f"w{self._next_worker}"
        config = load_config(environ={}, overrides={**_as_overrides(self.cfg), "instance_id": name})
        worker = Worker(
            config,
            self.engine_factory(),
            ModelNames("diarizer", "asr"),
            Metrics(),
            Health(stale_after_sec=1e9),
            clients=self.clients,
            clock=self.clock.now,
            wall_ms=lambda: int(1_700_000_000_000 + self.clock.now() * 1000),
            sleep=lambda seconds: self._sleep(sim_worker, seconds),
        )
        sim_worker = _SimWorker(name, worker)
        self.workers.append(sim_worker)
        try:
            worker.start()
        except FatalWorkerError as exc:  # e.g. the broker is down for longer than it retries
            log.info("sim: %s could not start: %s", name, exc)
            self.result.faults["fatal_exit"] += 1
            self._kill(sim_worker)

    def _member(self, w: _SimWorker) -> bool:
        """Whether the worker is in its group now (not evicted, not between generations)."""
        return w.worker.consumer.memberid() in self.broker.assignments(self.cfg.group_id)

    def _live(self) -> list[_SimWorker]:
        return [w for w in self.workers if w.alive]

    def _world(self) -> None:
        """What goes on whoever runs: input arrives, an outage ends."""
        if self._down_until is not None and self.clock.now() >= self._down_until:
            self.broker.set_down(False)
            self._down_until = None
        self.cursor = self._publish_due(self.cursor)

    def _sleep(self, sleeper: _SimWorker, seconds: float) -> None:
        """A worker waits (retrying, or for a stale snapshot): time passes for everyone, and
        the other workers keep turning, as separate processes would."""
        self._busy.add(sleeper.name)
        try:
            for _ in range(max(1, round(seconds / TICK_SEC))):
                self.clock.advance(TICK_SEC)
                self._world()
                for w in self._live():
                    if w.name not in self._busy:
                        self._busy.add(w.name)
                        try:
                            self._turn(w)
                        finally:
                            self._busy.discard(w.name)
        finally:
            self._busy.discard(sleeper.name)

    def _publish_due(self, cursor: int) -> int:
        if self.broker.down:
            return cursor
        due = cursor
        while due < len(self.records) and self.records[due].at <= self.clock.now():
            due += 1
        if due == cursor:
            return cursor
        for rec in self.records[cursor:due]:
            ts = int(1_700_000_000_000 + rec.at * 1000)
            # One transaction per record: the markers, and so the offsets, are the same in
            # every run of the seed.
            if self.input_txn:
                self.input.begin_transaction()
            self.input.produce(INPUT, value=rec.value, key=rec.key, timestamp=ts)
            if self.input_txn:
                self.input.commit_transaction(5)
        return due

    def _turn(self, w: _SimWorker) -> None:
        try:
            w.worker.run_once()
        except FatalWorkerError as exc:
            # A worker that stops on a fatal error is restarted by its orchestrator.
            log.info("sim: %s stopped: %s", w.name, exc)
            self.result.faults["fatal_exit"] += 1
            self._kill(w)

    def kill(self, w: _SimWorker) -> None:
        """SIGKILL: the worker stops mid-whatever; its open transaction stays open."""
        self.result.faults["kill"] += 1
        self._kill(w)

    def _kill(self, w: _SimWorker) -> None:
        w.alive = False
        self.broker.kill(w.worker.consumer)

    # -- faults ------------------------------------------------------------------------------

    def _maybe_fault(self) -> None:
        if not self.faults or self.rng.random() > 0.01:
            return
        live = self._live()
        kind = self.rng.choice(
            [
                "kill",
                "kill",
                "stop",
                "start",
                "rebalance",
                "lose",
                "fence",
                "txn_abort",
                "txn_retry",
                "txn_fatal",
                "offsets_abort",
                "delivery",
                "queue_full",
                "down",
            ]
        )
        target = self.rng.choice(live) if live else None
        self.result.faults[kind] += 1
        if kind == "kill" and target and len(live) > 1:
            self._kill(target)
            self._start_worker()
        elif kind == "stop" and target:
            target.worker.stop()
            target.worker._drain()
            target.worker.close()
            target.alive = False
            self._start_worker()
        elif kind == "start" and len(live) < 3:
            self._start_worker()
        elif kind == "rebalance":
            self.broker.rebalance(self.cfg.group_id)
        elif kind == "lose" and target and self._member(target):
            self.broker.lose(target.worker.consumer, notice_after=self.rng.uniform(0, 3))
        elif kind == "fence" and target and self._member(target):
            self.broker.fence(target.worker.consumer, lost_first=self.rng.random() < 0.5)
        elif kind == "txn_abort" and target:
            self.broker.inject("commit_transaction", target.worker.out.producer, abortable())
        elif kind == "txn_retry" and target:
            self.broker.inject(
                "commit_transaction",
                target.worker.out.producer,
                retriable(),
                applied=self.rng.random() < 0.5,
            )
        elif kind == "txn_fatal" and target:
            self.broker.inject("commit_transaction", target.worker.out.producer, fatal())
        elif kind == "offsets_abort" and target:
            self.broker.inject("send_offsets_to_transaction", target.worker.out.producer)
        elif kind == "delivery" and target:
            self.broker.inject("produce", target.worker.out.producer)
        elif kind == "queue_full" and target:
            self.broker.inject("produce_queue_full", target.worker.out.producer)
        elif kind == "down" and self._down_until is None:
            self.broker.set_down(True)
            # Now and then longer than kafka_retry_sec: transactions time out and abort.
            self._down_until = self.clock.now() + self.rng.uniform(1, 30)

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> RunResult:
        for _ in range(self.first_workers):
            self._start_worker()
        for tick in range(MAX_TICKS):
            self._world()
            if tick in self.script:
                self.script[tick](self)
            self._maybe_fault()
            live = self._live()
            if not live:
                self._start_worker()
                live = self._live()
            for w in self.rng.sample(live, len(live)):
                self._turn(w)
            self.clock.advance(TICK_SEC)
            if self.cursor == len(self.records) and tick % 20 == 0 and self.done(self):
                self.result.ticks = tick
                break
        else:
            raise AssertionError(f"seed {self.seed}: the run did not settle in {MAX_TICKS} ticks")
        for w in self._live():
            w.worker.stop()
            w.worker._drain()
        self._collect()
        return self.result

    def quiescent(self) -> bool:
        """Every input record handled and committed, no call left open (every call of every
        stream id, ids are reused, has ended and its end is committed), and no transaction
        open (a killed worker's hides what was committed after it until it times out)."""
        if any(started is not None for started in self.broker.open_transactions().values()):
            return False
        last: dict[int, int] = {}
        for record in self.broker.all_records(INPUT):
            last[record.partition] = max(last.get(record.partition, -1), record.offset)
        for partition, offset in last.items():
            committed = self.broker.committed_offset(self.cfg.group_id, INPUT, partition)
            if committed is None or committed <= offset:
                return False
        latest: dict[bytes, bytes | None] = {}
        for record in self.broker.committed_records(PROGRESS):
            latest[record.key] = record.value
        return not any(value and key.count(b"/") > 1 for key, value in latest.items())

    def _committed(self, topic: str) -> list[tuple[bytes, bytes]]:
        """Committed records with a value (no tombstones), in partition and offset order."""
        return [(r.key, r.value) for r in self.broker.committed_records(topic) if r.value]

    def _collect(self) -> None:
        events = RecordCodec(TranscriptEvent)
        dead = RecordCodec(DeadLetter)
        chunks = RecordCodec(AudioChunk)
        starts: dict[str, list[int]] = defaultdict(list)  # where each stream id's calls may start
        for record in self.broker.all_records(INPUT):
            try:
                chunk = chunks.decode(record.value)
            except CodecError:
                continue
            if chunk.sequence == 0:
                starts[chunk.stream_id].append(record.offset)
        by_call: dict[str, list[TranscriptEvent]] = defaultdict(list)
        for _, value in self._committed(OUTPUT):
            event = events.decode(value)
            by_call[_call_of(event, starts[event.stream_id])].append(event)
        self.result.events = dict(by_call)
        latest: dict[bytes, bytes | None] = {}
        for record in self.broker.committed_records(PROGRESS):
            latest[record.key] = record.value
        self.result.leftover_progress = sorted(
            key.decode() for key, value in latest.items() if value and key.count(b"/") > 1
        )
        self.result.dead = sorted(
            (d.source_partition, d.source_offset, d.reason)
            for d in (dead.decode(v) for _, v in self._committed(DEAD))
        )


def _first_of_each(events: list[TranscriptEvent]) -> list[TranscriptEvent]:
    """Events with repeats dropped (what a reader deduplicating on ``event_id`` keeps)."""
    seen: set[str] = set()
    return [e for e in events if not (e.event_id in seen or seen.add(e.event_id))]


def _call_of(event: TranscriptEvent, starts: list[int]) -> str:
    """``stream@offset``: the call an event belongs to (a stream id may name several calls)."""
    for offset in starts:
        if make_event_id(event.stream_id, event.segment_index, event.revision, offset) == (
            event.event_id
        ):
            return f"{event.stream_id}@{offset}"
    return f"{event.stream_id}@?"


def _as_overrides(config: WorkerConfig) -> dict[str, Any]:
    import dataclasses

    out = {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "engine"
    }
    out.update({f.name: getattr(config.engine, f.name) for f in dataclasses.fields(config.engine)})
    return out


def audit(
    seed: int, reference: RunResult, faulted: RunResult, at_least_once: bool = False
) -> list[str]:
    """What the faulted run committed that the uninterrupted one did not, as violations. At
    least once, repeats (and a repeat out of order) are allowed: each call's events, repeats
    dropped, must be the reference's, and every reference dead letter must be there."""
    problems = []
    if faulted.leftover_progress:
        problems.append(f"progress of ended calls left behind: {faulted.leftover_progress[:3]}")
    for call, events in faulted.events.items():
        ids = Counter(e.event_id for e in events)
        twice = [i for i, n in ids.items() if n > 1]
        if twice and not at_least_once:
            problems.append(f"{call}: {len(twice)} event ids committed twice")
        ends = [i for i, e in enumerate(_first_of_each(events)) if e.kind == "STREAM_END"]
        if len(ends) != 1 or (not at_least_once and ends != [len(events) - 1]):
            problems.append(f"{call}: STREAM_END at {ends} of {len(events)} events")
    for call in sorted(set(reference.events) | set(faulted.events)):
        want = reference.events.get(call, [])
        got = faulted.events.get(call, [])
        if at_least_once:
            # Every event at least once; after a lost delivery a repeat may come out of order.
            got = sorted(_first_of_each(got), key=lambda e: e.event_id)
            want = sorted(want, key=lambda e: e.event_id)
        if got != want:
            first = next(
                (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                min(len(got), len(want)),
            )
            problems.append(
                f"{call}: {len(got)} events committed, the uninterrupted run {len(want)}; "
                f"first difference at event {first}"
            )
    extra = sorted(set(faulted.dead) - set(reference.dead))
    missing = sorted(set(reference.dead) - set(faulted.dead))
    repeated = len(faulted.dead) - len(set(faulted.dead))
    if extra or missing or (repeated and not at_least_once):
        problems.append(
            f"dead letters: extra {extra[:5]}, missing {missing[:5]}, repeated {repeated}"
        )
    return [f"seed {seed}: {p}" for p in problems]


def run_seed(
    seed: int, engine_factory: Callable[[], Engine], clips: list[np.ndarray], calls: int = 4
) -> tuple[list[str], RunResult]:
    """One seed: its input, an uninterrupted run and a faulted run, audited."""
    records = make_input(random.Random(seed), calls, clips)
    config = seed_config(seed)
    reference = Simulation(seed, records, engine_factory, faults=False, config=config).run()
    faulted = Simulation(seed, records, engine_factory, faults=True, config=config).run()
    alo = config.delivery == "at_least_once"
    return audit(seed, reference, faulted, at_least_once=alo), faulted
