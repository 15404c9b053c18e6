"""worker.engine.engine: the StreamingEngine's API, batching caps, failures and determinism.

Runs the tiny random-weight models on the CPU in float32. Their transcripts are nonsense but
every tensor, cache and code path is the real one; the comparison with NeMo's own pipeline is
the golden test's job, here a run is compared with other runs of the engine.

Some tests reach into ``engine._streams`` to plant a broken state in one stream: there is no
public way to break a stream's model state, and that is the failure the engine must contain.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np
import pytest

from producer_tools.conversation import default_conversations
from worker.engine.config import EngineConfig
from worker.engine.engine import (
    SequenceSpan,
    StreamError,
    StreamingEngine,
    StreamUpdate,
)
from worker.engine.models import LoadedModels
from worker.engine.transcript import SegmentUpdate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLE_RATE = 16000


@pytest.fixture(scope="module")
def calls() -> dict[str, np.ndarray]:
    """The four canned conversations, 11-15 s each."""
    return {name: c.audio for name, c in default_conversations().items()}


@pytest.fixture(scope="module")
def short_calls(calls: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: audio[: 6 * SAMPLE_RATE] for name, audio in calls.items()}


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


@dataclass
class Run:
    """Everything a run of the engine handed out, per stream."""

    updates: dict[str, list[StreamUpdate]] = field(default_factory=lambda: defaultdict(list))
    pushed: dict[str, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, StreamError] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)
    instance_counts: list[int] = field(default_factory=list)  # active speaker instances per step

    def finals(self, stream_id: str) -> list[SegmentUpdate]:
        return [s for u in self.updates[stream_id] for s, _ in u.segments if s.final]

    def spans(self, stream_id: str) -> list[tuple[SegmentUpdate, SequenceSpan]]:
        return [pair for u in self.updates[stream_id] for pair in u.segments]


StepHook = Callable[[StreamingEngine, int], None]


def run_calls(
    models: LoadedModels,
    calls: dict[str, np.ndarray],
    config: EngineConfig | None = None,
    *,
    piece_sizes: tuple[int, ...] | dict[str, tuple[int, ...]] = (SAMPLE_RATE,),
    start_tick: dict[str, int] | None = None,
    before_step: StepHook | None = None,
) -> Run:
    """Every tick pushes one piece of each started call (ending it when its audio is used up),
    then steps while any stream is ready. ``before_step(engine, step_index)`` runs before each
    step. Sequence numbers are ``1000 + 10 * tick``. ``piece_sizes`` cycle, per call if a dict."""
    engine = StreamingEngine(models, config or EngineConfig())
    run = Run()
    cursor = dict.fromkeys(calls, 0)
    per_call = piece_sizes if isinstance(piece_sizes, dict) else dict.fromkeys(calls, piece_sizes)
    sizes = {name: itertools.cycle(per_call[name]) for name in calls}
    starts = start_tick or {}
    waiting = set(calls)
    steps = 0
    for tick in itertools.count():
        for name, audio in calls.items():
            if name not in waiting or tick < starts.get(name, 0):
                continue
            if cursor[name] == 0 and not engine.has_stream(name):
                engine.add_stream(name)
            if not engine.has_stream(name):  # failed or dropped
                waiting.discard(name)
                continue
            piece = audio[cursor[name] : cursor[name] + next(sizes[name])]
            sequence = 1000 + 10 * tick
            run.pushed[name].append((cursor[name], sequence))
            engine.push_audio(name, piece, sequence=sequence)
            cursor[name] += len(piece)
            if cursor[name] >= len(audio):
                engine.end_stream(name)
                waiting.discard(name)
        while engine.ready_streams():
            if before_step is not None:
                before_step(engine, steps)
            for update in engine.step():
                run.updates[update.stream_id].append(update)
                if update.error is not None:
                    run.errors[update.stream_id] = update.error
            run.batch_sizes.append(engine.last_timing.streams)
            run.instance_counts.append(engine.last_timing.instances)
            steps += 1
        if not waiting and not engine.stream_ids:
            return run
    raise AssertionError("unreachable")


def segment_key(seg: SegmentUpdate) -> tuple:
    return (seg.segment_index, seg.revision, seg.speaker, seg.start_s, seg.end_s, seg.text)


def corrupt_asr_cache(engine: StreamingEngine, stream_id: str) -> None:
    """Cut one speaker instance's attention cache short: gathering or stepping it fails."""
    instance = next(iter(engine._streams[stream_id].model.speakers.values()))
    instance.cache_last_channel = instance.cache_last_channel[:, :, :5]


# --- the API -----------------------------------------------------------------------------------


