"""A broker restart under live calls: two worker processes, four calls published at real-time
pace, the broker stopped while calls are mid-way in the committed output and both workers hold
calls, kept down for a minute (twice the idle timeout) and started again on the same data dir
and port. Both workers must ride it out, and the committed output must be what the engine gives
each call alone.

The test owns its broker (it stops it), so it does not use the session's. Nothing waits for
time to pass except the outage itself, which is the scenario. Publishing starts once the group
has settled (each worker's log shows it holding partitions, together all of them), so that no
worker is still taking over partitions from the other when calls begin; the stop waits for calls
in flight in a read_committed tail and open calls in both workers' metrics; the end waits for
every call's STREAM_END. Deadlines only stop a hang.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from producer_tools.conversation import SAMPLE_RATE, default_conversations
from producer_tools.stream import CallAudio, interleave, to_chunks
from schemas import DeadLetter, TranscriptEvent
from tests.cluster import (
    MISSING_PREREQUISITE_EXIT,
    BrokerError,
    CommittedTail,
    LocalBroker,
    PacedPublisher,
    WorkerProcess,
    committed_output,
)
from tests.integration.test_worker import _config, _direct_finals
from worker.config import WorkerConfig
from worker.service.topics import create_topics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.kafka,
]

CALL_SECONDS = (40, 41, 42, 43)
PARTITIONS = 4
CHUNK_MS = 200
STAGGER_MS = 1000  # calls start (and end) a second apart
IDLE_TIMEOUT_SEC = 30  # the default: the outage below lasts twice as long
OUTAGE_S = 60
MIN_IN_FLIGHT = 2
READY_TIMEOUT_S = 400
TEST_DEADLINE_S = 600  # a hang guard (a run takes about 4 min): no step waits for it to pass


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A broker of this test's own on a temporary data dir, stopped at the end."""
    broker = LocalBroker(tmp_path / "kafka")
    try:
        broker.start()
    except BrokerError as exc:
        if exc.code == MISSING_PREREQUISITE_EXIT and not os.environ.get("CI"):
            pytest.skip(f"local Kafka broker unavailable: {exc}")
        raise
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])
def test_workers_ride_out_a_broker_restart(delivery, broker, fp64_models, tmp_path) -> None:
    deadline = time.monotonic() + TEST_DEADLINE_S
    config = _config(
        broker.bootstrap,
        float64=True,
        delivery=delivery,
        random_models="tiny",
        idle_timeout_sec=IDLE_TIMEOUT_SEC,
    )
    create_topics(config, partitions=PARTITIONS)
    calls = _calls(CALL_SECONDS)
    workers = [
        WorkerProcess(dataclasses.replace(config, instance_id=name), name, tmp_path)
        for name in ("w1", "w2")
    ]
    try:
        for w in workers:
            w.wait_ready(READY_TIMEOUT_S)
        _await_settled_group(workers, deadline)
        tail = CommittedTail(broker.bootstrap, config.output_topic)
        start_ms = int(time.time() * 1000) + 1000
        chunks = interleave(
            to_chunks(CallAudio(sid, audio), chunk_ms=CHUNK_MS, start_ms=start_ms + i * STAGGER_MS)
            for i, (sid, audio) in enumerate(calls.items())
        )
        publisher = PacedPublisher(broker.bootstrap, config.input_topic, chunks)

        in_flight = _await_calls_in_flight(tail, publisher, workers, deadline)
        broker.stop()
        stopped_at = time.monotonic()
        refused_after_stop = broker.refuses_connections()
        while time.monotonic() - stopped_at < OUTAGE_S:  # the scenario, not a synchronisation
            _assert_running(workers)
            time.sleep(1)
        refused_before_start = broker.refuses_connections()
        outage_s = time.monotonic() - stopped_at
        broker.start()

        while still_open := set(calls) - tail.ended():
            _assert_running(workers)
            assert time.monotonic() < deadline, f"no STREAM_END for {sorted(still_open)}: " + (
                _tails(workers)
            )
            tail.wait(1.0)
        publisher.join(max(1.0, deadline - time.monotonic()))
        tail.stop()
        _assert_running(workers)
        for w in workers:
            code = w.terminate()
            assert code == 0, f"{w.name} ended with {code} on SIGTERM (None: still running): " + (
                w.tail()
            )
    finally:
        for w in workers:
            w.close()

    # The situation this test is about did happen.
    assert len(in_flight) >= MIN_IN_FLIGHT, f"only {sorted(in_flight)} in flight at the stop"
    assert refused_after_stop and refused_before_start, "the broker's port still answered"
    assert outage_s >= OUTAGE_S

    events = committed_output(broker.bootstrap, config.output_topic, timeout_s=120)
    if delivery == "at_least_once":
        events = _deduplicated(events)
    ids = Counter(e.event_id for e in events)
    assert [i for i, n in ids.items() if n > 1] == [], "events committed more than once"
    ends = Counter(e.stream_id for e in events if e.kind == "STREAM_END")
    assert ends == {sid: 1 for sid in calls}
    dead = committed_output(broker.bootstrap, config.dead_letter_topic, 120, record=DeadLetter)
    assert not dead, f"good input dead-lettered: {Counter((d.stream_id, d.reason) for d in dead)}"
    finals: dict[str, list] = defaultdict(list)
    for e in events:
        if e.kind == "FINAL":
            finals[e.stream_id].append(
                (e.segment_index, e.speaker, e.text, round(e.start_s, 6), round(e.end_s, 6))
            )
    reference = _unbounded(config, max(CALL_SECONDS))
    for sid, audio in calls.items():
        assert finals[sid], f"{sid} has no FINAL"
        assert sorted(finals[sid]) == sorted(_direct_finals(fp64_models, reference, audio)), sid


