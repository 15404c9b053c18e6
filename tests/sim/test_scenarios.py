"""Named scenarios of issue 7, each a simulation with its fault placed where it hurts most.

Each test asserts that its situation happened (a replay ran, a partition was held, a kill
landed with a transaction open) and that the committed output equals an uninterrupted run's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from schemas import EventKind
from tests.sim.harness import (
    INPUT,
    PARTITIONS,
    TICK_SEC,
    RunResult,
    Simulation,
    _partition_of,
    audit,
    call_records,
    late_calls,
    sim_config,
)
from tests.sim.kafka import abortable


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    from producer_tools.conversation import default_conversations

    audio = next(iter(default_conversations().values())).audio
    return np.tile(audio, 1 + 70 * 16000 // len(audio))  # long enough for a 60 s call


CALL0 = "call-0@0"  # the first call of a partition: its call starts at offset 0


def _id_on(partition: int) -> str:
    """A stream id that the sim broker puts on ``partition``."""
    return next(
        f"call-{n}" for n in range(1000) if _partition_of(f"call-{n}".encode()) == partition
    )


def _run(records, factory, **kwargs) -> tuple[Simulation, RunResult]:
    sim = Simulation(0, sorted(records, key=lambda r: r.at), factory, **kwargs)
    return sim, sim.run()


def _when(condition: Callable[[Simulation], bool], action: Callable[[Simulation], None]):
    """A script that runs ``action`` at the first tick where ``condition`` holds."""
    done = False

    def step(sim: Simulation) -> None:
        nonlocal done
        if not done and condition(sim):
            done = True
            action(sim)

    return {tick: step for tick in range(0, 40_000)}, lambda: done


def _kill_mid_call_and_audit(records: list, engine_factory, key: bytes | None = None) -> RunResult:
    """Two workers; once 3 events (of the call keyed ``key``, or of any) are committed, kill
    one whose transaction holds outputs and start a replacement. The committed output must
    equal an uninterrupted run's (returned), and a call must have been rebuilt."""
    _, reference = _run(records, engine_factory, faults=False)

    def mid_call_with_open_transaction(sim: Simulation) -> bool:
        committed = [
            r for r in sim.broker.committed_records("transcripts") if key is None or r.key == key
        ]
        return len(committed) >= 3 and any(w.worker.out.produced for w in sim._live())

    def kill_it(sim: Simulation) -> None:
        victim = next(w for w in sim._live() if w.worker.out.produced)
        sim.kill(victim)
        sim._start_worker()

    script, fired = _when(mid_call_with_open_transaction, kill_it)
    sim, faulted = _run(records, engine_factory, faults=False, workers=2, script=script)
    assert fired()
    assert audit(0, reference, faulted) == []
    replays = sum(w.worker.metrics.replayed._value.get() for w in sim.workers)
    assert replays > 0, "no call was rebuilt: the kill did not land mid-call"
    return reference


def test_a_60_s_backlog_is_processed_whole_and_equals_a_live_call(engine_factory, clip) -> None:
    """Issue 7.1: a call waiting in Kafka used to fail past 30 s (`buffer_full`)."""
    call = clip[: 60 * 16000]
    live = call_records("call-0", call) + late_calls(100, clip)
    backlog = call_records("call-0", call, burst=True) + late_calls(100, clip)
    sim, held = _run(backlog, engine_factory, faults=False)
    _, paced = _run(live, engine_factory, faults=False)
    assert held.dead == [] and paced.dead == []
    assert held.events[CALL0] == paced.events[CALL0]
    assert held.events[CALL0][-1].kind == EventKind.STREAM_END
    assert sim.workers[0].worker.metrics.paused._value.get() == 0
    assert held.events[CALL0][-1].end_s == pytest.approx(60.0)


def test_an_aborted_commit_mid_call_commits_nothing_of_its_turn(engine_factory, clip) -> None:
    """Issue 7.2: after an abort, the same turn used to commit progress counting lost events."""
    records = call_records("call-0", clip[: 12 * 16000]) + late_calls(60, clip)
    _, reference = _run(records, engine_factory, faults=False)

    def has_output(sim: Simulation) -> bool:
        return any(w.worker.out.produced for w in sim._live())

    def abort(sim: Simulation) -> None:
        for w in sim._live():
            sim.broker.inject("commit_transaction", w.worker.out.producer, abortable())

    script, fired = _when(has_output, abort)
    _, faulted = _run(records, engine_factory, faults=False, script=script)
    assert fired()
    assert audit(0, reference, faulted) == []