def test_adding_a_stream_twice_is_refused(tiny_models: LoadedModels) -> None:
    engine = StreamingEngine(tiny_models)
    engine.add_stream("a")
    with pytest.raises(ValueError, match="already open"):
        engine.add_stream("a")


@pytest.mark.parametrize(
    "call",
    [
        lambda e: e.push_audio("nope", noise(0.1)),
        lambda e: e.end_stream("nope"),
        lambda e: e.buffered_sec("nope"),
        lambda e: e.state_bytes("nope"),
    ],
    ids=["push_audio", "end_stream", "buffered_sec", "state_bytes"],
)
def test_unknown_stream_is_a_key_error(tiny_models: LoadedModels, call) -> None:
    engine = StreamingEngine(tiny_models)
    with pytest.raises(KeyError, match="nope"):
        call(engine)
    engine.drop_stream("nope")  # forgetting an unknown stream is not an error


def test_audio_after_the_end_is_refused(tiny_models: LoadedModels) -> None:
    engine = StreamingEngine(tiny_models)
    engine.add_stream("a")
    engine.push_audio("a", noise(0.5))
    engine.end_stream("a")
    with pytest.raises(StreamError) as err:
        engine.push_audio("a", noise(0.5))
    assert err.value.reason == "audio_after_end"


@pytest.mark.parametrize(
    "samples",
    [
        np.array([0.0, np.nan, 0.1], dtype=np.float32),
        np.array([0.0, np.inf], dtype=np.float32),
        np.zeros((2, 100), dtype=np.float32),
    ],
    ids=["nan", "inf", "stereo"],
)
def test_bad_audio_is_refused_and_the_stream_goes_on(tiny_models, samples) -> None:
    engine = StreamingEngine(tiny_models)
    engine.add_stream("a")
    with pytest.raises(StreamError) as err:
        engine.push_audio("a", samples)
    assert err.value.reason == "bad_audio"
    assert engine.buffered_sec("a") == 0.0
    engine.push_audio("a", noise(0.2))  # nothing of the bad piece was kept
    assert engine.buffered_sec("a") == pytest.approx(0.2)


def test_huge_but_finite_audio_is_not_bad_audio(tiny_models: LoadedModels) -> None:
    """The finiteness check sums the samples first; a sum that overflows is not a bad sample."""
    engine = StreamingEngine(tiny_models)
    engine.add_stream("a")
    engine.push_audio("a", np.full(320, 3e38, dtype=np.float32))
    assert engine.buffered_sec("a") == pytest.approx(0.02)


def test_buffer_full(tiny_models: LoadedModels) -> None:
    engine = StreamingEngine(tiny_models, EngineConfig(max_buffered_audio_sec=2.0))
    engine.add_stream("a")
    engine.push_audio("a", noise(1.5))
    with pytest.raises(StreamError) as err:
        engine.push_audio("a", noise(0.6))
    assert err.value.reason == "buffer_full"
    assert engine.buffered_sec("a") == pytest.approx(1.5)
    engine.step()  # takes 1.12 s
    engine.push_audio("a", noise(0.6))
    assert engine.buffered_sec("a") == pytest.approx(1.5 - 1.12 + 0.6)


def test_a_stream_that_ends_without_audio(tiny_models: LoadedModels) -> None:
    engine = StreamingEngine(tiny_models)
    engine.add_stream("empty")
    assert engine.ready_streams() == []
    engine.end_stream("empty")
    assert engine.ready_streams() == ["empty"]
    (update,) = engine.step()
    assert update.stream_id == "empty"
    assert update.ended and update.error is None
    assert update.segments == () and update.audio_sec == 0.0
    assert not engine.has_stream("empty")
    assert engine.step() == []


def test_every_stream_ends_with_one_ended_update(tiny_models, short_calls) -> None:
    run = run_calls(tiny_models, short_calls, piece_sizes=(7001, 3000, 12000))
    for name in short_calls:
        updates = run.updates[name]
        assert [u.ended for u in updates].count(True) == 1
        assert updates[-1].ended
        assert all(u.error is None for u in updates)
        assert sum(u.audio_sec for u in updates) == pytest.approx(6.0, abs=0.09)
        assert run.finals(name), "the random models talk all the time: expect finals"


# --- batching caps -----------------------------------------------------------------------------


def test_max_streams_per_step_caps_the_batch(tiny_models: LoadedModels) -> None:
    engine = StreamingEngine(tiny_models, EngineConfig(max_streams_per_step=2))
    for k, name in enumerate("abc"):
        engine.add_stream(name)
        engine.push_audio(name, noise(1.2, seed=k))  # one chunk each
    assert engine.ready_streams() == ["a", "b", "c"]
    first = engine.step()
    assert [u.stream_id for u in first] == ["a", "b"]
    assert engine.last_timing.streams == 2
    assert engine.ready_streams() == ["c"]
    second = engine.step()
    assert [u.stream_id for u in second] == ["c"]
    assert engine.last_timing.streams == 1