def _calls(seconds: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Calls of the given lengths: the canned conversations end to end, repeated, each call
    starting from a different one."""
    convs = [c.audio for c in default_conversations().values()]
    total = sum(len(a) for a in convs)
    calls = {}
    for i, (sid, length) in enumerate(zip(_spread_ids(len(seconds)), seconds, strict=True)):
        order = convs[i % len(convs) :] + convs[: i % len(convs)]
        repeats = math.ceil(length * SAMPLE_RATE / total)
        calls[sid] = np.concatenate(order * repeats)[: length * SAMPLE_RATE]
    return calls


def _spread_ids(count: int) -> list[str]:
    """Stream ids that the producer's default partitioner (librdkafka's consistent_random:
    CRC-32 of the key) puts on different partitions, so that each worker gets calls."""
    ids: dict[int, str] = {}
    i = 0
    while len(ids) < min(count, PARTITIONS):
        ids.setdefault(zlib.crc32(f"call-{i}".encode()) % PARTITIONS, f"call-{i}")
        i += 1
    return sorted(ids.values())[:count]


def _await_settled_group(workers: list[WorkerProcess], deadline: float) -> None:
    """Wait until every worker holds partitions and together they hold all of them."""
    while True:
        owned = [w.owned_partitions() for w in workers]
        if all(owned) and set().union(*owned) == set(range(PARTITIONS)):
            return
        _assert_running(workers)
        assert time.monotonic() < deadline, f"the group never settled ({owned}): {_tails(workers)}"
        time.sleep(0.2)


def _await_calls_in_flight(
    tail: CommittedTail,
    publisher: PacedPublisher,
    workers: list[WorkerProcess],
    deadline: float,
) -> set[str]:
    """Wait until calls whose last chunk is not yet published have committed events, and every
    worker holds open calls."""
    while True:
        in_flight = tail.started() - tail.ended() - publisher.ended()
        if len(in_flight) >= MIN_IN_FLIGHT and all(w.active_streams() > 0 for w in workers):
            return in_flight
        _assert_running(workers)
        assert time.monotonic() < deadline, (
            f"never {MIN_IN_FLIGHT} calls in flight with every worker holding calls "
            f"(committed: {sorted(tail.started())}): {_tails(workers)}"
        )
        tail.wait(0.5)


def _assert_running(workers: list[WorkerProcess]) -> None:
    for w in workers:
        assert w.exit_code() is None, f"{w.name} exited {w.exit_code()}: {w.tail()}"


def _deduplicated(events: list[TranscriptEvent]) -> list[TranscriptEvent]:
    """The first copy of each event id; at-least-once may repeat an event, never change it."""
    first: dict[str, TranscriptEvent] = {}
    for e in events:
        kept = first.setdefault(e.event_id, e)
        assert kept == e, f"two different events share the id {e.event_id}: {kept} and {e}"
    return list(first.values())


def _unbounded(config: WorkerConfig, call_sec: float) -> WorkerConfig:
    """``config`` with an engine that takes a whole call at once (``_direct_finals`` pushes
    every chunk before stepping); the buffer limit changes no output."""
    engine = dataclasses.replace(config.engine, max_buffered_audio_sec=call_sec + 5.0)
    return dataclasses.replace(config, engine=engine)


def _tails(workers: list[WorkerProcess]) -> str:
    return "\n".join(f"--- {w.name}\n{w.tail()}" for w in workers)
