"""Incremental log-mel features and the fixed-size chunks the streaming models step on.

NeMo computes features over a whole file and then cuts chunks (``CacheAwareStreamingAudioBuffer``);
appending audio piece by piece to that buffer gives different features at every boundary. A live
call arrives piece by piece, so this module computes, for audio received so far, exactly the
frames a whole-file pass would give, and cuts the same chunks the NeMo buffer cuts with
``pad_and_drop_preencoded=True`` (every chunk the same size, which batching needs).

A frame is computed once all the samples its STFT window touches have arrived. Each computation
runs the model's own preprocessor over a short span that starts a few frames early, so
pre-emphasis and the STFT's edge padding see the same samples as in a whole-file pass; at the
end of the stream the last frames use the true end, as the whole-file pass does.
"""

from __future__ import annotations

import copy
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
        self.module = asr_model.from_config_dict(cfg).to(self.device, self.dtype).eval()

    @torch.inference_mode()
    def frames(self, audio: np.ndarray, first: int, count: int, offset: int) -> torch.Tensor:
        """Frames ``first .. first+count`` of the signal; ``audio`` holds its samples from
        ``offset`` on.

        ``audio`` must hold the samples from ``max(0, (first - 2) * hop)`` to the last sample any
        wanted frame touches (or the stream's end); returns ``(n_mels, count)``.
        """
        lead = min(first, _LEAD_FRAMES)
        start = (first - lead) * self.hop - offset
        span = torch.from_numpy(np.ascontiguousarray(audio[start:])).to(self.device, self.dtype)
        feats, _ = self.module(
            input_signal=span[None], length=torch.tensor([len(span)], device=self.device)
        )
        return feats[0, :, lead : lead + count].to(self.dtype)  # NeMo's mel is always float32


class StreamFeatures:
    """Per-stream audio tail and feature frames not yet cut into chunks.

    Memory is bounded by the audio not yet covered by whole frames plus one chunk of frames.
    """

    def __init__(self, extractor: FeatureExtractor, layout: ChunkLayout) -> None:
        self._x = extractor
        self._layout = layout
        self._audio = np.zeros(0, dtype=np.float32)
        self._audio_offset = 0  # global index of self._audio[0]
        self.samples_received = 0
        self._frames_done = 0  # frames computed so far
        self._pending: list[torch.Tensor] = []  # computed frames not yet in a chunk
        self._pending_frames = 0
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
        """Add 16 kHz mono float samples."""
        if self.ended:
            raise ValueError("audio pushed after the end of the stream")
        self._audio = np.concatenate([self._audio, samples.astype(np.float32, copy=False)])
        self.samples_received += len(samples)
        # Frame t touches samples [t*hop - half, t*hop + half).
        ready = (self.samples_received - self._x.half_window) // self._x.hop + 1
        self._compute_until(max(ready, self._frames_done))

    def end(self) -> None:
        """No more audio: compute the last frames against the true end of the signal."""
        if not self.ended:
            self._compute_until(self.samples_received // self._x.hop + 1)
            self.ended = True
            self._audio = np.zeros(0, dtype=np.float32)

    def _compute_until(self, total: int) -> None:
        count = total - self._frames_done
        if count <= 0 or self.samples_received == 0:
            return
        new = self._x.frames(self._audio, self._frames_done, count, self._audio_offset)
        self._pending.append(new)
        self._pending_frames += count
        self._frames_done = total
        # Keep only the samples later frames (and their lead frames) can touch.
        keep_from = max(0, (self._frames_done - _LEAD_FRAMES) * self._x.hop)
        keep_from = min(keep_from, self.samples_received)
        self._audio = self._audio[keep_from - self._audio_offset :]
        self._audio_offset = keep_from

    @property
    def total_frames(self) -> int:
        return self._frames_done

    def chunk_ready(self) -> bool:
        """A full chunk is buffered and known not to be the last, or the stream ended with a
        runnable remainder. (Whether a chunk is the last changes how the encoder treats it, so
        a full chunk waits for one frame beyond it.)"""
        if self._pending_frames > self._layout.chunk_frames:
            return True
        least = self._layout.first_min_frames if self.chunks_done == 0 else self._layout.min_frames
        return self.ended and self._pending_frames >= least

    def finished(self) -> bool:
        """Ended, and nothing left that a model step would run."""
        return self.ended and not self.chunk_ready()

    def take_chunk(self) -> tuple[torch.Tensor, int, bool]:
        """The next chunk ``(n_mels, input_frames)`` zero-padded, its valid length, and whether
        it is the stream's last (NeMo's ``is_buffer_empty``)."""
        layout = self._layout
        pending = torch.cat(self._pending, dim=1) if len(self._pending) > 1 else self._pending[0]
        new = pending[:, : layout.chunk_frames]
        rest = pending[:, layout.chunk_frames :]
        self._pending = [rest] if rest.shape[1] else []
        self._pending_frames = rest.shape[1]
        chunk = torch.cat([self._pre_cache, new], dim=1)
        length = chunk.shape[1]
        if length < layout.input_frames:
            chunk = torch.nn.functional.pad(chunk, (0, layout.input_frames - length))
        # Left context of the next chunk: the last frames before its start.
        self._pre_cache = torch.cat([self._pre_cache, new], dim=1)[:, -layout.pre_cache_frames :]
        self._chunk_start += layout.chunk_frames
        self.chunks_done += 1
        last = self.ended and self._chunk_start >= self._frames_done
        return chunk, length, last

    def nbytes(self) -> int:
        frames = sum(t.numel() * t.element_size() for t in self._pending)
        return (
            self._audio.nbytes + frames + self._pre_cache.numel() * self._pre_cache.element_size()
        )
