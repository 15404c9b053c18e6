"""Audio files → float frames ready to publish: read, check channels, pick a rate, resample.

soundfile (libsndfile) reads WAV, FLAC, OGG/Vorbis/Opus, AIFF and more itself; anything else
(MP3, M4A, …) goes through ``ffmpeg`` when it is installed, decoded to a temporary float WAV.
Channels are kept as they are (stereo stays two channels: one party per channel is common in
call recordings) up to the worker's limit of two.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import soundfile
import soxr

from worker.audio import MAX_CHANNELS, SUPPORTED_SAMPLE_RATES, TARGET_SAMPLE_RATE

FFMPEG_TIMEOUT_SEC: Final = 600.0


class AudioFileError(Exception):
    """A file could not be read as audio, or cannot be published as it is; says which and why."""


@dataclass(frozen=True, slots=True)
class AudioFile:
    """Decoded audio: float32 frames shaped ``(n_frames, channels)`` at ``sample_rate``."""

    path: Path
    frames: np.ndarray
    sample_rate: int

    @property
    def channels(self) -> int:
        return self.frames.shape[1]

    @property
    def duration_s(self) -> float:
        return self.frames.shape[0] / self.sample_rate


def read_audio(path: str | Path) -> AudioFile:
    """Decode ``path`` with soundfile, or with ffmpeg for formats libsndfile does not know."""
    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"{path}: no such file")
    try:
        frames, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        frames, rate = _read_with_ffmpeg(path, soundfile_error=str(exc))
    if frames.shape[0] == 0:
        raise AudioFileError(f"{path}: the file holds no audio")
    if frames.shape[1] > MAX_CHANNELS:
        raise AudioFileError(
            f"{path}: {frames.shape[1]} channels; the worker takes 1 or {MAX_CHANNELS} "
            "(mix it down first, e.g. sox in.wav -c 2 out.wav)"
        )
    return AudioFile(path, np.ascontiguousarray(frames), int(rate))


def _read_with_ffmpeg(path: Path, soundfile_error: str) -> tuple[np.ndarray, int]:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioFileError(
            f"{path}: not a format soundfile reads ({soundfile_error}); install ffmpeg "
            "(apt-get install ffmpeg) to read other formats"
        )
    with tempfile.TemporaryDirectory(prefix="callscribe-") as tmp:
        out = Path(tmp) / "decoded.wav"
        result = subprocess.run(
            [ffmpeg, "-nostdin", "-v", "error", "-i", str(path), "-vn", "-c:a", "pcm_f32le", out],
            capture_output=True,
            text=True,
            check=False,
            timeout=FFMPEG_TIMEOUT_SEC,
        )
        if result.returncode != 0 or not out.exists():
            detail = result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"]
            raise AudioFileError(f"{path}: neither soundfile nor ffmpeg can read it: {detail[0]}")
        frames, rate = soundfile.read(str(out), dtype="float32", always_2d=True)
    return frames, rate


def publish_rate(file_rate: int, requested: int | None) -> int:
    """The rate to send at: ``requested``, else the file's if the worker takes it, else 16 kHz."""
    rates = ", ".join(str(r) for r in sorted(SUPPORTED_SAMPLE_RATES))
    if requested is not None:
        if requested not in SUPPORTED_SAMPLE_RATES:
            raise AudioFileError(f"--sample-rate {requested} is not one the worker takes: {rates}")
        return requested
    return file_rate if file_rate in SUPPORTED_SAMPLE_RATES else TARGET_SAMPLE_RATE


def resample(frames: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """``(n, channels)`` float32 frames at ``to_rate`` (the same array if the rates match)."""
    if from_rate == to_rate:
        return frames
    out = soxr.resample(frames, from_rate, to_rate, quality="HQ")
    return np.ascontiguousarray(out, dtype=np.float32).reshape(-1, frames.shape[1])
