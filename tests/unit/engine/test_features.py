"""worker.engine.features: audio fed piece by piece gives exactly NeMo's whole-file chunks.

The reference is NeMo's ``CacheAwareStreamingAudioBuffer`` (no online normalisation,
``pad_and_drop_preencoded=True``) over the whole signal at once: the same number of chunks, the
same valid lengths, the same last-chunk flag (its ``is_buffer_empty()`` after each chunk) and the
same values, whatever the sizes of the pieces the audio arrives in.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from nemo.collections.asr.parts.utils.streaming_utils import CacheAwareStreamingAudioBuffer

from worker.engine.engine import StreamingEngine
from worker.engine.features import ChunkLayout, FeatureExtractor, StreamFeatures, take_chunks
from worker.engine.models import LoadedModels

HOP = 160  # 10 ms at 16 kHz
TOLERANCE = 1e-5  # float32 log-mel: the same arithmetic on a shorter span
RAGGED_PIECES = (1, 7, 160, 3333, 1, 401, 16000, 12, 2048, 159, 161)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tiny_models: LoadedModels) -> StreamingEngine:
    """An engine only for its set-up: the models' streaming settings, extractor and layout."""
    return StreamingEngine(tiny_models)


@pytest.fixture(scope="module")
def extractor(engine: StreamingEngine) -> FeatureExtractor:
    return engine.extractor


@pytest.fixture(scope="module")
def layout(engine: StreamingEngine) -> ChunkLayout:
    return engine.layout


