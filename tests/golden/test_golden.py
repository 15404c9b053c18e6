"""The batched engine holds to NeMo's own pipeline, run on each call alone.

Five multi-speaker calls go through one engine with staggered starts and ends, audio arriving
in ragged pieces, so every step batches calls of different ages. For each call the engine's
tokens per speaker, and its final segments (speaker, text, start, end), must equal NeMo's
``SpeakerTaggedASR`` on that call alone. Both run in float64 so that the comparison is exact
on tokens and to 1e-9 s on times: rounding differences of batched kernels cannot hide a logic
difference (or cause a spurious one). A test also breaks the state scatter on purpose and
checks that the comparison catches it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from producer_tools.conversation import Conversation, default_conversations
from tests.golden.reference import ReferenceResult, run_reference
from worker.engine import engine as engine_module
from worker.engine.engine import EngineConfig, StreamingEngine
from worker.engine.models import LoadedModels

pytestmark = pytest.mark.slow

TIME_TOLERANCE_S = 1e-9
GOLDEN_CONFIG = EngineConfig(decoding_strategy="greedy", max_streams_per_step=8, dtype="fp64")


@pytest.fixture(scope="module")
def calls() -> dict[str, Conversation]:
    convs = default_conversations()
    # A fifth call: the first one's audio with its halves swapped, so two calls share voices
    # but not timing.
    first = next(iter(convs.values()))
    half = len(first.audio) // 2
    swapped = np.concatenate([first.audio[half:], first.audio[:half]])
    convs["swapped"] = Conversation(audio=swapped, turns=(), tracks=swapped[None], name="swapped")
    return convs


@pytest.fixture(scope="module")
def references(fp64_models, calls) -> dict[str, ReferenceResult]:
    torch.set_default_dtype(torch.float64)
    engine = StreamingEngine(fp64_models, GOLDEN_CONFIG)  # applies the settings to the models
    del engine
    return {
        name: run_reference(fp64_models.asr, fp64_models.diarizer, c.audio, GOLDEN_CONFIG)
        for name, c in calls.items()
    }


@dataclass
class EngineRun:
    finals: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    tokens: dict[str, dict[int, list[int]]] = field(default_factory=lambda: defaultdict(dict))
    max_batch: int = 0
    mixed_age_steps: int = 0


def run_engine_staggered(
    models: LoadedModels,
    calls: dict[str, Conversation],
    config: EngineConfig = GOLDEN_CONFIG,
    seed: int = 7,
) -> EngineRun:
    """All calls through one engine: call k joins at tick 3k, audio in 0.1–0.9 s pieces."""
    torch.set_default_dtype(torch.float64)
    engine = StreamingEngine(models, config)
    run = EngineRun()
    record = engine._add_text

    def spy(stream, spk, tokens, frames, offset):
        run.tokens[stream.stream_id].setdefault(spk, []).extend(tokens)
        return record(stream, spk, tokens, frames, offset)

    engine._add_text = spy
    rng = np.random.default_rng(seed)
    cursor = {name: 0 for name in calls}
    names = list(calls)
    tick = 0
    while names or engine.stream_ids:
        for k, name in enumerate(list(names)):
            if tick < 3 * k:
                continue
            if not engine.has_stream(name) and cursor[name] == 0:
                engine.add_stream(name)
            audio = calls[name].audio
            n = int(rng.uniform(0.1, 0.9) * 16000)
            engine.push_audio(name, audio[cursor[name] : cursor[name] + n], sequence=tick)
            cursor[name] += n
            if cursor[name] >= len(audio):
                engine.end_stream(name)
                names.remove(name)
        while engine.ready_streams():
            ages = {
                engine._streams[s].steps for s in engine.ready_streams() if s in engine._streams
            }
            for update in engine.step():
                assert update.error is None, update.error
                run.finals[update.stream_id].extend(s for s, _ in update.segments if s.final)
            run.max_batch = max(run.max_batch, engine.last_timing.streams)
            run.mixed_age_steps += len(ages) > 1
        tick += 1
    return run


def mismatches(run: EngineRun, references: dict[str, ReferenceResult]) -> list[str]:
    problems = []
    for name, ref in references.items():
        tokens = run.tokens.get(name, {})
        ref_tokens = {spk: toks for spk, toks in ref.tokens.items() if toks}
        ours = {spk: toks for spk, toks in tokens.items() if toks}
        if ours != ref_tokens:
            problems.append(
                f"{name}: tokens differ for speakers {sorted(set(ours) | set(ref_tokens))}"
            )
        finals = sorted(run.finals.get(name, []), key=lambda s: (s.start_s, s.speaker))
        expected = sorted(ref.segments, key=lambda s: (s["start_time"], s["speaker"]))
        if len(finals) != len(expected):
            problems.append(f"{name}: {len(finals)} final segments, NeMo has {len(expected)}")
            continue
        for ours_seg, ref_seg in zip(finals, expected, strict=True):
            same = (
                ours_seg.speaker == ref_seg["speaker"]
                and ours_seg.text == ref_seg["words"]
                and abs(ours_seg.start_s - ref_seg["start_time"]) <= TIME_TOLERANCE_S
                and abs(ours_seg.end_s - ref_seg["end_time"]) <= TIME_TOLERANCE_S
            )
            if not same:
                problems.append(f"{name}: segment {ours_seg} != NeMo {ref_seg}")
    return problems


def test_staggered_batched_calls_equal_nemo_alone(fp64_models, calls, references) -> None:
    run = run_engine_staggered(fp64_models, calls)
    assert run.max_batch >= 3, "the schedule should batch several calls at once"
    assert run.mixed_age_steps > 0, "some steps should batch calls of different ages"
    assert all(run.finals[name] for name in calls), "every call should produce final segments"
    assert mismatches(run, references) == []


def test_golden_comparison_catches_mixed_state(fp64_models, calls, references, monkeypatch):
    """Break the scatter once (rows rotated): the comparison must notice."""
    scatter = engine_module.scatter_diarizer

    def rotated(state, rows):
        scatter(state, rows[1:] + rows[:1])

    monkeypatch.setattr(engine_module, "scatter_diarizer", rotated)
    run = run_engine_staggered(fp64_models, calls)
    assert mismatches(run, references) != []


def test_greedy_batch_decoding_gives_the_same_transcript(fp64_models, calls) -> None:
    """``greedy_batch`` is faster; its tokens and segment times must match ``greedy``'s."""
    subset = dict(list(calls.items())[:2])
    greedy = run_engine_staggered(fp64_models, subset)
    config = EngineConfig(decoding_strategy="greedy_batch", max_streams_per_step=8, dtype="fp64")
    try:
        batched = run_engine_staggered(fp64_models, subset, config)
    finally:
        StreamingEngine(fp64_models, GOLDEN_CONFIG)  # the models' decoding back to greedy
    assert batched.tokens == greedy.tokens
    assert batched.finals == greedy.finals