def test_a_worker_killed_with_its_transaction_open_is_replaced_exactly(
    engine_factory, clip
) -> None:
    """Issue 7.6: the replacement must not act on a snapshot older than the committed offsets
    (the dead worker's open transaction hides the newest progress until it is fenced)."""
    calls = [
        call_records(sid, clip[: (10 + 3 * i) * 16000], start=i)
        for i, sid in enumerate(["a", "b", "c"])
    ]
    records = [r for call in calls for r in call] + late_calls(60, clip)
    _kill_mid_call_and_audit(records, engine_factory)


@pytest.mark.parametrize("lost_first", [False, True])
@pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])
def test_a_fenced_consumer_is_replaced_and_its_calls_rebuilt(
    engine_factory, clip, delivery, lost_first
) -> None:
    """Issue 7 (broker restart, at least once): librdkafka fences a static member whose own
    rejoin came back under a new member id; the worker used to exit. Now it replaces its
    consumer and takes its partitions again from the checkpoint. The fence lands with outputs
    in the open transaction; with ``lost_first`` an ``on_lost`` comes in the same poll as the
    fatal error (which librdkafka delivers once), and the turn must not drop it."""
    calls = [
        call_records(sid, clip[: (10 + 3 * i) * 16000], start=i)
        for i, sid in enumerate(["a", "b", "c"])
    ]
    records = [r for call in calls for r in call] + late_calls(60, clip)
    config = sim_config(delivery=delivery)
    _, reference = _run(records, engine_factory, faults=False, config=config)

    def mid_call(sim: Simulation) -> bool:
        return len(sim.broker.committed_records("transcripts")) >= 3 and any(
            w.worker.parts and w.worker.out.produced and sim._member(w) for w in sim._live()
        )

    def fence(sim: Simulation) -> None:
        victim = next(w for w in sim._live() if w.worker.parts and sim._member(w))
        sim.broker.fence(victim.worker.consumer, lost_first=lost_first)

    script, fired = _when(mid_call, fence)
    sim, faulted = _run(records, engine_factory, faults=False, config=config, script=script)
    assert fired()
    assert audit(0, reference, faulted, at_least_once=delivery == "at_least_once") == []
    assert faulted.faults["fatal_exit"] == 0
    worker = sim.workers[0].worker
    assert worker.metrics.consumer_restarts._value.get() == 1
    assert worker.metrics.replayed._value.get() > 0, "no call was rebuilt after the fence"


def test_a_consumer_fenced_while_a_partition_is_held_comes_back_unheld(
    engine_factory, clip
) -> None:
    """The broken consumer's pauses go with it: a call waiting for a slot is taken again by
    the new consumer."""
    first, second = _id_on(0), _id_on(1)
    records = (
        call_records(first, clip[: 8 * 16000])
        + call_records(second, clip[: 6 * 16000], start=1.0)
        + late_calls(60, clip)
    )
    config = sim_config(max_streams=1, max_streams_hard=1)
    _, reference = _run(records, engine_factory, faults=False, config=config, workers=1)

    def holding(sim: Simulation) -> bool:
        return any(w.worker.holds and sim._member(w) for w in sim._live())

    def fence(sim: Simulation) -> None:
        sim.broker.fence(next(w for w in sim._live() if w.worker.holds).worker.consumer)

    script, fired = _when(holding, fence)
    sim, faulted = _run(
        records, engine_factory, faults=False, config=config, workers=1, script=script
    )
    assert fired()
    assert audit(0, reference, faulted) == []
    assert sim.workers[0].worker.metrics.consumer_restarts._value.get() == 1


@pytest.mark.parametrize("spaced", [False, True])
def test_a_consumer_fenced_again_and_again_stops_the_worker(engine_factory, clip, spaced) -> None:
    """Fenced over and over (as two workers with one instance id would fence each other),
    past ``max_consumer_restarts`` within ``consumer_restart_window_sec``, the worker exits
    and its replacement goes on; the same fences spaced wider than the window are ridden out.
    (The sim has no static membership, so the other worker is played by a script.)"""
    records = call_records("a", clip[: 30 * 16000]) + late_calls(60, clip)
    config = sim_config(max_consumer_restarts=2, consumer_restart_window_sec=5)
    _, reference = _run(records, engine_factory, faults=False, config=config)
    every = 6.0 if spaced else 1.0  # seconds between fences
    fences = 0

    def fence_the_first(sim: Simulation) -> None:
        nonlocal fences
        first = sim.workers[0]
        if fences < 3 and first.alive and sim._member(first):
            fences += 1
            sim.broker.fence(first.worker.consumer)

    ticks = int(every / TICK_SEC)
    script = {tick: fence_the_first for tick in range(ticks, 40_000, ticks)}
    sim, faulted = _run(records, engine_factory, faults=False, config=config, script=script)
    assert fences == 3
    restarts = sim.workers[0].worker.metrics.consumer_restarts._value.get()
    if spaced:
        assert faulted.faults["fatal_exit"] == 0 and restarts == 3
    else:
        assert faulted.faults["fatal_exit"] == 1 and restarts == 2
    assert audit(0, reference, faulted) == []


