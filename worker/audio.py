"""Audio decoding: payload bytes of one call → 16 kHz mono float32, the only input the engine takes.

Two layers:

* ``decode_pcm`` / ``encode_pcm`` are pure sample conversions (linear 16-bit PCM, G.711 μ-law and
  A-law per ITU-T G.711) with no state.
* ``AudioDecoder`` is one call's decoding state: its audio format, fixed by the first chunk, and a
  streaming resampler. Chunks arrive one at a time, so the resampler must carry its filter history
  from one chunk to the next; ``soxr.ResampleStream`` does, and the concatenation of
  ``decode`` outputs followed by ``flush`` equals resampling the whole call in one go.

Thread rules: none of this touches the GPU. An ``AudioDecoder`` is not thread safe; it belongs to
whichever thread owns its stream's state. The lookup tables are built once at import and never
written again, so the pure functions may run on any thread.

Errors: a payload this module cannot decode raises ``AudioFormatError`` with a machine-readable
``reason``; the worker turns it into a dead letter for that record and leaves other calls alone.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

import numpy as np
import soxr

TARGET_SAMPLE_RATE: Final = 16_000
SUPPORTED_SAMPLE_RATES: Final = frozenset(
    {8_000, 11_025, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000}
)
MAX_CHANNELS: Final = 2
# soxr's "HQ" preset (20-bit precision, 95% passband) is its default; speech needs no more.
RESAMPLE_QUALITY: Final = "HQ"


class Encoding(StrEnum):
    """Payload sample encodings we decode; values are the Avro ``AudioEncoding`` symbols."""

    PCM_S16LE = "PCM_S16LE"
    PCM_MULAW = "PCM_MULAW"
    PCM_ALAW = "PCM_ALAW"


BYTES_PER_SAMPLE: Final[dict[Encoding, int]] = {
    Encoding.PCM_S16LE: 2,
    Encoding.PCM_MULAW: 1,
    Encoding.PCM_ALAW: 1,
}


class AudioFormatError(Exception):
    """A payload or audio format this module cannot decode; ``reason`` is a stable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"AudioFormatError(reason={self.reason!r}, message={self.message!r})"


# --- G.711 -------------------------------------------------------------------------------------
# Decoding goes through a 256-entry table per law (code byte → 16-bit linear value), encoding
# through a 65536-entry table (16-bit linear value + 32768 → code byte). Both are derived from the
# reference algorithms of ITU-T G.711 (as in Sun's g711.c, which CPython's audioop also uses), so
# our bytes match every other G.711 implementation bit for bit.

_SEG_END_ULAW = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_SEG_END_ALAW = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def _ulaw_decode_table() -> np.ndarray:
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(code & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_decode_table() -> np.ndarray:
    code = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    magnitude = np.where(
        exponent == 0,
        (mantissa << 4) + 8,
        ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0),
    )
    return np.where(code & 0x80, magnitude, -magnitude).astype(np.int16)


def _ulaw_encode_table() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 2  # G.711 μ-law works on 14 bits
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm), 8159) + (0x84 >> 2)
    segment = np.searchsorted(_SEG_END_ULAW, magnitude, side="left")
    mantissa = (magnitude >> (segment + 1)) & 0x0F
    code = np.where(segment >= 8, 0x7F, (segment << 4) | mantissa)
    return (code ^ mask).astype(np.uint8)


def _alaw_encode_table() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 3  # G.711 A-law works on 13 bits
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    magnitude = np.where(pcm >= 0, pcm, -pcm - 1)
    segment = np.searchsorted(_SEG_END_ALAW, magnitude, side="left")
    shift = np.where(segment < 2, 1, segment)
    mantissa = (magnitude >> shift) & 0x0F
    code = np.where(segment >= 8, 0x7F, (segment << 4) | mantissa)
    return (code ^ mask).astype(np.uint8)


ULAW_DECODE: Final = _ulaw_decode_table()
ALAW_DECODE: Final = _alaw_decode_table()
_ULAW_ENCODE: Final = _ulaw_encode_table()
_ALAW_ENCODE: Final = _alaw_encode_table()
for _table in (ULAW_DECODE, ALAW_DECODE, _ULAW_ENCODE, _ALAW_ENCODE):
    _table.flags.writeable = False

