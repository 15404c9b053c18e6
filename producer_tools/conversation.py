"""Reproducible synthetic calls: several espeak-ng voices on one timeline, with known turn times.

Each turn is spoken by ``espeak-ng`` (deterministic: the same voice, speed and text give the same
bytes), trimmed of its leading and trailing silence so that the reference start/end times are
when the voice is actually heard, resampled to 16 kHz, normalised to a fixed peak, and placed on
the timeline. The result keeps one track per speaker beside the mono mix, so tests can tell who
is audible where, and the reference turns can score diarization.

Placing turns: each turn starts ``gap`` seconds after the latest end of the turns before it; a
negative gap is an overlap. A turn may carry its own gap as a third element. Otherwise a change of
speaker overlaps the floor by ``overlap_s`` with probability ``overlap_probability`` (default
``OVERLAP_PROBABILITY``, drawn from ``seed``) and waits ``gap_s`` the rest of the time; a speaker
continuing always waits ``gap_s``.
Nobody overlaps their own earlier turn, and turns start in the order given.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Final

import numpy as np
import soxr

from worker.audio import Encoding, encode_pcm

SAMPLE_RATE: Final = 16_000
# Clearly different voices: an American man, a British woman, a Scottish man.
VOICES: Final = ("en-us", "en-gb+f3", "en-gb-scotland+m3")
DEFAULT_SPEED_WPM: Final = 165
OVERLAP_PROBABILITY: Final = 0.5
# Two overlapping turns at this peak cannot clip; three are scaled down after mixing.
TURN_PEAK: Final = 0.5
PAD_S: Final = 0.25  # silence before the first and after the last turn
# espeak-ng pads with digital silence and fades out over a few LSBs: below this is not speech.
_SILENCE_THRESHOLD: Final = 1e-3

Turn = tuple[str, str] | tuple[str, str, float]
"""(voice, text) or (voice, text, gap_before_s); negative = overlap; unused on turn 0."""


class EspeakError(RuntimeError):
    """espeak-ng is missing or failed to synthesise a turn."""


@dataclass(frozen=True, slots=True)
class ReferenceTurn:
    """Who said what, and when (seconds from the start of ``Conversation.audio``)."""

    speaker: int  # 0, 1, … in order of first appearance
    voice: str
    text: str
    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True, slots=True)
class Conversation:
    """A synthetic call: the mono mix, one track per speaker, and the reference turns."""

    audio: np.ndarray  # float32, shape (n_samples,), the sum of ``tracks``
    turns: tuple[ReferenceTurn, ...]
    tracks: np.ndarray  # float32, shape (n_speakers, n_samples)
    sample_rate: int = SAMPLE_RATE
    name: str = ""

    @property
    def duration_s(self) -> float:
        return self.audio.shape[0] / self.sample_rate

    @property
    def voices(self) -> tuple[str, ...]:
        """Voice of each speaker index."""
        by_speaker = {t.speaker: t.voice for t in self.turns}
        return tuple(by_speaker[i] for i in range(len(by_speaker)))


def make_conversation(
    turns: Sequence[Turn],
    *,
    overlap_s: float = 0.3,
    gap_s: float = 0.2,
    overlap_probability: float = OVERLAP_PROBABILITY,
    seed: int = 0,
    speed_wpm: int = DEFAULT_SPEED_WPM,
    name: str = "",
) -> Conversation:
    """Synthesise ``turns`` and lay them out as one call; same inputs, same samples."""
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    if overlap_s < 0 or gap_s < 0:
        raise ValueError(f"overlap_s and gap_s must be >= 0, got {overlap_s} and {gap_s}")
    if not 0 <= overlap_probability <= 1:
        raise ValueError(f"overlap_probability must be in [0, 1], got {overlap_probability}")
    rng = np.random.default_rng(seed)
    speakers: dict[str, int] = {}
    for turn in turns:
        speakers.setdefault(turn[0], len(speakers))
    placed: list[tuple[int, int, int]] = []  # (start, end, speaker) in samples
    clips: list[np.ndarray] = []
    cursor = round(PAD_S * SAMPLE_RATE)  # where the floor becomes free
    for i, turn in enumerate(turns):
        speaker = speakers[turn[0]]
        clip = synthesise(turn[0], turn[1], speed_wpm=speed_wpm)
        start = _place(
            i,
            turn,
            speaker,
            cursor,
            placed,
            overlap_s=overlap_s,
            gap_s=gap_s,
            overlap_probability=overlap_probability,
            rng=rng,
        )
        placed.append((start, start + clip.shape[0], speaker))
        clips.append(clip)
        cursor = max(cursor, start + clip.shape[0])

    n_samples = cursor + round(PAD_S * SAMPLE_RATE)
    tracks = np.zeros((len(speakers), n_samples), dtype=np.float32)
    for (start, end, speaker), clip in zip(placed, clips, strict=True):
        tracks[speaker, start:end] += clip
    audio = tracks.sum(axis=0, dtype=np.float32)
    peak = float(np.abs(audio).max())
    if peak > 0.99:  # three voices at once: scale everything, tracks included, to stay consistent
        tracks *= np.float32(0.99 / peak)
        audio = tracks.sum(axis=0, dtype=np.float32)
    reference = tuple(
        ReferenceTurn(
            speaker=speaker,
            voice=turn[0],
            text=turn[1],
            start_s=start / SAMPLE_RATE,
            end_s=end / SAMPLE_RATE,
        )
        for turn, (start, end, speaker) in zip(turns, placed, strict=True)
    )
    return Conversation(audio=audio, turns=reference, tracks=tracks, name=name)


def _place(
    index: int,
    turn: Turn,
    speaker: int,
    cursor: int,
    placed: list[tuple[int, int, int]],
    *,
    overlap_s: float,
    gap_s: float,
    overlap_probability: float,
    rng: np.random.Generator,
) -> int:
    """Start sample of turn ``index``, given the turns already ``placed`` and the free floor."""
    if index == 0:
        return cursor

    def clashes(start: int) -> bool:
        """Would the turn start before the previous one, or overlap its own speaker?"""
        return start < placed[-1][0] or any(end > start for _, end, who in placed if who == speaker)

    if len(turn) == 3:
        start = cursor + round(turn[2] * SAMPLE_RATE)
        if clashes(start):
            raise ValueError(
                f"turn {index} ({turn[0]!r}: {turn[1][:30]!r}) with gap {turn[2]} s would start "
                "before the previous turn or overlap its own speaker's earlier turn"
            )
        return start
    # Draw for every turn, used or not, so one turn's outcome does not shift the others'.
    wants_overlap = rng.random() < overlap_probability
    if wants_overlap and speaker != placed[-1][2]:
        start = cursor - round(overlap_s * SAMPLE_RATE)
        if not clashes(start):
            return start
    return cursor + round(gap_s * SAMPLE_RATE)


def synthesise(voice: str, text: str, *, speed_wpm: int = DEFAULT_SPEED_WPM) -> np.ndarray:
    """One utterance as 16 kHz float32, silence trimmed, peak ``TURN_PEAK``; a fresh array."""
    return _synthesise(_espeak(), voice, text, speed_wpm).copy()


def _espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise EspeakError(
            "espeak-ng not found on PATH; install espeak-ng: apt-get install espeak-ng"
        )
    return path


@lru_cache(maxsize=256)
def _synthesise(executable: str, voice: str, text: str, speed_wpm: int) -> np.ndarray:
    wav = espeak_wav(executable, voice, text, speed_wpm)
    with wave.open(io.BytesIO(wav)) as reader:
        rate, width, channels = reader.getframerate(), reader.getsampwidth(), reader.getnchannels()
        # --stdout cannot seek back to fix the header, so its length field is a placeholder:
        # read to the end of the data instead of trusting getnframes().
        frames = reader.readframes(len(wav))
    if width != 2 or channels != 1:
        raise EspeakError(f"espeak-ng produced {width * 8}-bit {channels}-channel audio")
    samples = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768
    voiced = np.flatnonzero(np.abs(samples) > _SILENCE_THRESHOLD)
    if voiced.size == 0:
        raise EspeakError(f"espeak-ng produced silence for {voice!r}: {text!r}")
    samples = samples[voiced[0] : voiced[-1] + 1]
    resampled = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    resampled *= np.float32(TURN_PEAK / np.abs(resampled).max())
    resampled.flags.writeable = False  # cached and shared; callers get copies
    return resampled


def espeak_wav(executable: str, voice: str, text: str, speed_wpm: int) -> bytes:
    """Raw WAV bytes from ``espeak-ng -v voice -s speed --stdout``; text goes in on stdin."""
    result = subprocess.run(
        [executable, "-v", voice, "-s", str(speed_wpm), "--stdout"],
        input=text.encode(),
        capture_output=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0 or not result.stdout:
        detail = result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}"
        raise EspeakError(f"espeak-ng failed for voice {voice!r}: {detail}")
    return result.stdout


# --- canned calls ------------------------------------------------------------------------------

US, GB, SCOT = VOICES

DEFAULT_SCRIPTS: Final[dict[str, tuple[Turn, ...]]] = {
    "billing": (
        (US, "Thanks for calling Northwind billing. How can I help you today?"),
        (GB, "Hi, I was charged twice for my March invoice.", -0.4),
        (US, "I'm sorry about that. Can you give me the invoice number?"),
        (GB, "Yes, it's four four seven two nine.", 0.3),
        (US, "Got it. I'll refund the duplicate now.", -0.3),
    ),
    "appointment": (
        (GB, "Good morning, Riverside dental practice."),
        (US, "Hello, I'd like to move my appointment on Friday."),
        (GB, "Of course. Would Monday at ten work for you?", -0.5),
        (US, "Monday at ten is perfect, thank you.", -0.3),
        (GB, "Lovely, you're all booked."),
    ),
    "delivery": (
        (US, "Hey, my package was supposed to arrive yesterday but it never came."),
        (GB, "Let me check the tracking for you.", -0.6),
        (GB, "It looks like the courier left it at the front desk.", 0.5),
        (US, "Oh, I didn't think to look there. Thanks so much.", -0.35),
    ),
    "transfer": (
        (US, "Support desk, this is Sam speaking."),
        (GB, "Hi Sam, my laptop won't connect to the office network."),
        (US, "I'll bring in our network engineer. One moment please.", -0.3),
        (SCOT, "Hello there, can you read me the error message?"),
        (GB, "It says the certificate has expired.", -0.4),
        (SCOT, "Right, I'll renew it for you now.", -0.3),
    ),
}


def default_conversations() -> dict[str, Conversation]:
    """The four canned calls (three two-speaker, one three-speaker), ~8–15 s each."""
    return {name: make_conversation(script, name=name) for name, script in DEFAULT_SCRIPTS.items()}


# --- WAV files ---------------------------------------------------------------------------------


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write float samples in [-1, 1] as 16-bit PCM WAV; 2-D input is ``(n_frames, channels)``."""
    frames = np.asarray(audio, dtype=np.float32)
    channels = 1 if frames.ndim == 1 else frames.shape[1]
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(2)
        writer.setframerate(sample_rate)
        writer.writeframes(encode_pcm(frames, Encoding.PCM_S16LE))


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV → (float32 samples, sample rate); mono is 1-D, else ``(n, channels)``."""
    with wave.open(str(path), "rb") as reader:
        width, channels = reader.getsampwidth(), reader.getnchannels()
        rate = reader.getframerate()
        frames = reader.readframes(reader.getnframes())
    if width != 2:
        raise ValueError(f"{path}: {width * 8}-bit WAV; only 16-bit PCM is supported")
    samples = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768
    return (samples if channels == 1 else samples.reshape(-1, channels)), rate