def test_a_worker_stopped_by_an_error_commits_nothing_on_its_way_out(engine_factory, clip) -> None:
    """An error out of the loop (a codec or registry failure, a bug) stops the worker; leaving
    the group revokes its partitions, and a revocation used to checkpoint: the open
    transaction (outputs the failed turn counted) and the offsets were committed on the way
    out. Now nothing is; the next owner rebuilds from the last checkpoint."""
    records = call_records("a", clip[: 20 * 16000]) + late_calls(60, clip)
    _, reference = _run(records, engine_factory, faults=False)
    seen: dict[str, object] = {}

    def open_outputs(sim: Simulation) -> bool:
        return len(sim.broker.committed_records("transcripts")) >= 2 and any(
            w.worker.out.produced for w in sim._live()
        )

    def fail_and_run(sim: Simulation) -> None:
        w = next(w for w in sim._live() if w.worker.out.produced)
        seen["events"] = len(sim.broker.committed_records("transcripts"))
        seen["offsets"] = [sim.broker.committed_offset("sim", INPUT, p) for p in range(PARTITIONS)]

        def broken() -> None:
            raise RuntimeError("injected: the loop failed")

        w.worker.start = lambda: None  # already started
        w.worker.run_once = broken
        with pytest.raises(RuntimeError, match="injected"):
            w.worker.run()
        seen["events_after"] = len(sim.broker.committed_records("transcripts"))
        seen["offsets_after"] = [
            sim.broker.committed_offset("sim", INPUT, p) for p in range(PARTITIONS)
        ]
        w.alive = False
        sim._start_worker()

    script, fired = _when(open_outputs, fail_and_run)
    _, faulted = _run(records, engine_factory, faults=False, script=script)
    assert fired()
    assert seen["events_after"] == seen["events"], "the failed worker committed its outputs"
    assert seen["offsets_after"] == seen["offsets"], "the failed worker committed offsets"
    assert audit(0, reference, faulted) == []


def test_a_held_partition_resumes_after_an_abort(engine_factory, clip) -> None:
    """Issue 7.4: a rebuild used to leave partitions paused for good. One slot, two calls on
    two partitions: the second waits (held), then an abort rebuilds while it waits."""
    first, second = _id_on(0), _id_on(1)
    records = (
        call_records(first, clip[: 8 * 16000])
        + call_records(second, clip[: 6 * 16000], start=1.0)
        + late_calls(60, clip)
    )
    config = sim_config(max_streams=1, max_streams_hard=1)
    _, reference = _run(records, engine_factory, faults=False, config=config, workers=1)

    def holding(sim: Simulation) -> bool:
        return any(w.worker.holds for w in sim._live())

    def abort(sim: Simulation) -> None:
        for w in sim._live():
            sim.broker.inject("commit_transaction", w.worker.out.producer, abortable())

    script, fired = _when(holding, abort)
    _, faulted = _run(
        records, engine_factory, faults=False, config=config, workers=1, script=script
    )
    assert fired()
    assert audit(0, reference, faulted) == []


def test_a_reused_stream_id_is_two_calls_with_their_own_ids(engine_factory, clip) -> None:
    """Issue 7.7: the same rule on every worker: sequence 0 after the end starts a new call."""
    records = (
        call_records("again", clip[: 4 * 16000])
        + call_records("again", clip[16000 : 5 * 16000], start=8.0)
        + late_calls(60, clip)
    )
    _, result = _run(records, engine_factory, faults=False)
    calls = sorted(call for call in result.events if call.startswith("again@"))
    assert len(calls) == 2 and "again@?" not in calls
    for call in calls:
        assert [e.kind for e in result.events[call]].count(EventKind.STREAM_END) == 1
    ids = [e.event_id for call in calls for e in result.events[call]]
    assert len(set(ids)) == len(ids)
    assert result.dead == []


