"""producer_tools.conversation: deterministic espeak-ng calls with known turn times."""

from __future__ import annotations

import shutil
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from producer_tools import conversation as conv
from producer_tools.conversation import (
    PAD_S,
    SAMPLE_RATE,
    VOICES,
    EspeakError,
    default_conversations,
    espeak_wav,
    make_conversation,
    read_wav,
    synthesise,
    write_wav,
)

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng not installed"
)
A, B, C = VOICES


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


@needs_espeak
def test_espeak_is_deterministic() -> None:
    exe = shutil.which("espeak-ng")
    assert exe is not None
    assert espeak_wav(exe, A, "Hello there.", 165) == espeak_wav(exe, A, "Hello there.", 165)


@needs_espeak
def test_same_inputs_same_samples() -> None:
    turns = [(A, "Good morning."), (B, "Hi, how are you?"), (A, "Fine, thanks.")]
    first = make_conversation(turns, seed=3)
    conv._synthesise.cache_clear()  # the second run really calls espeak-ng again
    second = make_conversation(turns, seed=3)
    np.testing.assert_array_equal(first.audio, second.audio)
    assert first.turns == second.turns


@needs_espeak
def test_duration_is_turns_plus_gaps_minus_overlaps() -> None:
    turns = [(A, "Can you hear me?"), (B, "Yes, loud and clear.", -0.4), (A, "Great.", 0.5)]
    c = make_conversation(turns)
    lengths = [synthesise(t[0], t[1]).shape[0] / SAMPLE_RATE for t in turns]
    assert [t.duration_s for t in c.turns] == pytest.approx(lengths)
    expected = 2 * PAD_S + sum(lengths) - 0.4 + 0.5
    assert c.duration_s == pytest.approx(expected, abs=2 / SAMPLE_RATE)
    assert c.turns[1].start_s == pytest.approx(c.turns[0].end_s - 0.4, abs=1 / SAMPLE_RATE)
    assert c.turns[2].start_s == pytest.approx(c.turns[1].end_s + 0.5, abs=1 / SAMPLE_RATE)
    assert [t.speaker for t in c.turns] == [0, 1, 0] and c.voices == (A, B)
    assert c.audio.dtype == np.float32 and c.sample_rate == SAMPLE_RATE


@needs_espeak
def test_overlap_has_both_voices() -> None:
    c = make_conversation([(A, "I was wondering about my order."), (B, "Sure, let me look.", -0.8)])
    first, second = c.turns
    lo, hi = round(second.start_s * SAMPLE_RATE), round(first.end_s * SAMPLE_RATE)
    assert hi - lo == pytest.approx(0.8 * SAMPLE_RATE, abs=1)
    assert rms(c.tracks[0, lo:hi]) > 0.02 and rms(c.tracks[1, lo:hi]) > 0.02
    np.testing.assert_allclose(c.audio, c.tracks.sum(axis=0), atol=1e-6)
    # Outside every turn there is only silence.
    assert not c.audio[: round(first.start_s * SAMPLE_RATE)].any()
    assert not c.audio[round(second.end_s * SAMPLE_RATE) :].any()


@needs_espeak
def test_seed_picks_which_speaker_changes_overlap() -> None:
    turns = [(A, "One."), (B, "Two."), (A, "Three."), (B, "Four."), (B, "Five."), (A, "Six.")]
    layouts = {
        seed: tuple(round(t.start_s, 4) for t in make_conversation(turns, seed=seed).turns)
        for seed in range(8)
    }
    assert len(set(layouts.values())) > 1
    for seed in range(8):
        c = make_conversation(turns, seed=seed, overlap_s=0.1, gap_s=0.2)
        gaps = [b.start_s - a.end_s for a, b in pairwise(c.turns)]
        assert all(
            g == pytest.approx(0.2, abs=1e-3) or g == pytest.approx(-0.1, abs=1e-3) for g in gaps
        )
        assert gaps[3] == pytest.approx(0.2, abs=1e-3)  # a speaker never overlaps themself


@needs_espeak
def test_default_conversations() -> None:
    calls = default_conversations()
    assert len(calls) == 4
    assert sorted(len(c.voices) for c in calls.values()) == [2, 2, 2, 3]
    for name, c in calls.items():
        assert c.name == name and 8 <= c.duration_s <= 15.5
        assert any(b.start_s < a.end_s for a, b in pairwise(c.turns))
        assert np.abs(c.audio).max() <= 1.0


@needs_espeak
def test_bad_layouts_are_rejected() -> None:
    with pytest.raises(ValueError, match="own speaker"):
        make_conversation([(A, "Hello."), (A, "Hello again.", -0.2)])
    with pytest.raises(ValueError):
        make_conversation([])
    with pytest.raises(ValueError):
        make_conversation([(A, "Hello.")], overlap_s=-1)


@needs_espeak
def test_unknown_voice_is_an_espeak_error() -> None:
    with pytest.raises(EspeakError, match="zzqq"):
        synthesise("zzqq", "Hello.")


def test_missing_espeak_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EspeakError, match="apt-get install espeak-ng"):
        make_conversation([(A, "Hello.")])


@pytest.mark.parametrize("shape", [(1600,), (1600, 2)], ids=["mono", "stereo"])
def test_wav_round_trip(tmp_path: Path, shape: tuple[int, ...]) -> None:
    audio = np.random.default_rng(0).uniform(-0.9, 0.9, size=shape).astype(np.float32)
    path = tmp_path / "call.wav"
    write_wav(path, audio, 8_000)
    back, rate = read_wav(path)
    assert rate == 8_000 and back.shape == audio.shape and back.dtype == np.float32
    np.testing.assert_allclose(back, audio, atol=1 / 32768)
