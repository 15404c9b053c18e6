"""One call's state stays flat however long it runs: nothing the engine keeps grows with time.

A call is stepped through the tiny models with the production settings (``EngineConfig()``),
fed with the four canned conversations looped, in 0.5 s records. The random models hear
speech throughout, so the diarizer's speaker cache and FIFO fill, the ASR emits text every
step, and segments close at ``max_segment_sec`` or after a pause (finals are what let the
transcript forget).

Every ``SAMPLE_EVERY`` steps the profile records ``state_bytes``, every state tensor's shape and
the Python-side containers (open segments, sequence marks, hypothesis token lists). After a
warm-up the tensors must not change shape and every container must stay under a bound that
follows from the settings, not from the length of the call.

Measured on the shared 2-core test machine, one torch thread: a step of the tiny models takes
0.13-0.29 s depending on the machine's load, so the 2-hour call (6429 steps) took 14 minutes
and 30 minutes of audio 8 minutes; both held state_bytes between 232 and 331 kB (model state
222,856 bytes throughout, 544 finals in the 2 hours, process RSS 1171 -> 1173 MiB from the
30-minute to the 2-hour run). The default run covers 4 minutes of audio (about 45 s: past the
warm-up and through several ``max_segment_sec`` cycles); ``CALLSCRIBE_LONG_TESTS=1`` adds the
30-minute and 2-hour runs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from producer_tools.conversation import default_conversations
from worker.engine.config import EngineConfig
from worker.engine.engine import StreamingEngine
from worker.engine.models import LoadedModels

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLE_RATE = 16000
RECORD_SEC = 0.5
WARM_UP_STEPS = 30  # spkcache + FIFO (2 x 188 frames of 80 ms) fill in 27 steps
SAMPLE_EVERY = 10

long_tests = pytest.mark.skipif(
    os.environ.get("CALLSCRIBE_LONG_TESTS") != "1",
    reason="set CALLSCRIBE_LONG_TESTS=1 for the 30-minute and 2-hour runs",
)


@dataclass
class Sample:
    step: int
    state_bytes: int
    model_bytes: int
    feature_bytes: int
    assembler_bytes: int
    shapes: dict[str, tuple[int, ...]]
    instances: int
    open_segments: int
    longest_open_sec: float
    open_words: int
    seq_marks: int
    hypothesis_tokens: int  # longest y_sequence kept between steps
    hypothesis_times: int  # longest timestamp list kept between steps
    rss_mib: float


@dataclass
class Profile:
    step_sec: float
    frames_per_step: int  # encoder frames
    feature_bound: int  # bytes: a chunk, one record and the pre-cache of frames, a little audio
    samples: list[Sample] = field(default_factory=list)
    final_steps: list[int] = field(default_factory=list)  # step of every final segment
    updates: int = 0


def rss_mib() -> float:
    """Resident memory of this process now (Linux), for the report and the long runs."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except OSError:
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def state_shapes(engine: StreamingEngine, stream_id: str) -> dict[str, tuple[int, ...]]:
    model = engine._streams[stream_id].model
    shapes = {f"diar.{name}": tuple(t.shape) for name, t in model.diar.tensors.items()}
    shapes["diar.recent_preds"] = tuple(model.diar.recent_preds.shape)
    for spk, inst in model.speakers.items():
        shapes[f"spk{spk}.cache_last_channel"] = tuple(inst.cache_last_channel.shape)
        shapes[f"spk{spk}.cache_last_time"] = tuple(inst.cache_last_time.shape)
        shapes[f"spk{spk}.cache_last_channel_len"] = tuple(inst.cache_last_channel_len.shape)
    return shapes


def sample(engine: StreamingEngine, stream_id: str, step: int) -> Sample:
    stream = engine._streams[stream_id]
    open_segments = list(stream.assembler._open.values())
    hyps = [i.hypothesis for i in stream.model.speakers.values() if i.hypothesis is not None]
    return Sample(
        step=step,
        state_bytes=engine.state_bytes(stream_id),
        model_bytes=stream.model.nbytes(),
        feature_bytes=stream.features.nbytes(),
        assembler_bytes=stream.assembler.nbytes(),
        shapes=state_shapes(engine, stream_id),
        instances=len(stream.model.speakers),
        open_segments=len(open_segments),
        longest_open_sec=max((s.end - s.start for s in open_segments), default=0.0),
        open_words=max((len(s.words) for s in open_segments), default=0),
        seq_marks=len(stream.seq_marks),
        hypothesis_tokens=max((len(h.y_sequence) for h in hyps), default=0),
        hypothesis_times=max((len(h.timestamp) for h in hyps), default=0),
        rss_mib=rss_mib(),
    )


