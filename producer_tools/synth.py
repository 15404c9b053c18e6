"""Synthetic multi-speaker calls with their references: audio, JSON transcript and RTTM turns.

A call is drawn from a seed: who speaks each turn (the first turns introduce speakers A, B, … in
order, then the floor passes to one of the others at random), what they say (sentences from a
fixed pool, shuffled), and, through ``conversation.make_conversation``, where turns overlap. The
voices are espeak-ng's, which is deterministic, so one seed gives the same bytes on every run.

Audio options: stereo puts one party per channel (speakers A, C, E on the left, B, D, F on the
right, as an agent/caller recording does); ``telephone`` band-limits to 300–3400 Hz, resamples to
8 kHz and writes G.711 μ-law. Neither moves a turn, so the references hold for every variant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import numpy as np
import soundfile
import soxr

from producer_tools.conversation import (
    DEFAULT_SPEED_WPM,
    SAMPLE_RATE,
    VOICES,
    Conversation,
    Turn,
    make_conversation,
    synthesise,
)
from producer_tools.reference import Reference, SpeakerTurn, write_rttm, write_transcript

# The canned calls' three voices first, then three more that are easy to tell apart.
SYNTH_VOICES: Final = (*VOICES, "en-us+f4", "en-gb-x-rp+m7", "en-029+f2")
MAX_SPEAKERS: Final = len(SYNTH_VOICES)
TELEPHONE_BAND_HZ: Final = (300.0, 3400.0)
TELEPHONE_RATE: Final = 8000
_BAND_ORDER: Final = 4  # Butterworth sections applied forward and back: no phase shift
AUDIO_SUFFIXES: Final = (".wav", ".flac")

SENTENCES: Final = (
    "Thanks for calling, how can I help you today?",
    "I was charged twice for my last invoice.",
    "Can you give me your account number please?",
    "Sure, it is four seven two nine one.",
    "I can see the duplicate payment on your account.",
    "The refund should reach you within five working days.",
    "My internet connection keeps dropping every evening.",
    "Have you tried restarting the router?",
    "Yes, twice this morning, and it did not help.",
    "I will book an engineer to visit on Thursday.",
    "Thursday afternoon works well for me.",
    "Is there anything else I can help with?",
    "I would like to change my delivery address.",
    "What is the new address, including the postcode?",
    "It is twelve Station Road, near the old bridge.",
    "The parcel left our warehouse this morning.",
    "Could you send me a confirmation by email?",
    "Of course, you should have it in a few minutes.",
    "I am calling about the appointment next week.",
    "We have a free slot on Monday at ten.",
    "Monday is fine, thank you very much.",
    "Let me transfer you to our billing team.",
    "Please hold the line for a moment.",
    "Sorry for the wait, I am back now.",
    "The error message says the password has expired.",
    "I have reset it, please try logging in again.",
    "That worked, I can see my messages now.",
    "Your contract renews at the end of the month.",
    "Can I upgrade to the faster plan instead?",
    "The faster plan costs five pounds more each month.",
    "Great, please go ahead and switch me over.",
    "You are all set, have a lovely day.",
)


class SynthError(ValueError):
    """A synthetic call cannot be made as asked (bad recipe, unwritable output)."""


@dataclass(frozen=True, slots=True)
class SynthSpec:
    """The recipe of one synthetic call; the same recipe gives the same bytes."""

    speakers: int = 2
    turns: int = 8
    seed: int = 0
    overlap_probability: float = 0.3
    overlap_s: float = 0.4
    gap_s: float = 0.3
    stereo: bool = False
    telephone: bool = False
    speed_wpm: int = DEFAULT_SPEED_WPM

    def __post_init__(self) -> None:
        if not 1 <= self.speakers <= MAX_SPEAKERS:
            raise SynthError(f"speakers must be 1..{MAX_SPEAKERS}, got {self.speakers}")
        if self.turns < self.speakers:
            raise SynthError(
                f"{self.turns} turn(s) cannot give each of {self.speakers} speakers a turn"
            )
        if not 0 <= self.overlap_probability <= 1:
            raise SynthError(f"overlap probability must be 0..1, got {self.overlap_probability}")
        if self.overlap_s < 0 or self.gap_s < 0:
            raise SynthError("overlap and gap must be 0 s or more")
        if not 80 <= self.speed_wpm <= 450:  # espeak-ng's own range
            raise SynthError(f"speed must be 80..450 words per minute, got {self.speed_wpm}")

    @property
    def sample_rate(self) -> int:
        return TELEPHONE_RATE if self.telephone else SAMPLE_RATE

    @property
    def channels(self) -> int:
        return 2 if self.stereo else 1


@dataclass(frozen=True, slots=True)
class SynthCall:
    """A synthetic call: frames ``(n_frames, channels)`` and the reference turns."""

    spec: SynthSpec
    frames: np.ndarray
    reference: Reference
    voices: tuple[str, ...]  # of each speaker, A first

    @property
    def duration_s(self) -> float:
        return self.frames.shape[0] / self.spec.sample_rate


def speaker_label(index: int) -> str:
    """Reference speaker names: A, B, C, …"""
    return chr(ord("A") + index)


def channel_of(speaker: int, spec: SynthSpec) -> int:
    return speaker % 2 if spec.stereo else 0


def script(spec: SynthSpec) -> list[Turn]:
    """Who says what, in order: the first turns introduce the speakers, then the floor passes
    to another speaker at random; sentences are the pool shuffled by the seed."""
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(SENTENCES))
    who = list(range(spec.speakers))
    for _ in range(spec.turns - spec.speakers):
        others = [s for s in range(spec.speakers) if s != who[-1]] or [who[-1]]
        who.append(others[int(rng.integers(len(others)))])
    return [
        (SYNTH_VOICES[speaker], SENTENCES[order[i % len(order)]]) for i, speaker in enumerate(who)
    ]


def make_call(
    spec: SynthSpec,
    recording: str,
    progress: Callable[[int, int, str], None] | None = None,
) -> SynthCall:
    """Synthesise the call of ``spec``; ``progress(done, total, voice)`` before each turn.

    Raises ``conversation.EspeakError`` when espeak-ng is missing or fails.
    """
    turns = script(spec)
    for i, (voice, text, *_) in enumerate(turns):
        if progress is not None:
            progress(i, len(turns), voice)
        synthesise(voice, text, speed_wpm=spec.speed_wpm)  # cached: make_conversation reuses it
    conv = make_conversation(
        turns,
        overlap_s=spec.overlap_s,
        gap_s=spec.gap_s,
        overlap_probability=spec.overlap_probability,
        seed=spec.seed,
        speed_wpm=spec.speed_wpm,
        name=recording,
    )
    reference = Reference(
        recording,
        tuple(
            SpeakerTurn(speaker_label(t.speaker), t.start_s, t.end_s, t.text) for t in conv.turns
        ),
    )
    return SynthCall(spec, _frames(conv, spec), reference, conv.voices)


def _frames(conv: Conversation, spec: SynthSpec) -> np.ndarray:
    frames = np.zeros((conv.audio.shape[0], spec.channels), dtype=np.float32)
    for speaker, track in enumerate(conv.tracks):
        frames[:, channel_of(speaker, spec)] += track
    if spec.telephone:
        frames = telephone(frames, conv.sample_rate)
    return frames


def telephone(frames: np.ndarray, sample_rate: int) -> np.ndarray:
    """Band-limit to 300–3400 Hz and resample to 8 kHz; ``(n, channels)`` in and out."""
    from scipy.signal import butter, sosfiltfilt

    sos = butter(_BAND_ORDER, TELEPHONE_BAND_HZ, btype="bandpass", fs=sample_rate, output="sos")
    band = sosfiltfilt(sos, frames.astype(np.float64), axis=0)
    narrow = soxr.resample(band, sample_rate, TELEPHONE_RATE, quality="HQ")
    return np.clip(narrow, -1.0, 1.0).astype(np.float32)


@dataclass(frozen=True, slots=True)
class SynthPaths:
    """Where a call and its references go: by default beside the audio, same stem."""

    audio: Path
    transcript: Path
    rttm: Path

    @classmethod
    def beside(
        cls, audio: str | Path, transcript: str | Path | None = None, rttm: str | Path | None = None
    ) -> SynthPaths:
        audio = Path(audio)
        return cls(
            audio,
            Path(transcript) if transcript else audio.with_suffix(".json"),
            Path(rttm) if rttm else audio.with_suffix(".rttm"),
        )

    def check(self, spec: SynthSpec) -> None:
        """Fail before any synthesis on outputs that cannot be written as asked."""
        suffix = self.audio.suffix.lower()
        if suffix not in AUDIO_SUFFIXES:
            raise SynthError(f"{self.audio}: write .wav or .flac, not {suffix or 'no suffix'!r}")
        if spec.telephone and suffix != ".wav":
            raise SynthError(f"{self.audio}: μ-law (--telephone) is written as .wav only")
        paths = (self.audio, self.transcript, self.rttm)
        if len(set(paths)) != len(paths):
            raise SynthError("audio, transcript and RTTM need three different paths")
        for path in paths:
            if not path.parent.is_dir():
                raise SynthError(f"{path}: folder {path.parent} does not exist")


def write_call(call: SynthCall, paths: SynthPaths) -> None:
    """Audio (16-bit PCM, or μ-law WAV for telephone), JSON transcript and RTTM."""
    spec = call.spec
    subtype = "ULAW" if spec.telephone else "PCM_16"
    soundfile.write(str(paths.audio), call.frames, spec.sample_rate, subtype=subtype)
    recipe = asdict(spec)
    write_transcript(
        paths.transcript,
        call.reference,
        extra={
            "audio": paths.audio.name,
            "duration_s": round(call.duration_s, 3),
            "sample_rate": spec.sample_rate,
            "channels": spec.channels,
            "encoding": "mulaw" if spec.telephone else "pcm_s16le",
            "recipe": recipe,
            "speakers": [
                {"speaker": speaker_label(i), "voice": voice, "channel": channel_of(i, spec)}
                for i, voice in enumerate(call.voices)
            ],
        },
    )
    write_rttm(paths.rttm, call.reference)