def signal(n_samples: int, seed: int = 0) -> np.ndarray:
    """Speech-like test audio: tones, noise and a stretch of digital silence."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_samples) / 16000
    audio = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 1375 * t)
    audio += 0.05 * rng.standard_normal(n_samples)
    audio[n_samples // 3 : n_samples // 3 + 4000] = 0.0
    return audio.astype(np.float32)


def samples_for_frames(frames: int, extra: int = 0) -> int:
    """A signal length whose whole-file pass gives ``frames`` frames (``len // hop + 1``)."""
    assert 0 <= extra < HOP
    return (frames - 1) * HOP + extra


def nemo_chunks(model: torch.nn.Module, audio: np.ndarray) -> list[tuple[torch.Tensor, int, bool]]:
    buffer = CacheAwareStreamingAudioBuffer(
        model=model, online_normalization=False, pad_and_drop_preencoded=True
    )
    buffer.append_audio(audio, stream_id=-1)
    out = []
    for chunk, lengths in buffer:
        assert chunk.shape[0] == 1
        out.append((chunk[0], int(lengths[0]), buffer.is_buffer_empty()))
    return out


def pieces(audio: np.ndarray, sizes: tuple[int, ...]) -> Iterator[np.ndarray]:
    start = 0
    for size in itertools.cycle(sizes):
        if start >= len(audio):
            return
        yield audio[start : start + size]
        start += size


def streamed_chunks(
    extractor: FeatureExtractor, layout: ChunkLayout, audio: np.ndarray, sizes: tuple[int, ...]
) -> list[tuple[torch.Tensor, int, bool]]:
    """Chunks as the engine takes them: whenever one is ready, between pushes, then at the end."""
    stream = StreamFeatures(extractor, layout)
    out = []
    for piece in pieces(audio, sizes):
        stream.push(piece)
        while stream.chunk_ready():
            out.append(stream.take_chunk())
    stream.end()
    while stream.chunk_ready():
        out.append(stream.take_chunk())
    assert stream.finished()
    return out


LENGTHS = [
    pytest.param(1, id="one sample"),
    pytest.param(samples_for_frames(7, 10), id="under min frames"),
    pytest.param(samples_for_frames(8), id="exactly min frames"),
    pytest.param(8000, id="half a chunk"),
    pytest.param(samples_for_frames(112), id="one chunk exactly"),
    pytest.param(samples_for_frames(113, 159), id="one chunk and a frame"),
    pytest.param(samples_for_frames(224, 80), id="two chunks exactly"),
    pytest.param(samples_for_frames(2 * 112 + 5, 3), id="remainder under min frames"),
    pytest.param(samples_for_frames(2 * 112 + 8), id="remainder at min frames"),
    pytest.param(5 * 16000 + 1234, id="five seconds and change"),
]


@pytest.mark.parametrize("n_samples", LENGTHS)
@pytest.mark.parametrize(
    "sizes", [RAGGED_PIECES, (1,), (16000,)], ids=["ragged", "one sample", "one second"]
)
def test_incremental_chunks_equal_nemo_whole_file(
    tiny_models: LoadedModels,
    extractor: FeatureExtractor,
    layout: ChunkLayout,
    n_samples: int,
    sizes: tuple[int, ...],
) -> None:
    if sizes == (1,) and n_samples > 20000:
        pytest.skip("sample-by-sample pushing of long signals is slow and adds nothing")
    audio = signal(n_samples)
    expected = nemo_chunks(tiny_models.asr, audio)
    got = streamed_chunks(extractor, layout, audio, sizes)

    assert len(got) == len(expected)
    for i, ((chunk, length, last), (ref, ref_length, ref_last)) in enumerate(
        zip(got, expected, strict=True)
    ):
        assert chunk.dtype == torch.float32
        assert chunk.shape == (extractor.n_mels, layout.input_frames), f"chunk {i}"
        assert length == ref_length == ref.shape[-1], f"chunk {i}"
        assert last == ref_last, f"chunk {i}"
        torch.testing.assert_close(chunk[:, :length], ref, rtol=0, atol=TOLERANCE)
        assert not chunk[:, length:].any(), f"chunk {i}: padding beyond the valid length"


def test_batched_chunks_of_streams_of_different_ages_equal_nemo(
    tiny_models: LoadedModels, extractor: FeatureExtractor, layout: ChunkLayout
) -> None:
    """Streams of different lengths, started at different ticks and fed in different piece
    sizes, have their chunks computed together (``take_chunks`` over every ready stream): each
    stream's chunks still equal NeMo's whole-file chunks of that stream alone. The batches mix
    first chunks (zero lead), later chunks and short last chunks."""
    lengths = [5 * 16000 + 1234, samples_for_frames(113, 159), 3 * 16000 + 77, 9000, 7 * 16000]
    sizes = [(320,), RAGGED_PIECES, (16000,), (640, 1), (5937, 320)]
    audios = [signal(n, seed=k) for k, n in enumerate(lengths)]
    feeds = [pieces(audio, size) for audio, size in zip(audios, sizes, strict=True)]
    streams = [StreamFeatures(extractor, layout) for _ in audios]
    got: list[list[tuple[torch.Tensor, int, bool]]] = [[] for _ in audios]
    batch_kinds = []
    for tick in range(100_000):
        for k, stream in enumerate(streams):
            if tick < 7 * k or stream.ended:
                continue
            piece = next(feeds[k], None)
            if piece is None:
                stream.end()
            else:
                stream.push(piece)
        ready = [k for k, stream in enumerate(streams) if stream.chunk_ready()]
        if ready:
            kinds = {("first" if streams[k].chunks_done == 0 else "later") for k in ready}
            batch = take_chunks([streams[k] for k in ready])
            assert batch.lengths.tolist() == batch.host_lengths
            for row, k in enumerate(ready):
                length = batch.host_lengths[row]
                got[k].append((batch.chunks[row], length, batch.last[row]))
                if length < layout.input_frames:
                    kinds.add("short")
            batch_kinds.append((len(ready), kinds))
        if all(stream.finished() for stream in streams):
            break
    assert any(n > 1 and {"first", "later"} <= kinds for n, kinds in batch_kinds)
    assert any(n > 1 and "short" in kinds for n, kinds in batch_kinds)
    for k, audio in enumerate(audios):
        expected = nemo_chunks(tiny_models.asr, audio)
        assert len(got[k]) == len(expected), f"stream {k}"
        for i, ((chunk, length, last), (ref, ref_length, ref_last)) in enumerate(
            zip(got[k], expected, strict=True)
        ):
            assert (length, last) == (ref_length, ref_last), f"stream {k} chunk {i}"
            torch.testing.assert_close(chunk[:, :length], ref, rtol=0, atol=TOLERANCE)
            assert not chunk[:, length:].any(), f"stream {k} chunk {i}: padding not zero"


def test_push_only_buffers_audio(extractor: FeatureExtractor, layout: ChunkLayout, monkeypatch):
    """Pushing never runs the preprocessor: features are computed when a step takes chunks."""
    calls = []
    monkeypatch.setattr(extractor, "frames_batch", lambda spans: calls.append(spans))
    stream = StreamFeatures(extractor, layout)
    for piece in pieces(signal(3 * 16000), (320,)):
        stream.push(piece)
    assert stream.chunk_ready()
    assert calls == []


def test_short_stream_runs_one_chunk_at_its_end(extractor: FeatureExtractor, layout: ChunkLayout):
    """Like NeMo's buffer, a call shorter than ``min_frames`` still gets its one first chunk."""
    stream = StreamFeatures(extractor, layout)
    stream.push(signal(samples_for_frames(layout.min_frames - 1)))
    assert not stream.chunk_ready()
    assert not stream.finished()
    stream.end()
    assert stream.chunk_ready()
    _, length, last = stream.take_chunk()
    assert last and length == layout.pre_cache_frames + stream.total_frames
    assert stream.finished()


def test_empty_stream_is_finished_at_its_end(extractor: FeatureExtractor, layout: ChunkLayout):
    stream = StreamFeatures(extractor, layout)
    stream.push(np.zeros(0, dtype=np.float32))
    stream.end()
    assert stream.finished()
    assert stream.total_frames == 0


def test_full_chunk_waits_for_one_frame_beyond_it(extractor, layout) -> None:
    """Whether a chunk is the last changes the encoder's treatment, so it is not run early."""
    stream = StreamFeatures(extractor, layout)
    # Enough samples for exactly chunk_frames complete frames (frame t needs t*hop + half).
    stream.push(signal((layout.chunk_frames - 1) * HOP + extractor.half_window))
    assert stream.total_frames == layout.chunk_frames
    assert not stream.chunk_ready()
    stream.push(signal(HOP))
    assert stream.chunk_ready()


def test_push_after_end_is_refused(extractor: FeatureExtractor, layout: ChunkLayout) -> None:
    stream = StreamFeatures(extractor, layout)
    stream.end()
    with pytest.raises(ValueError, match="after the end"):
        stream.push(signal(10))


def test_memory_stays_bounded_over_a_long_signal(extractor, layout) -> None:
    """Five minutes in 0.37 s pieces, chunks taken as they become ready: the buffer never holds
    more than the audio of a chunk with its lead frames and half a window, one piece, and the
    pre-cache."""
    piece = 5937
    stream = StreamFeatures(extractor, layout)
    frame_bytes = extractor.n_mels * 4
    chunk_audio = (layout.chunk_frames + 2) * HOP + extractor.half_window  # 2 lead frames
    bound = (chunk_audio + piece) * 4 + layout.pre_cache_frames * frame_bytes
    sizes = []
    base = signal(16000 * 30, seed=3)
    chunks = 0
    for _ in range(10):  # 10 x 30 s
        for part in pieces(base, (piece,)):
            stream.push(part)
            sizes.append(stream.nbytes())
            while stream.chunk_ready():
                stream.take_chunk()
                chunks += 1
    assert chunks >= 300 // 1.12 - 2
    assert max(sizes) <= bound
    # No drift: the last minute peaks no higher than the first (give or take one frame).
    minute = len(sizes) // 5
    assert max(sizes[-minute:]) <= max(sizes[:minute]) + frame_bytes
