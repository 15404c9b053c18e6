"""Incremental log-mel features and the fixed-size chunks the streaming models step on.

NeMo computes features over a whole file and then cuts chunks (``CacheAwareStreamingAudioBuffer``);
appending audio piece by piece to that buffer gives different features at every boundary. A live
call arrives piece by piece, so this module computes, for audio received so far, exactly the
frames a whole-file pass would give, and cuts the same chunks the NeMo buffer cuts with
``pad_and_drop_preencoded=True`` (every chunk the same size, which batching needs).

Pushing audio only appends samples to the stream's buffer: at 20 ms records a preprocessor call
per record costs more CPU than a few hundred calls can afford. Features are computed when a
chunk is taken, for every stream of a model step at once (``take_chunks``): one host→device
copy and one preprocessor call over the chunk's span of each stream, padded to the longest.

Each span starts ``_LEAD_FRAMES`` frames before the chunk's first frame, so pre-emphasis and
the STFT's edge padding see the same samples as in a whole-file pass; a stream's first chunk has
no samples before it, and is left-padded with zeros, which is exactly what the STFT's own edge
padding and NeMo's pre-emphasis (the first sample is kept as is) give. Every row's chunk then
starts at the same feature column, so the batch is cut with one slice. A span ends at the last
sample the chunk's last frame touches (at the end of the stream: the true end, as the
whole-file pass does), and rows are padded with zeros that NeMo masks out.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import OmegaConf

# Frames computed before the first wanted one, so the wanted frames never touch the span's start.
_LEAD_FRAMES = 2


@dataclass(frozen=True)
class ChunkLayout:
    """How the feature stream is cut into model steps (all counts in feature frames)."""

    chunk_frames: int  # new frames per step (the shift), e.g. 112 = 1.12 s
    pre_cache_frames: int  # frames of left context prepended to each chunk, e.g. 9
    min_frames: int  # a final chunk shorter than this is not run (the encoder cannot use it)
    first_min_frames: int  # the same for a call's first chunk (NeMo checks it separately)
    drop_extra_pre_encoded: int  # pre-encoded frames the models drop from each chunk

    @property
    def input_frames(self) -> int:
        return self.pre_cache_frames + self.chunk_frames


def chunk_layout(asr_model: torch.nn.Module) -> ChunkLayout:
    """The chunk layout of a cache-aware streaming encoder with ``pad_and_drop_preencoded``."""
    cfg = asr_model.encoder.streaming_cfg

    def steady(value: int | list[int]) -> int:
        return value[1] if isinstance(value, list) else value

    sampling: int | list[int] = 1
    pre_encode = asr_model.encoder.pre_encode
    if hasattr(pre_encode, "get_sampling_frames"):
        sampling = pre_encode.get_sampling_frames()
    first_sampling = sampling[0] if isinstance(sampling, list) else sampling
    chunk, shift = steady(cfg.chunk_size), steady(cfg.shift_size)
    if chunk != shift:
        raise ValueError(
            f"chunk size {chunk} != shift size {shift}: overlapping chunks unsupported"
        )
    return ChunkLayout(
        chunk_frames=shift,
        pre_cache_frames=steady(cfg.pre_encode_cache_size),
        min_frames=steady(sampling) or 1,
        first_min_frames=first_sampling or 1,
        drop_extra_pre_encoded=cfg.drop_extra_pre_encoded,
    )


class FeatureExtractor:
    """The model's preprocessor, set up for streaming: no dither, no padding to a multiple."""

    def __init__(self, asr_model: torch.nn.Module) -> None:
        cfg = copy.deepcopy(asr_model._cfg.preprocessor)
        OmegaConf.set_struct(cfg, False)
        normalize = str(cfg.get("normalize", "NA"))
        if normalize not in {"NA", "None", "none", ""}:
            raise ValueError(
                f"the ASR preprocessor normalizes features ({normalize!r}); "
                "streaming needs per-frame features (normalize: NA)"
            )
        cfg.dither = 0.0
        cfg.pad_to = 0
        self.sample_rate = int(cfg.sample_rate)
        self.hop = round(cfg.window_stride * self.sample_rate)
        n_fft = cfg.get("n_fft") or 2 ** int(np.ceil(np.log2(cfg.window_size * self.sample_rate)))
        self.half_window = int(n_fft) // 2
        self.n_mels = int(cfg.features)
        param = next(asr_model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
        self.module = asr_model.from_config_dict(cfg).to(self.device, self.dtype).eval()

    @torch.inference_mode()
    def frames_batch(self, spans: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of each span, one row per span, ``(B, n_mels, frames)``, and each span's
        length in samples ``(B,)``, both on the device.

        The spans go to the device in one copy (each row's length rides in its column 0: exact,
        spans are far shorter than the 2**24 samples float32 counts exactly) and through the
        preprocessor in one call.
        """
        longest = max(len(span) for span in spans)
        host = np.zeros((len(spans), longest + 1), dtype=self._np_dtype)
        for i, span in enumerate(spans):
            host[i, 0] = len(span)
            host[i, 1 : 1 + len(span)] = span
        packed = torch.from_numpy(host).to(self.device)
        lengths = packed[:, 0].to(torch.int64)
        feats, _ = self.module(input_signal=packed[:, 1:], length=lengths)
        return feats.to(self.dtype), lengths  # NeMo's mel is always float32


@dataclass
class ChunkBatch:
    """The chunks of a model step, one row per stream, on the device."""

    chunks: torch.Tensor  # (B, n_mels, input_frames), zero beyond each row's length
    lengths: torch.Tensor  # (B,) valid frames per row, on the device
    host_lengths: list[int]  # the same, on the host (no device→host copy)
    last: list[bool]  # each row is its stream's last chunk (NeMo's ``is_buffer_empty``)


class StreamFeatures:
    """Per-stream audio not yet cut into chunks, and the left context of the next chunk.

    Memory is bounded by the audio of one chunk and its lead frames plus whatever arrived
    since that chunk was complete (the engine caps that with ``max_buffered_audio_sec``).
    """

    def __init__(self, extractor: FeatureExtractor, layout: ChunkLayout) -> None:
        self._x = extractor
        self._layout = layout
        self._pieces: list[np.ndarray] = []  # audio from sample self._audio_offset on
        self._audio_offset = 0  # global index of the first buffered sample
        self.samples_received = 0
        self._chunk_start = 0  # global frame index of the next chunk's first frame
        self._pre_cache = torch.zeros(
            extractor.n_mels,
            layout.pre_cache_frames,
            device=extractor.device,
            dtype=extractor.dtype,
        )
        self.ended = False
        self.chunks_done = 0

    def push(self, samples: np.ndarray) -> None:
        """Add 16 kHz mono float samples (copied: the caller may reuse its buffer)."""
        if self.ended:
            raise ValueError("audio pushed after the end of the stream")
        if len(samples):
            self._pieces.append(samples.astype(np.float32))  # a copy, whatever the dtype
            self.samples_received += len(samples)

    def end(self) -> None:
        """No more audio: the last frames are computed against the true end of the signal."""
        self.ended = True
        if self.finished():
            self._pieces = []

    @property
    def total_frames(self) -> int:
        """Frames whose samples have all arrived (at the end: every frame of the signal)."""
        received, hop = self.samples_received, self._x.hop
        if received == 0:
            return 0
        if self.ended:
            return received // hop + 1
        # Frame t touches samples [t*hop - half, t*hop + half).
        return max(0, (received - self._x.half_window) // hop + 1)

    def _pending_frames(self) -> int:
        return self.total_frames - self._chunk_start

    def chunk_ready(self) -> bool:
        """A full chunk is buffered and known not to be the last, or the stream ended with a
        runnable remainder. (Whether a chunk is the last changes how the encoder treats it, so
        a full chunk waits for one frame beyond it.)"""
        pending = self._pending_frames()
        if pending > self._layout.chunk_frames:
            return True
        least = self._layout.first_min_frames if self.chunks_done == 0 else self._layout.min_frames
        return self.ended and pending >= least

    def finished(self) -> bool:
        """Ended, and nothing left that a model step would run."""
        return self.ended and not self.chunk_ready()

    def take_chunk(self) -> tuple[torch.Tensor, int, bool]:
        """The next chunk ``(n_mels, input_frames)`` zero-padded, its valid length, and whether
        it is the stream's last (``take_chunks`` for this stream alone)."""
        batch = take_chunks([self])
        return batch.chunks[0], batch.host_lengths[0], batch.last[0]

    def _next_span(self) -> tuple[np.ndarray, int]:
        """The samples the next chunk's frames (and their lead frames) need, left-padded with
        zeros to ``_LEAD_FRAMES`` lead frames, and the number of new frames."""
        hop, first = self._x.hop, self._chunk_start
        count = min(self._layout.chunk_frames, self._pending_frames())
        lead = min(first, _LEAD_FRAMES)
        start = (first - lead) * hop
        stop = min(self.samples_received, (first + count - 1) * hop + self._x.half_window)
        audio = self._audio()
        span = audio[start - self._audio_offset : stop - self._audio_offset]
        if lead < _LEAD_FRAMES:
            span = np.concatenate([np.zeros((_LEAD_FRAMES - lead) * hop, np.float32), span])
        return span, count

    def _audio(self) -> np.ndarray:
        if len(self._pieces) > 1:
            self._pieces = [np.concatenate(self._pieces)]
        return self._pieces[0] if self._pieces else np.zeros(0, np.float32)

    def _advance(self, count: int, pre_cache: torch.Tensor) -> bool:
        """The chunk of ``count`` new frames is taken: drop the audio no later frame (or its lead
        frames) touches; return whether it was the stream's last."""
        self._pre_cache = pre_cache
        self._chunk_start += count
        self.chunks_done += 1
        keep_from = min(
            max(0, (self._chunk_start - _LEAD_FRAMES) * self._x.hop), self.samples_received
        )
        audio = self._audio()
        self._pieces = [audio[keep_from - self._audio_offset :]]
        self._audio_offset = keep_from
        last = self.ended and self._chunk_start >= self.total_frames
        if last:
            self._pieces = []
        return last

    def nbytes(self) -> int:
        audio = sum(piece.nbytes for piece in self._pieces)
        return audio + self._pre_cache.numel() * self._pre_cache.element_size()


def take_chunks(streams: Sequence[StreamFeatures]) -> ChunkBatch:
    """The next chunk of each stream (each must be ``chunk_ready()``), computed together: one
    host→device copy and one preprocessor call for all of them.

    Row ``i`` equals ``cat(pre_cache_i, new frames_i)`` zero-padded to ``input_frames``, as
    NeMo's buffer cuts it. Every stream's state moves on to its next chunk.
    """
    extractor, layout = streams[0]._x, streams[0]._layout
    spans, counts = zip(*(s._next_span() for s in streams), strict=True)
    feats, samples = extractor.frames_batch(spans)
    width = layout.chunk_frames
    new = feats[:, :, _LEAD_FRAMES : _LEAD_FRAMES + width]
    if new.shape[2] < width:  # every row is a short last chunk
        new = torch.nn.functional.pad(new, (0, width - new.shape[2]))
    # A span of n samples has frames 0 .. n // hop (the last one NeMo masks, in its whole-file
    # pass too); frames past that (short last chunks) are padding: zero them.
    valid = (torch.div(samples, extractor.hop, rounding_mode="floor") + 1 - _LEAD_FRAMES).clamp(
        min=0, max=width
    )
    column = torch.arange(width, device=new.device)
    new = new.masked_fill(column[None, None, :] >= valid[:, None, None], 0.0)
    pre = torch.stack([s._pre_cache for s in streams])
    chunks = torch.cat([pre, new], dim=2)
    pre_frames = layout.pre_cache_frames
    # The left context of each stream's next chunk: the last frames before its start (a short
    # chunk is the stream's last, so what it leaves behind is never used).
    next_pre = chunks[:, :, width:].clone()
    last = [
        s._advance(n, next_pre[i]) for i, (s, n) in enumerate(zip(streams, counts, strict=True))
    ]
    return ChunkBatch(
        chunks=chunks,
        lengths=valid + pre_frames,
        host_lengths=[pre_frames + n for n in counts],
        last=last,
    )