def test_capped_batches_take_turns(tiny_models: LoadedModels) -> None:
    engine = StreamingEngine(tiny_models, EngineConfig(max_streams_per_step=2))
    for k, name in enumerate("abc"):
        engine.add_stream(name)
        engine.push_audio(name, noise(5.0, seed=k))  # a backlog of four chunks each
    served = [[u.stream_id for u in engine.step()] for _ in range(2)]
    assert {name for ids in served for name in ids} == {"a", "b", "c"}, served


def test_capped_instances_give_the_same_results(tiny_models, calls) -> None:
    uncapped = run_calls(tiny_models, calls)
    capped = run_calls(
        tiny_models, calls, EngineConfig(max_instances_per_step=3, max_streams_per_step=3)
    )
    assert max(capped.batch_sizes) == 3
    assert max(capped.instance_counts) > 3, "the cap should split some steps' ASR forward"
    for name in calls:
        assert [segment_key(s) for s in capped.finals(name)] == [
            segment_key(s) for s in uncapped.finals(name)
        ]


# --- leaving and failing -----------------------------------------------------------------------


def test_drop_stream_mid_call(tiny_models: LoadedModels, short_calls) -> None:
    others = {k: v for k, v in short_calls.items() if k != "billing"}
    alone = run_calls(tiny_models, others)

    def drop(engine: StreamingEngine, step: int) -> None:
        if step == 2:
            assert engine.has_stream("billing")
            engine.drop_stream("billing")

    run = run_calls(tiny_models, short_calls, before_step=drop)
    assert len(run.updates["billing"]) == 2, "updates stop at the drop"
    assert not any(u.ended for u in run.updates["billing"])
    for name in others:
        assert [segment_key(s) for s in run.finals(name)] == [
            segment_key(s) for s in alone.finals(name)
        ]


def test_a_broken_stream_fails_alone(tiny_models: LoadedModels, short_calls) -> None:
    others = {k: v for k, v in short_calls.items() if k != "transfer"}
    clean = run_calls(tiny_models, others)

    def break_transfer(engine: StreamingEngine, step: int) -> None:
        if step == 2:
            corrupt_asr_cache(engine, "transfer")

    run = run_calls(tiny_models, short_calls, before_step=break_transfer)
    assert set(run.errors) == {"transfer"}
    assert run.errors["transfer"].reason == "model_step_failed"
    failed_at = next(i for i, u in enumerate(run.updates["transfer"]) if u.error is not None)
    assert failed_at == len(run.updates["transfer"]) - 1, "nothing after the failure"
    for name in others:
        assert [segment_key(s) for s in run.finals(name)] == [
            segment_key(s) for s in clean.finals(name)
        ]


def test_a_stream_whose_features_fail_fails_alone(
    tiny_models: LoadedModels, short_calls, monkeypatch
) -> None:
    """Features are computed for the whole step at once; a failure there is retried stream by
    stream, from unchanged state, so the others' output is what it is without the guilty call."""
    import worker.engine.engine as engine_module

    others = {k: v for k, v in short_calls.items() if k != "transfer"}
    clean = run_calls(tiny_models, others)
    real = engine_module.take_chunks
    calls_seen: list[int] = []

    def take_chunks(streams):
        calls_seen.append(len(streams))
        if len(calls_seen) >= 3 and any(s is guilty for s in streams):
            raise RuntimeError("preprocessor failed")
        return real(streams)

    guilty = None

    def remember(engine: StreamingEngine, step: int) -> None:
        nonlocal guilty
        if step == 0:
            guilty = engine._streams["transfer"].features

    monkeypatch.setattr(engine_module, "take_chunks", take_chunks)
    run = run_calls(tiny_models, short_calls, before_step=remember)
    assert set(run.errors) == {"transfer"}
    assert run.errors["transfer"].reason == "features_failed"
    assert max(calls_seen) > 1 and 1 in calls_seen[2:], "a batch failed and was retried alone"
    for name in others:
        assert [segment_key(s) for s in run.finals(name)] == [
            segment_key(s) for s in clean.finals(name)
        ]


