"""``synth``: seeded multi-speaker calls whose audio agrees with their reference files."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import soundfile

from producer_tools.__main__ import main
from producer_tools.reference import read_rttm, read_transcript
from producer_tools.synth import (
    SYNTH_VOICES,
    TELEPHONE_RATE,
    SynthError,
    SynthPaths,
    SynthSpec,
    make_call,
    script,
    speaker_label,
)
from tests.espeak import require_espeak


@pytest.fixture
def espeak() -> None:
    require_espeak()


def _synth(tmp_path, name: str, *flags: str) -> tuple:
    out = tmp_path / name
    assert main(["synth", str(out), "--quiet", *flags]) == 0
    return out, out.with_suffix(".json"), out.with_suffix(".rttm")


# --- the script: no espeak-ng needed -----------------------------------------------------------


def test_script_introduces_every_speaker_then_passes_the_floor() -> None:
    turns = script(SynthSpec(speakers=3, turns=12, seed=5))
    voices = [t[0] for t in turns]
    assert voices[:3] == list(SYNTH_VOICES[:3])
    assert all(a != b for a, b in itertools.pairwise(voices))
    assert len({t[1] for t in turns}) == 12  # no sentence twice while the pool lasts
    assert script(SynthSpec(speakers=3, turns=12, seed=5)) == turns
    assert script(SynthSpec(speakers=3, turns=12, seed=6)) != turns


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"speakers": 0}, "speakers must be"),
        ({"speakers": len(SYNTH_VOICES) + 1}, "speakers must be"),
        ({"speakers": 3, "turns": 2}, "cannot give each"),
        ({"overlap_probability": 1.5}, "0..1"),
        ({"speed_wpm": 20}, "80..450"),
    ],
)
def test_bad_recipes_are_refused(spec: dict, message: str) -> None:
    with pytest.raises(SynthError, match=message):
        SynthSpec(**spec)


def test_bad_outputs_are_refused_before_any_synthesis(tmp_path, capsys) -> None:
    for out, flags, message in [
        ("call.mp3", [], "write .wav or .flac"),
        ("call.flac", ["--telephone"], "μ-law"),
        ("nowhere/call.wav", [], "does not exist"),
        ("call.wav", ["--turns", "1", "--speakers", "2"], "cannot give each"),
    ]:
        with pytest.raises(SystemExit) as exited:
            main(["synth", str(tmp_path / out), *flags])
        assert exited.value.code == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SynthError, match="three different paths"):
        SynthPaths.beside(tmp_path / "a.wav", rttm=tmp_path / "a.wav").check(SynthSpec())


def test_missing_espeak_is_a_clear_error(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    assert main(["synth", str(tmp_path / "call.wav"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "espeak-ng not found" in err and "apt-get install espeak-ng" in err
    assert not (tmp_path / "call.wav").exists()


# --- calls: espeak-ng -------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_call(espeak, tmp_path) -> None:
    flags = ["--speakers", "2", "--turns", "3", "--seed", "11"]
    first = _synth(tmp_path, "a.wav", *flags)
    second = _synth(tmp_path, "b.wav", *flags, "--recording", "a")
    for x, y in zip(first, second, strict=True):
        assert x.read_bytes() == y.read_bytes().replace(b'"audio": "b.wav"', b'"audio": "a.wav"')
    other = _synth(tmp_path, "c.wav", "--speakers", "2", "--turns", "3", "--seed", "12")
    assert read_transcript(other[1]).turns != read_transcript(first[1]).turns


def test_references_agree_with_each_other_and_the_audio(espeak, tmp_path, capsys) -> None:
    out = tmp_path / "call.wav"
    args = ["synth", str(out), "--speakers", "3", "--turns", "5", "--seed", "2"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert printed.out.split() == [
        str(out),
        str(out.with_suffix(".json")),
        str(out.with_suffix(".rttm")),
    ]
    assert "synthesising turn 5/5" in printed.err  # progress, one line per turn
    transcript = read_transcript(out.with_suffix(".json"))
    rttm = read_rttm(out.with_suffix(".rttm"))
    assert transcript.recording == rttm.recording == "call"
    assert transcript.speakers == ("A", "B", "C")
    assert [(t.speaker, t.start_s, t.end_s) for t in transcript.turns] == [
        (t.speaker, t.start_s, t.end_s) for t in rttm.turns
    ]
    frames, rate = soundfile.read(out, always_2d=True)
    assert (rate, frames.shape[1]) == (16000, 1)
    assert frames.shape[0] / rate >= transcript.turns[-1].end_s
    # Speech where the reference says so, silence before the first turn.
    first = transcript.turns[0]
    assert np.abs(frames[: int(first.start_s * rate) - 10]).max() == 0
    inside = frames[int(first.start_s * rate) : int(first.end_s * rate)]
    assert np.sqrt(np.mean(inside**2)) > 0.01


def test_overlap_probability_one_overlaps_zero_never(espeak) -> None:
    def overlapping(p: float) -> int:
        call = make_call(SynthSpec(speakers=2, turns=4, seed=3, overlap_probability=p), "x")
        turns = call.reference.turns
        return sum(b.start_s < a.end_s for a, b in itertools.pairwise(turns))

    assert overlapping(0.0) == 0
    assert overlapping(1.0) == 3  # every change of speaker talks over the previous turn


def test_stereo_puts_one_party_per_channel(espeak) -> None:
    call = make_call(
        SynthSpec(speakers=2, turns=2, seed=0, overlap_probability=0, stereo=True), "x"
    )
    a, b = call.reference.turns
    assert (a.speaker, b.speaker) == ("A", "B")

    def rms(turn, channel: int) -> float:
        span = call.frames[int(turn.start_s * 16000) : int(turn.end_s * 16000), channel]
        return float(np.sqrt(np.mean(span**2)))

    assert rms(a, 0) > 0.01 and rms(a, 1) == 0.0
    assert rms(b, 1) > 0.01 and rms(b, 0) == 0.0


def test_telephone_is_8khz_mulaw_and_band_limited(espeak, tmp_path) -> None:
    wide = make_call(SynthSpec(speakers=2, turns=2, seed=4), "x")
    out, transcript, _ = _synth(
        tmp_path, "phone.wav", "--speakers", "2", "--turns", "2", "--seed", "4", "--telephone"
    )
    info = soundfile.info(str(out))
    assert (info.samplerate, info.subtype, info.channels) == (TELEPHONE_RATE, "ULAW", 1)
    assert info.duration == pytest.approx(wide.duration_s, abs=0.01)
    frames, _ = soundfile.read(out)
    spectrum = np.abs(np.fft.rfft(frames)) ** 2
    freqs = np.fft.rfftfreq(frames.shape[0], 1 / TELEPHONE_RATE)
    in_band = spectrum[(freqs > 400) & (freqs < 3200)].sum()
    assert spectrum[freqs < 150].sum() < 0.01 * in_band
    assert spectrum[freqs > 3700].sum() < 0.01 * in_band
    # The band does not move speech: the reference is the wideband call's.
    ms = [(t.speaker, round(t.start_s, 3), round(t.end_s, 3)) for t in wide.reference.turns]
    assert [(t.speaker, t.start_s, t.end_s) for t in read_transcript(transcript).turns] == ms
    assert speaker_label(1) == "B"