# Float samples are int16 / 32768, so full scale is [-1, 1 - 2**-15]; G.711 peaks are a little
# lower still (μ-law ±32124, A-law ±32256).
_INT16_SCALE: Final = 32768.0


# --- format ------------------------------------------------------------------------------------


def parse_encoding(encoding: Encoding | str) -> Encoding:
    """The ``Encoding`` for an enum member or Avro symbol; ``unsupported_encoding`` otherwise."""
    try:
        return Encoding(str(encoding))
    except ValueError:
        supported = ", ".join(e.value for e in Encoding)
        raise AudioFormatError(
            "unsupported_encoding",
            f"unsupported audio encoding {str(encoding)!r}; supported: {supported}",
        ) from None


def check_format(encoding: Encoding | str, sample_rate: int, channels: int) -> Encoding:
    """Validate one audio format; returns the parsed encoding or raises ``AudioFormatError``."""
    parsed = parse_encoding(encoding)
    if sample_rate not in SUPPORTED_SAMPLE_RATES:
        rates = ", ".join(str(r) for r in sorted(SUPPORTED_SAMPLE_RATES))
        raise AudioFormatError(
            "unsupported_sample_rate",
            f"unsupported sample rate {sample_rate} Hz; supported: {rates}",
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioFormatError(
            "unsupported_channels",
            f"unsupported channel count {channels}; supported: 1 to {MAX_CHANNELS}",
        )
    return parsed


# --- pure sample conversion --------------------------------------------------------------------


def decode_pcm(payload: bytes, encoding: Encoding | str, channels: int = 1) -> np.ndarray:
    """Interleaved payload bytes → float32 frames of shape ``(n_frames, channels)`` in [-1, 1).

    The payload must hold whole frames: a sample split across two chunks is an error
    (``misaligned_payload``), not something we stitch back together.
    """
    enc = parse_encoding(encoding)
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioFormatError(
            "unsupported_channels",
            f"unsupported channel count {channels}; supported: 1 to {MAX_CHANNELS}",
        )
    frame_bytes = BYTES_PER_SAMPLE[enc] * channels
    if len(payload) % frame_bytes:
        raise AudioFormatError(
            "misaligned_payload",
            f"payload of {len(payload)} bytes is not a whole number of {frame_bytes}-byte "
            f"frames ({enc.value}, {channels} channel(s))",
        )
    if enc is Encoding.PCM_S16LE:
        linear = np.frombuffer(payload, dtype="<i2")
    else:
        table = ULAW_DECODE if enc is Encoding.PCM_MULAW else ALAW_DECODE
        linear = table[np.frombuffer(payload, dtype=np.uint8)]
    samples = linear.astype(np.float32) / np.float32(_INT16_SCALE)
    return samples.reshape(-1, channels)


def encode_pcm(samples: np.ndarray, encoding: Encoding | str) -> bytes:
    """Float samples in [-1, 1] → payload bytes; 2-D input ``(n_frames, channels)`` is interleaved.

    Values outside [-1, 1) are clipped. For producer tools and tests; the worker only decodes.
    """
    enc = parse_encoding(encoding)
    scaled = np.rint(np.asarray(samples, dtype=np.float64) * _INT16_SCALE)
    linear = np.clip(scaled, -32768, 32767).astype(np.int16).reshape(-1)
    if enc is Encoding.PCM_S16LE:
        return linear.astype("<i2").tobytes()
    table = _ULAW_ENCODE if enc is Encoding.PCM_MULAW else _ALAW_ENCODE
    return table[linear.astype(np.int32) + 32768].tobytes()


def to_mono(frames: np.ndarray, channel: int | None = None) -> np.ndarray:
    """``(n_frames, channels)`` → 1-D: the mean of the channels, or one channel by index.

    A mono input is returned as is whatever ``channel`` says: it has only one channel to take.
    """
    n_channels = frames.shape[1]
    if n_channels == 1:
        return frames[:, 0]
    if channel is None:
        return frames.mean(axis=1, dtype=np.float32)
    if not 0 <= channel < n_channels:
        raise AudioFormatError(
            "unsupported_channels",
            f"channel {channel} selected but the stream has {n_channels} channel(s)",
        )
    return frames[:, channel]


# --- per-stream decoder ------------------------------------------------------------------------


class AudioDecoder:
    """One call's audio decoding: fixed format, channel choice, and resampler state.

    ``decode`` returns whatever 16 kHz output the resampler has ready; because of the resampling
    filter's delay this is released in blocks and lags the input by a few milliseconds (at most
    ``delay_samples``), and may be empty for a small chunk. ``flush`` at the end of the call
    (``soxr``'s ``last=True``) returns the held-back tail, after which the total output length is
    ``n_input_frames * 16000 / sample_rate`` to within a sample, and the samples equal a
    one-shot resample of the whole call. A 16 kHz stream bypasses the resampler and has no delay.
    """

    def __init__(
        self,
        encoding: Encoding | str,
        sample_rate: int,
        channels: int = 1,
        channel: int | None = None,
    ) -> None:
        """``channel``: ``None`` mixes all channels down (mean); an index keeps that channel."""
        self.encoding = check_format(encoding, sample_rate, channels)
        self.sample_rate = sample_rate
        self.channels = channels
        if channel is not None and not 0 <= channel < MAX_CHANNELS:
            raise ValueError(f"channel must be None or 0..{MAX_CHANNELS - 1}, got {channel}")
        self.channel = channel
        self.frames_in = 0
        self.samples_out = 0
        self._finished = False
        self._resampler: soxr.ResampleStream | None = None
        if sample_rate != TARGET_SAMPLE_RATE:
            self._resampler = soxr.ResampleStream(
                sample_rate, TARGET_SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY
            )

    @property
    def delay_samples(self) -> float:
        """Output samples the resampler holds back right now (0 at 16 kHz)."""
        return 0.0 if self._resampler is None else float(self._resampler.delay())

    def check_same_format(self, encoding: Encoding | str, sample_rate: int, channels: int) -> None:
        """Raise ``format_changed`` unless a chunk's declared format is this stream's format."""
        declared = (str(encoding), sample_rate, channels)
        if declared != (self.encoding.value, self.sample_rate, self.channels):
            raise AudioFormatError(
                "format_changed",
                f"audio format changed mid-stream from {self.encoding.value}/{self.sample_rate} Hz/"
                f"{self.channels} ch to {declared[0]}/{sample_rate} Hz/{channels} ch",
            )

    def decode(
        self,
        payload: bytes,
        *,
        encoding: Encoding | str | None = None,
        sample_rate: int | None = None,
        channels: int | None = None,
    ) -> np.ndarray:
        """Decode the next chunk of this call; returns 16 kHz mono float32 (possibly empty).

        Pass the chunk's declared format (all three or none) to have it checked against the
        stream's; a mismatch raises ``format_changed`` and leaves the decoder state untouched.
        """
        if self._finished:
            raise RuntimeError("AudioDecoder.decode() after flush(): the stream has ended")
        given = (encoding, sample_rate, channels)
        if any(v is not None for v in given):
            if any(v is None for v in given):
                raise ValueError("pass encoding, sample_rate and channels together, or none")
            self.check_same_format(encoding, sample_rate, channels)  # type: ignore[arg-type]
        mono = to_mono(decode_pcm(payload, self.encoding, self.channels), self.channel)
        self.frames_in += mono.shape[0]
        if self._resampler is None:
            out = np.ascontiguousarray(mono, dtype=np.float32)
        else:
            out = self._resampler.resample_chunk(np.ascontiguousarray(mono), last=False)
        return self._emit(out)

    def flush(self) -> np.ndarray:
        """End the stream: return the resampler's held-back tail. Later calls return nothing."""
        if self._finished or self._resampler is None:
            self._finished = True
            return np.zeros(0, dtype=np.float32)
        self._finished = True
        tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        return self._emit(tail)

    def _emit(self, out: np.ndarray) -> np.ndarray:
        # The resampling filter can overshoot full scale a little near clipped input.
        out = np.clip(out, -1.0, 1.0, out=out if out.flags.writeable else None)
        self.samples_out += out.shape[0]
        return out
