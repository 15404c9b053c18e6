"""Reading audio files: soundfile formats, ffmpeg for the rest, channels and rates checked."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile

from producer_tools.audio_files import AudioFileError, publish_rate, read_audio, resample


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.stack(
        [0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) for c in range(channels)], axis=1
    ).astype(np.float32)


@pytest.mark.parametrize(("suffix", "channels"), [(".wav", 1), (".flac", 2), (".ogg", 1)])
def test_soundfile_formats_keep_channels_and_rate(tmp_path, suffix, channels) -> None:
    path = tmp_path / f"call{suffix}"
    frames = _tone(0.5, 44100, channels)
    soundfile.write(path, frames, 44100)
    audio = read_audio(path)
    assert (audio.channels, audio.sample_rate, audio.frames.shape[0]) == (channels, 44100, 22050)
    tolerance = 0.05 if suffix == ".ogg" else 1e-3  # Vorbis is lossy
    assert np.sqrt(np.mean((audio.frames - frames) ** 2)) < tolerance


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
def test_other_formats_go_through_ffmpeg(tmp_path) -> None:
    wav, m4a = tmp_path / "call.wav", tmp_path / "call.m4a"
    soundfile.write(wav, _tone(1.0, 16000, 2), 16000)
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", wav, "-c:a", "aac", m4a], check=True, timeout=120
    )
    audio = read_audio(m4a)
    assert audio.channels == 2 and audio.sample_rate == 16000
    assert audio.duration_s == pytest.approx(1.0, abs=0.1)


def test_unreadable_and_unsupported_files_are_clear_errors(tmp_path) -> None:
    with pytest.raises(AudioFileError, match="no such file"):
        read_audio(tmp_path / "missing.wav")
    junk = tmp_path / "notes.wav"
    junk.write_text("not audio at all")
    with pytest.raises(AudioFileError, match=r"notes\.wav"):
        read_audio(junk)
    surround = tmp_path / "surround.wav"
    soundfile.write(surround, _tone(0.1, 16000, 3), 16000)
    with pytest.raises(AudioFileError, match="3 channels"):
        read_audio(surround)


def test_rate_choice_and_resampling() -> None:
    assert publish_rate(44100, None) == 44100
    assert publish_rate(96000, None) == 16000  # the worker does not take 96 kHz
    assert publish_rate(44100, 8000) == 8000
    with pytest.raises(AudioFileError, match="12345"):
        publish_rate(44100, 12345)
    stereo = _tone(1.0, 48000, 2)
    out = resample(stereo, 48000, 8000)
    assert out.shape == (8000, 2) and out.dtype == np.float32