@pytest.mark.parametrize("max_instances", [1, 256])
def test_a_stream_failing_late_in_the_asr_step_fails_alone(
    tiny_models: LoadedModels, calls, max_instances: int
) -> None:
    """The guilty call arrives whole and ends at once; the others arrive 5 s at a time, so its
    last chunk (the ASR's ``keep_all`` group, stepped after the others' chunks) is batched with
    the others' at step 3, where it fails after their instances were decoded."""
    config = EngineConfig(max_instances_per_step=max_instances)
    others = {k: v for k, v in calls.items() if k != "transfer"}
    clean = run_calls(tiny_models, others, config, piece_sizes=(5 * SAMPLE_RATE,))
    guilty = calls["transfer"][: 4 * SAMPLE_RATE]

    def break_transfer(engine: StreamingEngine, step: int) -> None:
        if step == 3:
            assert engine.ready_streams() == [*others, "transfer"]
            corrupt_asr_cache(engine, "transfer")

    run = run_calls(
        tiny_models,
        {**others, "transfer": guilty},
        config,
        piece_sizes={**dict.fromkeys(others, (5 * SAMPLE_RATE,)), "transfer": (len(guilty),)},
        before_step=break_transfer,
    )
    assert set(run.errors) == {"transfer"}
    assert len(run.updates["transfer"]) == 4  # three steps, then the failure
    for name in others:
        assert [segment_key(s) for s in run.finals(name)] == [
            segment_key(s) for s in clean.finals(name)
        ]


# --- determinism -------------------------------------------------------------------------------


def test_a_call_gives_the_same_finals_alone_or_batched(tiny_models, calls) -> None:
    """float32 is enough here: the batched kernels gave bit-identical tokens for these calls (if
    a near-tie ever flips a token, run this in float64 like the golden test)."""
    alone = {name: run_calls(tiny_models, {name: audio}) for name, audio in calls.items()}
    batched = run_calls(
        tiny_models,
        calls,
        piece_sizes=(5937, 16000, 1, 9000),
        start_tick={name: 2 * k for k, name in enumerate(calls)},
    )
    assert max(batched.batch_sizes) >= 3
    for name in calls:
        ours = [segment_key(s) for s in batched.finals(name)]
        assert ours, name
        assert ours == [segment_key(s) for s in alone[name].finals(name)], name
        words = [s.words for s in batched.finals(name)]
        assert words == [s.words for s in alone[name].finals(name)], name


# --- sequence spans ----------------------------------------------------------------------------


def test_segment_spans_name_the_records_that_hold_their_audio(tiny_models, calls) -> None:
    config = EngineConfig(max_segment_sec=3.0)
    run = run_calls(tiny_models, calls, config, piece_sizes=(7000, 9000, 4000, 12000))

    for name, audio in calls.items():
        pushed = run.pushed[name]
        pairs = run.spans(name)
        assert any(seg.start_s > 3.0 for seg, _ in pairs), "segments should start mid-call"
        for seg, span in pairs:
            first = record_holding(pushed, seg.start_s, len(audio))
            last = record_holding(pushed, seg.end_s, len(audio))
            assert span == SequenceSpan(first, last), seg
            assert span.first <= span.last


def record_holding(pushed: list[tuple[int, int]], seconds: float, n_samples: int) -> int:
    """Sequence number of the pushed piece holding the sample at ``seconds`` (the last piece for
    a time at or past the end)."""
    sample = min(int(seconds * SAMPLE_RATE), n_samples - 1)
    starts = [start for start, _ in pushed]
    return pushed[int(np.searchsorted(starts, sample, side="right")) - 1][1]


# --- configuration -----------------------------------------------------------------------------

BAD_SETTINGS = {
    "max_speakers": [0, 5],
    "cache_gating_buffer_size": [0],
    "max_streams_per_step": [0],
    "max_instances_per_step": [0],
    "max_buffered_audio_sec": [0.0, -1.0],
    "sent_break_sec": [-0.1, float("nan")],
    "final_after_silence_sec": [-1.0],
    "max_segment_sec": [0.0],
    "decoding_strategy": ["beam"],
}


@pytest.mark.parametrize(
    ("name", "value"),
    [(name, value) for name, values in BAD_SETTINGS.items() for value in values],
)
def test_engine_config_names_the_bad_field(name: str, value: object) -> None:
    with pytest.raises(ValueError) as err:
        EngineConfig(**{name: value})
    named = str(err.value).split(" (got ")[0]  # the repr that follows names every field
    assert named == f"invalid engine settings: {name}"


def test_engine_config_names_every_bad_field() -> None:
    with pytest.raises(ValueError) as err:
        EngineConfig(max_speakers=0, max_segment_sec=-1.0)
    assert str(err.value).startswith("invalid engine settings: max_speakers, max_segment_sec (")


def test_engine_config_defaults_are_valid() -> None:
    config = EngineConfig()
    assert {f.name for f in fields(config)} >= set(BAD_SETTINGS)