def profile_call(models: LoadedModels, audio: np.ndarray, steps: int) -> Profile:
    engine = StreamingEngine(models, EngineConfig())
    engine.add_stream("call")
    record = int(RECORD_SEC * SAMPLE_RATE)
    layout, hop = engine.layout, engine.extractor.hop
    frames = layout.chunk_frames + record // hop + 2 + layout.pre_cache_frames
    audio_samples = record + 4 * hop + engine.extractor.half_window * 2
    profile = Profile(
        step_sec=engine.step_sec,
        frames_per_step=engine.nframes_per_chunk,
        feature_bound=frames * engine.extractor.n_mels * 4 + audio_samples * 4,
    )
    cursor = sequence = 0
    for step in range(steps):
        while not engine.ready_streams():
            start = cursor % len(audio)
            piece = audio[start : start + record]
            engine.push_audio("call", piece, sequence=sequence)
            cursor += len(piece)
            sequence += 1
        (update,) = engine.step()
        assert update.error is None and not update.ended
        profile.updates += 1
        profile.final_steps += [step for seg, _ in update.segments if seg.final]
        if step % SAMPLE_EVERY == 0 or step == steps - 1:
            profile.samples.append(sample(engine, "call", step))
    engine.end_stream("call")
    while engine.ready_streams():
        engine.step()
    return profile


def check_flat(profile: Profile, config: EngineConfig, max_symbols: int) -> None:
    """``max_symbols``: the most tokens the ASR's greedy decoding emits per encoder frame."""
    steady = [s for s in profile.samples if s.step >= WARM_UP_STEPS]
    assert len(steady) >= 3

    # Tensors: every one keeps its shape; the model bytes depend only on how many speaker
    # instances exist, and there are at most max_speakers of them.
    bytes_by_instances: dict[int, set[int]] = {}
    for s in steady:
        assert s.instances <= config.max_speakers
        for name, shape in s.shapes.items():
            reference = next(x.shapes[name] for x in steady if name in x.shapes)
            assert shape == reference, (s.step, name)
        bytes_by_instances.setdefault(s.instances, set()).add(s.model_bytes)
    assert all(len(sizes) == 1 for sizes in bytes_by_instances.values()), bytes_by_instances

    # Python-side containers: bounded by the settings.
    frames_per_step = profile.frames_per_step
    longest_sec = config.max_segment_sec + profile.step_sec
    records_per_segment = (longest_sec + 2 * profile.step_sec) / RECORD_SEC
    for s in steady:
        assert s.open_segments <= config.max_speakers
        assert s.longest_open_sec < longest_sec
        assert s.open_words <= (longest_sec / profile.step_sec + 1) * frames_per_step * max_symbols
        assert s.seq_marks <= records_per_segment + 2
        assert s.hypothesis_tokens <= 1  # trimmed to its last token every step
        assert s.hypothesis_times <= frames_per_step * max_symbols
        assert s.feature_bytes <= profile.feature_bound

    # Finals keep coming, so the transcript keeps forgetting.
    cycle = int(config.max_segment_sec / profile.step_sec) + 5
    assert profile.final_steps, "no finals at all"
    gaps = np.diff([0, *sorted(set(profile.final_steps)), profile.updates - 1])
    assert gaps.max() <= cycle, f"a stretch of {gaps.max()} steps without a final"

    # The total does not drift: late peaks no higher than the first cycles'.
    early = [s.state_bytes for s in steady if s.step < WARM_UP_STEPS + 2 * cycle]
    late = [s.state_bytes for s in steady if s.step >= profile.updates - 2 * cycle]
    assert max(late) <= 1.5 * max(early)


@pytest.fixture(scope="module")
def looped_audio() -> np.ndarray:
    """The four conversations back to back (53 s), looped by the feeder."""
    return np.concatenate([c.audio for c in default_conversations().values()])


def report(name: str, profile: Profile, seconds: float) -> str:
    steady = [s for s in profile.samples if s.step >= WARM_UP_STEPS]
    return (
        f"{name}: {profile.updates} steps ({profile.updates * profile.step_sec / 60:.1f} min) "
        f"in {seconds:.0f} s ({seconds / profile.updates * 1000:.0f} ms/step); state_bytes "
        f"{min(s.state_bytes for s in steady)}-{max(s.state_bytes for s in steady)}, model "
        f"{max(s.model_bytes for s in steady)}, finals {len(profile.final_steps)}, "
        f"RSS at the end {steady[-1].rss_mib:.0f} MiB"
    )


def run_and_check(models: LoadedModels, audio: np.ndarray, minutes: float) -> Profile:
    steps = int(minutes * 60 / 1.12) + 1
    started = time.perf_counter()
    profile = profile_call(models, audio, steps)
    print(report(f"{minutes:g} min", profile, time.perf_counter() - started))
    check_flat(profile, EngineConfig(), int(models.asr.cfg.decoding.greedy.max_symbols))
    return profile


def test_state_stays_flat_over_four_minutes(tiny_models: LoadedModels, looped_audio) -> None:
    run_and_check(tiny_models, looped_audio, 4)


@pytest.mark.slow
@long_tests
@pytest.mark.parametrize("minutes", [30, 120], ids=["30min", "2h"])
def test_state_stays_flat_over_a_long_call(
    tiny_models: LoadedModels, looped_audio, minutes: int
) -> None:
    profile = run_and_check(tiny_models, looped_audio, minutes)
    # Nothing outside the stream's own state grows either: the process holds no more memory
    # at the end than a quarter of the way in (allocator noise aside).
    quarter = next(s for s in profile.samples if s.step >= profile.updates // 4)
    assert profile.samples[-1].rss_mib - quarter.rss_mib < 64