def test_a_call_whose_start_is_past_retention_ends_with_a_dead_letter(engine_factory, clip) -> None:
    """Issue 7.7: rebuilt from the middle, a call used to come out with shifted times and
    reused event ids. Now it is ended with `replay_unavailable` and nothing more of it."""
    records = call_records("long", clip[: 20 * 16000])
    partition = _partition_of(b"long")

    def committed_some(sim: Simulation) -> bool:
        return len(sim.broker.committed_records("transcripts")) >= 2

    def expire_and_kill(sim: Simulation) -> None:
        low, _, _ = sim.broker.watermarks(INPUT, partition)
        sim.broker.delete_records_before(INPUT, partition, low + 1)
        for w in sim._live():
            sim.kill(w)
        sim._start_worker()

    script, fired = _when(committed_some, expire_and_kill)
    sim = Simulation(
        0,
        records,
        engine_factory,
        faults=False,
        script=script,
        done=lambda sim: bool(sim.broker.committed_records("dead")) and sim.quiescent(),
    )
    result = sim.run()
    assert fired()
    reasons = [reason for _, _, reason in result.dead]
    assert reasons.count("replay_unavailable") == 1
    # The call's chunks after that point are each rejected: it is no longer open.
    assert set(reasons) == {"replay_unavailable", "stream_not_open"}
    # Its first record is gone from the topic, so the auditor cannot name its call: "long@?".
    kinds = [
        e.kind for call, events in result.events.items() if call.startswith("long@") for e in events
    ]
    assert EventKind.STREAM_END not in kinds and len(kinds) >= 2
    assert partition < PARTITIONS


# -- channel modes (issue 11) ------------------------------------------------------------------

SPLIT = {"channel_mode": "split", "channel_roles": "agent,customer"}


@pytest.fixture(scope="module")
def stereo() -> np.ndarray:
    """A two-voice canned conversation with one voice per channel: ``(n, 2)``."""
    from producer_tools.conversation import default_conversations

    talk = next(c for c in default_conversations().values() if c.tracks.shape[0] == 2)
    return np.ascontiguousarray(talk.tracks.T)


def _as_heard(events) -> list[tuple]:
    """What a channel's events say, without what the call's numbering adds (ids, indexes)."""
    return [(e.kind, e.revision, e.speaker, e.start_s, e.end_s, e.text, e.words) for e in events]


def test_a_split_call_is_each_channel_as_its_own_mono_call(engine_factory, stereo) -> None:
    """Issue 11: in split mode each channel is its own diarized stream, its events tagged with
    the channel and role; a channel's events equal that channel sent as a mono call. In
    channel:N mode only channel N is heard."""
    calls = {name: _id_on(p) for name, p in (("split", 0), ("left", 1), ("right", 2))}
    one = {"channel_mode": "channel:1", "channel_roles": "agent,customer"}
    records = (
        call_records(calls["split"], stereo, metadata=SPLIT)
        + call_records(calls["left"], stereo[:, 0].copy())
        + call_records(calls["right"], stereo[:, 1].copy())
        + call_records("only-1", stereo, start=0.5, metadata=one)
        + call_records("bad-mode", stereo[:16000], start=1, metadata={"channel_mode": "both"})
        + late_calls(60, stereo[:, 0].copy())
    )
    _, result = _run(records, engine_factory, faults=False)
    # A mode the worker does not know refuses the call's first chunk, so the call never opens.
    reasons = [reason for _, _, reason in result.dead]
    assert reasons == ["unsupported_channel_mode"] + ["stream_not_open"] * 4
    assert not [call for call in result.events if call.startswith("bad-mode@")]
    (only,) = [events for call, events in result.events.items() if call.startswith("only-1@")]
    assert {(e.channel, e.role) for e in only[:-1]} == {(1, "customer")}
    assert _as_heard(only) == _as_heard(result.events[f"{calls['right']}@0"])
    split = result.events[f"{calls['split']}@0"]
    assert [e.kind for e in split].count(EventKind.STREAM_END) == 1
    assert split[-1].kind == EventKind.STREAM_END and split[-1].channel is None
    body = split[:-1]
    assert {(e.channel, e.role) for e in body} == {(0, "agent"), (1, "customer")}
    for channel, mono in ((0, "left"), (1, "right")):
        alone = result.events[f"{calls[mono]}@0"]
        assert all(e.channel is None and e.role is None for e in alone)
        assert _as_heard([e for e in body if e.channel == channel]) == _as_heard(alone[:-1])
    # One transcript: segment indexes numbered across the call, each opened once, in order.
    firsts = [e.segment_index for e in body if e.revision == 0]
    assert firsts == list(range(len(firsts))) and split[-1].segment_index == len(firsts)
    assert len({e.event_id for e in split}) == len(split)


def test_a_worker_killed_mid_split_call_is_replaced_exactly(engine_factory, stereo) -> None:
    """Issue 11: a split call's lanes are rebuilt on replay like calls; the output of a kill
    mid-call equals an uninterrupted run's."""
    records = (
        call_records("duo", np.tile(stereo, (2, 1)), metadata=SPLIT)
        + call_records("solo", stereo[:, 0].copy(), start=1)
        + late_calls(60, stereo[:, 0].copy())
    )
    reference = _kill_mid_call_and_audit(records, engine_factory, key=b"duo")
    assert any(e.channel == 1 for e in reference.events["duo@0"])
