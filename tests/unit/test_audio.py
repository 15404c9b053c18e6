"""worker.audio: G.711 tables against CPython's audioop, codec round trips, streaming resampling."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import soxr

from worker.audio import (
    ALAW_DECODE,
    MAX_CHANNELS,
    SUPPORTED_SAMPLE_RATES,
    TARGET_SAMPLE_RATE,
    ULAW_DECODE,
    AudioDecoder,
    AudioFormatError,
    Encoding,
    decode_pcm,
    encode_pcm,
    to_mono,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop  # deprecated in 3.11, gone in 3.13: only the reference, only in tests
    except ImportError:
        audioop = None

needs_audioop = pytest.mark.skipif(audioop is None, reason="audioop is gone (Python >= 3.13)")

SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "audio_chunk.avsc"
ALL_INT16 = np.arange(-32768, 32768, dtype="<i2")


def tone(n: int, rate: int, seed: int = 0) -> np.ndarray:
    """A speech-band test signal: two tones plus a little noise, peak below 0.8."""
    t = np.arange(n) / rate
    rng = np.random.default_rng(seed)
    x = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 1234 * t)
    return (x + 0.02 * rng.standard_normal(n)).astype(np.float32)


def test_encodings_match_schema_symbols() -> None:
    field = next(f for f in json.loads(SCHEMA.read_text())["fields"] if f["name"] == "encoding")
    assert {e.value for e in Encoding} == set(field["type"]["symbols"]) - {"UNKNOWN"}


# --- G.711 against the reference ---------------------------------------------------------------


@needs_audioop
@pytest.mark.parametrize(
    ("table", "reference"),
    [(ULAW_DECODE, "ulaw2lin"), (ALAW_DECODE, "alaw2lin")],
    ids=["mulaw", "alaw"],
)
def test_decode_table_matches_audioop(table: np.ndarray, reference: str) -> None:
    expected = np.frombuffer(getattr(audioop, reference)(bytes(range(256)), 2), dtype="<i2")
    np.testing.assert_array_equal(table, expected)


@needs_audioop
@pytest.mark.parametrize(
    ("encoding", "reference"),
    [(Encoding.PCM_MULAW, "lin2ulaw"), (Encoding.PCM_ALAW, "lin2alaw")],
    ids=["mulaw", "alaw"],
)
def test_encode_matches_audioop_for_every_int16(encoding: Encoding, reference: str) -> None:
    ours = encode_pcm(ALL_INT16.astype(np.float32) / 32768, encoding)
    assert ours == getattr(audioop, reference)(ALL_INT16.tobytes(), 2)


@pytest.mark.parametrize(
    ("table", "peak", "zero_codes"),
    [(ULAW_DECODE, 32124, {0x7F, 0xFF}), (ALAW_DECODE, 32256, set())],
    ids=["mulaw", "alaw"],
)
def test_decode_table_standard_values(table: np.ndarray, peak: int, zero_codes: set[int]) -> None:
    # Known G.711 facts, independent of audioop: peaks, and μ-law's two zero codes.
    assert table.max() == peak and table.min() == -peak
    assert {int(c) for c in np.flatnonzero(table == 0)} == zero_codes
    assert int(ALAW_DECODE[0xD5]) == 8 and int(ALAW_DECODE[0x55]) == -8


# --- round trips -------------------------------------------------------------------------------

# Bounds on |error|: s16 is off by at most half an LSB; G.711 keeps 4 mantissa bits, so its
# largest step is 1024/32768 for both laws (the decoder returns a step's midpoint, so the real
# worst case is about half that; one step is the loose bound we hold it to).
ROUND_TRIP = [
    (Encoding.PCM_S16LE, 0.5 / 32768),
    (Encoding.PCM_MULAW, 1024 / 32768),
    (Encoding.PCM_ALAW, 1024 / 32768),
]


@pytest.mark.parametrize(("encoding", "max_error"), ROUND_TRIP, ids=lambda v: str(v))
@pytest.mark.parametrize("channels", [1, 2])
def test_round_trip(encoding: Encoding, max_error: float, channels: int) -> None:
    x = np.stack([tone(4000, 8000, seed=c) for c in range(channels)], axis=1)
    payload = encode_pcm(x, encoding)
    assert len(payload) == x.size * (2 if encoding is Encoding.PCM_S16LE else 1)
    y = decode_pcm(payload, encoding, channels)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - x).max() <= max_error + 1e-7


@pytest.mark.parametrize("encoding", [Encoding.PCM_MULAW, Encoding.PCM_ALAW])
def test_g711_relative_error_is_small_for_quiet_samples(encoding: Encoding) -> None:
    # The point of companding: quiet speech keeps ~ the same relative precision as loud speech.
    x = np.linspace(0.01, 0.9, 500, dtype=np.float32)
    y = decode_pcm(encode_pcm(x, encoding), encoding)[:, 0]
    assert np.max(np.abs(y - x) / x) < 0.07


def test_s16le_is_little_endian_and_scaled_by_32768() -> None:
    y = decode_pcm(b"\x00\x80\xff\x7f\x00\x40", "PCM_S16LE")
    np.testing.assert_array_equal(y[:, 0], np.array([-1.0, 32767 / 32768, 0.5], np.float32))


def test_encode_clips_out_of_range() -> None:
    assert encode_pcm(np.array([2.0, -2.0]), Encoding.PCM_S16LE) == b"\xff\x7f\x00\x80"


# --- resampling --------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", sorted(SUPPORTED_SAMPLE_RATES))
def test_each_rate_output_length(rate: int) -> None:
    n = rate // 2 + 7  # half a second, not a round number of anything
    decoder = AudioDecoder(Encoding.PCM_S16LE, rate)
    out = decoder.decode(encode_pcm(tone(n, rate), Encoding.PCM_S16LE))
    total = np.concatenate([out, decoder.flush()])
    assert total.dtype == np.float32 and total.ndim == 1
    assert abs(total.shape[0] - n * TARGET_SAMPLE_RATE / rate) <= 1
    assert decoder.frames_in == n and decoder.samples_out == total.shape[0]


@pytest.mark.parametrize("rate", [8_000, 11_025, 44_100, 48_000])
def test_streaming_resample_equals_one_shot(rate: int) -> None:
    x = tone(rate, rate)  # one second
    payload = encode_pcm(x, Encoding.PCM_S16LE)
    whole = decode_pcm(payload, Encoding.PCM_S16LE)[:, 0]
    one_shot = soxr.resample(whole, rate, TARGET_SAMPLE_RATE, quality="HQ")

    decoder = AudioDecoder(Encoding.PCM_S16LE, rate)
    cuts = np.cumsum(np.random.default_rng(rate).integers(1, 2000, size=rate))  # ragged chunks
    chunks = np.split(np.frombuffer(payload, dtype="<i2"), cuts[cuts < x.shape[0]])
    pieces = [decoder.decode(chunk.tobytes()) for chunk in chunks]
    streamed = np.concatenate([*pieces, decoder.flush()])

    assert abs(streamed.shape[0] - one_shot.shape[0]) <= 2
    m = min(streamed.shape[0], one_shot.shape[0])
    np.testing.assert_allclose(streamed[:m], one_shot[:m], atol=1e-5)


def test_output_lags_input_until_flush() -> None:
    decoder = AudioDecoder(Encoding.PCM_S16LE, 8_000)
    first = decoder.decode(encode_pcm(tone(800, 8_000), Encoding.PCM_S16LE))
    assert first.shape[0] < 1600 and decoder.delay_samples > 0
    assert first.shape[0] + decoder.flush().shape[0] == 1600
    assert decoder.flush().shape == (0,)
    with pytest.raises(RuntimeError):
        decoder.decode(b"")


def test_16khz_passes_through_unchanged() -> None:
    x = tone(1000, 16_000)
    decoder = AudioDecoder("PCM_S16LE", 16_000)
    out = decoder.decode(encode_pcm(x, "PCM_S16LE"))
    np.testing.assert_allclose(out, x, atol=1 / 32768)
    assert decoder.delay_samples == 0 and decoder.flush().shape == (0,)


def test_empty_payload_is_fine() -> None:
    decoder = AudioDecoder(Encoding.PCM_MULAW, 8_000, channels=2)
    assert decoder.decode(b"").shape == (0,)


# --- channels ----------------------------------------------------------------------------------


def stereo() -> np.ndarray:
    left = np.linspace(-0.5, 0.5, 1600, dtype=np.float32)
    return np.stack([left, np.full_like(left, 0.25)], axis=1)


@pytest.mark.parametrize(
    ("channel", "expected"),
    [(None, lambda s: s.mean(axis=1)), (0, lambda s: s[:, 0]), (1, lambda s: s[:, 1])],
    ids=["mixdown", "left", "right"],
)
def test_stereo_mixdown_and_channel_select(channel: int | None, expected) -> None:
    s = stereo()
    decoder = AudioDecoder(Encoding.PCM_S16LE, 16_000, channels=2, channel=channel)
    out = decoder.decode(encode_pcm(s, Encoding.PCM_S16LE))
    np.testing.assert_allclose(out, expected(s), atol=1 / 32768)


def test_stereo_is_interleaved_left_first() -> None:
    frames = decode_pcm(encode_pcm(np.array([[0.5, -0.5]]), "PCM_S16LE"), "PCM_S16LE", 2)
    np.testing.assert_array_equal(frames, np.array([[0.5, -0.5]], np.float32))


def test_mono_ignores_channel_select() -> None:
    x = tone(160, 16_000)
    decoder = AudioDecoder(Encoding.PCM_S16LE, 16_000, channels=1, channel=1)
    np.testing.assert_allclose(decoder.decode(encode_pcm(x, Encoding.PCM_S16LE)), x, atol=1 / 32768)


def test_bad_channel_index_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        AudioDecoder(Encoding.PCM_S16LE, 16_000, channels=2, channel=MAX_CHANNELS)
    with pytest.raises(AudioFormatError):
        to_mono(np.zeros((4, 2), np.float32), channel=2)


# --- errors ------------------------------------------------------------------------------------

ERRORS = [
    ("unsupported_encoding", lambda: AudioDecoder("UNKNOWN", 16_000)),
    ("unsupported_encoding", lambda: decode_pcm(b"", "PCM_F32LE")),
    ("unsupported_encoding", lambda: encode_pcm(np.zeros(1), "OPUS")),
    ("unsupported_sample_rate", lambda: AudioDecoder(Encoding.PCM_S16LE, 12_345)),
    ("unsupported_sample_rate", lambda: AudioDecoder(Encoding.PCM_S16LE, 0)),
    ("unsupported_channels", lambda: AudioDecoder(Encoding.PCM_S16LE, 16_000, channels=0)),
    ("unsupported_channels", lambda: AudioDecoder(Encoding.PCM_S16LE, 16_000, channels=3)),
    ("unsupported_channels", lambda: decode_pcm(b"\x00" * 6, Encoding.PCM_MULAW, 6)),
    ("misaligned_payload", lambda: decode_pcm(b"\x00" * 3, Encoding.PCM_S16LE)),
    ("misaligned_payload", lambda: decode_pcm(b"\x00" * 6, Encoding.PCM_S16LE, 2)),
    ("misaligned_payload", lambda: decode_pcm(b"\x00" * 3, Encoding.PCM_ALAW, 2)),
    (
        "format_changed",
        lambda: AudioDecoder(Encoding.PCM_MULAW, 8_000).decode(
            b"\x00", encoding=Encoding.PCM_ALAW, sample_rate=8_000, channels=1
        ),
    ),
    (
        "format_changed",
        lambda: AudioDecoder(Encoding.PCM_MULAW, 8_000).check_same_format("PCM_MULAW", 16_000, 1),
    ),
    (
        "format_changed",
        lambda: AudioDecoder(Encoding.PCM_MULAW, 8_000).check_same_format("PCM_MULAW", 8_000, 2),
    ),
]


@pytest.mark.parametrize(("reason", "call"), ERRORS, ids=[r for r, _ in ERRORS])
def test_error_reasons(reason: str, call) -> None:
    with pytest.raises(AudioFormatError) as info:
        call()
    assert info.value.reason == reason
    assert str(info.value) == info.value.message


def test_same_format_passes_and_accepts_schema_enum_strings() -> None:
    decoder = AudioDecoder("PCM_MULAW", 8_000)
    out = decoder.decode(b"\xff" * 80, encoding="PCM_MULAW", sample_rate=8_000, channels=1)
    assert decoder.frames_in == 80 and out.dtype == np.float32


def test_format_change_leaves_state_untouched() -> None:
    decoder = AudioDecoder(Encoding.PCM_S16LE, 8_000)
    with pytest.raises(AudioFormatError):
        decoder.decode(b"\x00\x00", encoding="PCM_S16LE", sample_rate=16_000, channels=1)
    assert decoder.frames_in == 0
