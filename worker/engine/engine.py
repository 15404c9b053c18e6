"""Continuous batching of many live calls through NeMo's streaming multi-talker pipeline.

One ``step()``: take every stream with a chunk ready (up to the batch cap) → one diarizer
forward over all of them → pick each stream's active speakers → one ASR forward over every
active speaker instance of every stream → per-stream transcript updates. Streams join
(``add_stream``) and leave (``end_stream``, ``drop_stream``) between any two steps.

Per stream, the result equals NeMo's ``SpeakerTaggedASR.perform_parallel_streaming_stt_spk`` run
on that stream alone (floats within rounding of batched kernels), with two NeMo 3.0 bugs fixed:
the background-speaker targets are built from the active speaker ids (NeMo uses
``range(len(ids))``), and a speaker's new text is the suffix after the previous text (NeMo
deletes every occurrence of the previous text, which eats words that contain it). Segment
times come from each step's own token frames, which is also right for ``greedy_batch``
decoding (whose merged timestamps NeMo misreads).

Precision (``EngineConfig.dtype``): "fp32" and "fp64" run everything in the models' own dtype;
"bf16" runs the diarizer and ASR encoder forwards under ``torch.autocast`` (where the FLOPs are)
and keeps the preprocessor, the RNN-T decoder and all stored state in float32, so a stream's
state has one dtype whatever the setting and the decoder's greedy loop sees the numbers it was
built for. Every tensor the engine makes is made on the models' device: the engine runs on CUDA
and on the CPU alike.

Thread rule: an engine is used by one thread, the one that owns the device. It is not
thread-safe, and needs no lock because nothing else touches it.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from nemo.collections.asr.modules.sortformer_modules import StreamingSortformerState
from nemo.collections.asr.parts.submodules.subsampling import calc_length

from worker.engine.config import EngineConfig
from worker.engine.features import (
    ChunkBatch,
    ChunkLayout,
    FeatureExtractor,
    StreamFeatures,
    chunk_layout,
    take_chunks,
)
from worker.engine.models import LoadedModels
from worker.engine.results import SequenceSpan, StreamError, StreamUpdate
from worker.engine.state import (
    SpeakerInstance,
    StreamModelState,
    gather_asr,
    gather_diarizer,
    new_diarizer_row,
    new_speaker_instance,
    scatter_diarizer,
)
from worker.engine.targets import active_mask, speaker_targets, stack_right_aligned
from worker.engine.transcript import (
    AssemblerConfig,
    SegmentUpdate,
    TranscriptAssembler,
    WordTiming,
)

log = logging.getLogger(__name__)

# Stands for the spaces around SentencePiece's unknown piece, which its decoder never strips.
_UNK_SPACE = "\x01"


@dataclass
class StepTiming:
    """Where one step's time went, in seconds."""

    features: float = 0.0  # the chunks' features: packing, copy and the preprocessor
    diarizer: float = 0.0
    asr: float = 0.0
    total: float = 0.0
    streams: int = 0
    instances: int = 0

    @property
    def overhead(self) -> float:
        """Everything in the step but the two forwards, ``features`` included."""
        return max(0.0, self.total - self.diarizer - self.asr)


@dataclass
class _Stream:
    """Host-side facts of one stream plus its model state."""

    stream_id: str
    features: StreamFeatures
    model: StreamModelState
    assembler: TranscriptAssembler
    steps: int = 0
    # (first 16 kHz sample, sequence number) of pushed audio not yet behind every segment.
    seq_marks: deque[tuple[int, int]] = field(default_factory=deque)
    samples_pushed: int = 0
    ended: bool = False


@dataclass
class _Row:
    """One stream's part of a step."""

    stream: _Stream
    chunk: torch.Tensor
    length: int
    last: bool


@dataclass
class _Gating:
    """A step's speaker gating, as the ASR instances' targets need it."""

    recent: torch.Tensor  # (B, frames, n_spk) recent predictions, right-aligned
    active: torch.Tensor  # (B, n_spk) bool, on the device
    recent_frames: list[int]  # recent predictions per row
    asr_valid: list[int]  # the ASR encoder's valid frames per row, after the dropped ones


@dataclass
class _InstanceResult:
    """One speaker instance's output of a step, applied only when the whole step succeeded."""

    row: int
    speaker: int
    instance: SpeakerInstance
    caches: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    hypothesis: Any
    new_tokens: list[int]
    new_frames: list[int]

    def commit(self) -> None:
        inst = self.instance
        channel, time_cache, channel_len = self.caches
        inst.cache_last_channel = channel.clone()
        inst.cache_last_time = time_cache.clone()
        inst.cache_last_channel_len = channel_len.clone()
        inst.hypothesis = self.hypothesis
        inst.frames_decoded += int(self.hypothesis.length)  # this chunk's encoder frames


class StreamingEngine:
    """Many live streams, one model step at a time. See the module docstring."""

    def __init__(self, models: LoadedModels, config: EngineConfig | None = None) -> None:
        self.cfg = config or EngineConfig()
        self.models = models
        self.device = models.device
        self.asr = models.asr
        self.diar = models.diarizer
        self.dtype = _check_precision(models, self.cfg)
        self._configure_models()
        self.layout: ChunkLayout = chunk_layout(self.asr)
        self.extractor = FeatureExtractor(self.asr)
        self.sample_rate = self.extractor.sample_rate
        self._chunk_samples = self.layout.chunk_frames * self.extractor.hop
        self.frame_sec = self.extractor.hop / self.sample_rate * self.asr.encoder.subsampling_factor
        self.nframes_per_chunk = self.cfg.att_context_size[1] + 1
        self.step_sec = self.nframes_per_chunk * self.frame_sec
        self.gating_frames = self.nframes_per_chunk * self.cfg.cache_gating_buffer_size
        pieces = self.asr.tokenizer.ids_to_tokens(list(range(self.asr.tokenizer.vocab_size)))
        self._word_start = np.array([p.startswith("▁") for p in pieces] + [False])
        self._pieces = [p.replace("▁", "") for p in pieces] + [""]
        # Text of each piece as SentencePiece decodes it, so the text a step adds can be made
        # from its own tokens (NeMo re-decodes the whole call every step to diff the strings).
        unk = (
            self.asr.tokenizer.tokenizer.unk_id()
            if hasattr(self.asr.tokenizer, "tokenizer")
            else -1
        )
        self._piece_text = [
            f"{_UNK_SPACE}⁇{_UNK_SPACE}" if i == unk else p.replace("▁", " ")
            for i, p in enumerate(pieces)
        ] + [""]
        self._assembler_cfg = AssemblerConfig(
            sent_break_sec=self.cfg.sent_break_sec,
            final_after_silence_sec=self.cfg.final_after_silence_sec,
            max_segment_sec=self.cfg.max_segment_sec,
            emit_partials=self.cfg.emit_partials,
        )
        self._batched_decoding = self.cfg.decoding_strategy == "greedy_batch"
        self._next_first = 0  # where the next step starts looking for ready streams
        self._streams: dict[str, _Stream] = {}
        self.last_timing = StepTiming()

    def _configure_models(self) -> None:
        cfg = self.cfg
        self.asr.encoder.set_default_att_context_size(list(cfg.att_context_size))
        self.asr.encoder.setup_streaming_params()
        if self.asr.cfg.decoding.strategy != cfg.decoding_strategy:
            decoding = self.asr.cfg.decoding
            decoding.strategy = cfg.decoding_strategy
            self.asr.change_decoding_strategy(decoding, verbose=False)
        modules = self.diar.sortformer_modules
        modules.spkcache_len = cfg.spkcache_len
        modules.fifo_len = cfg.fifo_len
        modules.spkcache_update_period = cfg.spkcache_update_period
        self.diar.async_streaming = True

    def _encoder_autocast(self) -> torch.autocast:
        """bf16 autocast for the diarizer and ASR encoder forwards (a no-op unless dtype bf16)."""
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.cfg.dtype == "bf16"
        )

    # -- streams ---------------------------------------------------------------------------

    def add_stream(self, stream_id: str) -> None:
        """Open a stream; its audio starts at time 0."""
        if stream_id in self._streams:
            raise ValueError(f"stream {stream_id!r} is already open")
        self._streams[stream_id] = _Stream(
            stream_id=stream_id,
            features=StreamFeatures(self.extractor, self.layout),
            model=StreamModelState(diar=new_diarizer_row(self.diar, self.device)),
            assembler=TranscriptAssembler(self._assembler_cfg),
        )

    def push_audio(self, stream_id: str, samples: np.ndarray, sequence: int = -1) -> None:
        """Append 16 kHz mono float samples that came from input record ``sequence``.

        Called once per input record (every 20 ms per call), so it only checks and appends:
        features are computed by the step that takes the audio's chunk.
        """
        stream = self._get(stream_id)
        if stream.ended:
            raise StreamError("audio_after_end", f"stream {stream_id!r} got audio after its end")
        if samples.ndim != 1:
            raise StreamError("bad_audio", f"expected mono samples, got shape {samples.shape}")
        # A finite sum proves every sample finite, in half the time of a per-sample check; a
        # sum that overflowed is checked sample by sample.
        if not math.isfinite(samples.sum()) and not np.isfinite(samples).all():
            raise StreamError("bad_audio", "audio holds NaN or infinite samples")
        done = stream.features.chunks_done * self._chunk_samples
        if (
            stream.samples_pushed - done + len(samples)
            > self.cfg.max_buffered_audio_sec * self.sample_rate
        ):
            raise StreamError(
                "buffer_full",
                f"stream {stream_id!r} would buffer more than "
                f"{self.cfg.max_buffered_audio_sec} s of unprocessed audio",
            )
        if len(samples):
            stream.seq_marks.append((stream.samples_pushed, sequence))
            stream.samples_pushed += len(samples)
            stream.features.push(samples)

    def end_stream(self, stream_id: str) -> None:
        """No more audio: the remaining audio is stepped and the last segments finalised."""
        stream = self._get(stream_id)
        stream.ended = True
        stream.features.end()

    def drop_stream(self, stream_id: str) -> None:
        """Forget a stream at once, emitting nothing more (e.g. its partition was revoked)."""
        self._streams.pop(stream_id, None)

    def has_stream(self, stream_id: str) -> bool:
        return stream_id in self._streams

    @property
    def stream_ids(self) -> list[str]:
        return list(self._streams)

    def buffered_sec(self, stream_id: str) -> float:
        """Audio pushed but not yet stepped, in seconds."""
        stream = self._get(stream_id)
        done = stream.features.chunks_done * self._chunk_samples
        return max(0.0, (stream.samples_pushed - done) / self.sample_rate)

    def state_bytes(self, stream_id: str) -> int:
        """Bytes of state held for a stream (tensors, buffers, open segments)."""
        stream = self._get(stream_id)
        return (
            stream.model.nbytes()
            + stream.features.nbytes()
            + stream.assembler.nbytes()
            + 16 * len(stream.seq_marks)
        )

    def ready_streams(self) -> list[str]:
        """Streams that the next step would run, or finish, in order of arrival."""
        return [s.stream_id for s in self._streams.values() if self._is_ready(s)]

    def _is_ready(self, stream: _Stream) -> bool:
        return stream.features.chunk_ready() or (stream.ended and stream.features.finished())

    def _get(self, stream_id: str) -> _Stream:
        try:
            return self._streams[stream_id]
        except KeyError:
            raise KeyError(f"no open stream {stream_id!r}") from None

    # -- the step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StreamUpdate]:
        """Run one model step over every ready stream (up to the cap); return their updates."""
        started = time.perf_counter()
        timing = StepTiming()
        updates: list[StreamUpdate] = []
        scheduled: list[_Stream] = []
        streams = list(self._streams.values())
        # Past the cap, take turns: start where the last step's batch ended.
        start = self._next_first % len(streams) if streams else 0
        for stream in streams[start:] + streams[:start]:
            if len(scheduled) >= self.cfg.max_streams_per_step:
                self._next_first = start + len(scheduled)
                break
            if stream.features.chunk_ready():
                scheduled.append(stream)
            elif stream.ended and stream.features.finished():
                updates.append(self._finish(stream, audio_sec=0.0))
        if scheduled:
            updates.extend(self._step_streams(scheduled, timing))
        timing.total = time.perf_counter() - started
        timing.streams = len(scheduled)
        self.last_timing = timing
        return updates

    def _step_streams(self, scheduled: list[_Stream], timing: StepTiming) -> list[StreamUpdate]:
        """The features of ``scheduled`` (one call), then their model step. A stream's state
        moves on only once its features exist, so a failed features call is retried stream by
        stream, and only the guilty stream fails."""
        t0 = time.perf_counter()
        try:
            batch = take_chunks([s.features for s in scheduled])
        except Exception as exc:
            timing.features += time.perf_counter() - t0
            if len(scheduled) == 1:
                return [self._failed(scheduled[0], "features_failed", exc)]
            log.warning("features of %d streams failed (%s); one by one", len(scheduled), exc)
            return [u for s in scheduled for u in self._step_streams([s], timing)]
        timing.features += time.perf_counter() - t0
        rows = [
            _Row(stream, batch.chunks[i], batch.host_lengths[i], batch.last[i])
            for i, stream in enumerate(scheduled)
        ]
        return self._run_rows(rows, timing, batch)

    def _failed(self, stream: _Stream, reason: str, exc: Exception) -> StreamUpdate:
        log.warning("stream %s failed (%s): %s", stream.stream_id, reason, exc)
        self._streams.pop(stream.stream_id, None)
        return StreamUpdate(
            stream.stream_id, error=StreamError(reason, f"{type(exc).__name__}: {exc}")
        )

    def _run_rows(
        self, rows: list[_Row], timing: StepTiming, batch: ChunkBatch | None = None
    ) -> list[StreamUpdate]:
        """Step ``rows`` (whose chunks are ``batch``'s rows, when given); a failed batch is
        retried stream by stream so that only the guilty stream fails."""
        try:
            results = self._model_step(rows, timing, batch)
        except Exception as exc:
            if len(rows) == 1:
                return [self._failed(rows[0].stream, "model_step_failed", exc)]
            log.warning("a batch of %d streams failed (%s); retrying one by one", len(rows), exc)
            out: list[StreamUpdate] = []
            for row in rows:
                out.extend(self._run_rows([row], timing))
            return out
        return results

    def _model_step(
        self, rows: list[_Row], timing: StepTiming, batch: ChunkBatch | None
    ) -> list[StreamUpdate]:
        """One diarizer and one ASR forward for ``rows``. State is written back only once both
        succeeded, so a failed batch can be retried stream by stream from the same state."""
        device = self.device
        if batch is not None:
            chunks, lengths = batch.chunks, batch.lengths  # (B, n_mels, frames), (B,)
        else:
            chunks = torch.stack([r.chunk for r in rows])
            lengths = torch.tensor([r.length for r in rows], device=device)
        drop = self.layout.drop_extra_pre_encoded

        # Diarizer: one forward over all streams, in NeMo's async (per-row) streaming form.
        t0 = time.perf_counter()
        diar_rows = [r.stream.model.diar for r in rows]
        n_spk = self.diar.sortformer_modules.n_spk
        with self._encoder_autocast():
            diar_state, chunk_preds = self.diar.forward_streaming_step(
                processed_signal=chunks.transpose(1, 2),
                processed_signal_length=lengths,
                streaming_state=gather_diarizer(diar_rows, StreamingSortformerState),
                total_preds=torch.zeros(len(rows), 0, n_spk, device=device, dtype=self.dtype),
                drop_extra_pre_encoded=drop,
            )
        # State and predictions are kept in the models' dtype whatever ran under autocast.
        chunk_preds = chunk_preds.to(self.dtype)
        for name in diar_rows[0].tensors:
            value = getattr(diar_state, name)
            if value.is_floating_point():
                setattr(diar_state, name, value.to(self.dtype))
        timing.diarizer += time.perf_counter() - t0

        # Valid encoder frames per row, computed on the host as the encoders' own subsampling
        # computes them (reading them from the device would synchronise once per row).
        host_lengths = [r.length for r in rows]
        diar_valid = _subsampled_host(self.diar.encoder.pre_encode, host_lengths, drop)
        asr_valid = _subsampled_host(self.asr.encoder.pre_encode, host_lengths, drop)

        # Speaker gating on each stream's recent predictions: one device→host copy.
        chunk_preds = chunk_preds.clone()
        chunk_preds[:, :, self.cfg.max_speakers :] = 0.0
        recents = [
            torch.cat([row.stream.model.diar.recent_preds, chunk_preds[i, :n]])[
                -self.gating_frames :
            ]
            for i, (row, n) in enumerate(zip(rows, diar_valid, strict=True))
        ]
        recent = stack_right_aligned(recents)
        active_on_device = active_mask(recent, self.cfg.max_speakers, self.cfg.cache_gating)
        active = [np.flatnonzero(m).tolist() for m in active_on_device.cpu().numpy()]
        gating = _Gating(recent, active_on_device, [len(r) for r in recents], asr_valid)

        # ASR: pre-encode each stream once, then one instance per active speaker.
        t0 = time.perf_counter()
        with self._encoder_autocast():
            pre, pre_len = self.asr.encoder.pre_encode(x=chunks.transpose(1, 2), lengths=lengths)
        pre_len = pre_len.to(torch.int64)
        if drop:
            pre = pre[:, drop:, :]
            pre_len = (pre_len - drop).clamp(min=0)
        plan: list[tuple[int, int, SpeakerInstance]] = []
        for i, (row, speakers) in enumerate(zip(rows, active, strict=True)):
            for spk in speakers:
                inst = row.stream.model.speakers.get(spk)
                if inst is None:
                    inst = new_speaker_instance(self.asr, device)
                    row.stream.model.speakers[spk] = inst
                plan.append((i, spk, inst))
        # Decoding continues the previous hypotheses in place (tokens, decoder state, score):
        # keep what is needed to put them back if any part of the step fails.
        saved = [_snapshot(p[2].hypothesis) for p in plan if p[2].hypothesis is not None]
        results: list[_InstanceResult] = []
        try:
            for keep_all in (False, True):
                group = [p for p in plan if rows[p[0]].last is keep_all]
                for start in range(0, len(group), self.cfg.max_instances_per_step):
                    part = group[start : start + self.cfg.max_instances_per_step]
                    results.extend(self._asr_forward(part, rows, gating, pre, pre_len, keep_all))
        except Exception:
            for hyp, fields in saved:
                hyp.__dict__.update(fields)
            raise
        timing.asr += time.perf_counter() - t0
        timing.instances += len(plan)

        # Both forwards succeeded: write the state back.
        scatter_diarizer(diar_state, diar_rows)
        for row, recent in zip(rows, recents, strict=True):
            row.stream.model.diar.recent_preds = recent
        by_instance: dict[tuple[int, int], _InstanceResult] = {}
        for res in results:
            res.commit()
            by_instance[(res.row, res.speaker)] = res

        # Transcript updates per stream.
        updates = []
        for i, row in enumerate(rows):
            stream = row.stream
            offset = stream.steps * self.step_sec
            for spk in active[i]:
                res = by_instance[(i, spk)]
                self._add_text(stream, spk, res.new_tokens, res.new_frames, offset)
            stream.steps += 1
            audio_sec = (row.length - self.layout.pre_cache_frames) * self.extractor.hop
            audio_sec /= self.sample_rate
            if stream.ended and stream.features.finished():
                updates.append(self._finish(stream, audio_sec))
            else:
                segs = stream.assembler.collect(stream.steps * self.step_sec, ended=False)
                updates.append(
                    StreamUpdate(
                        stream.stream_id, self._with_spans(stream, segs), audio_sec=audio_sec
                    )
                )
        return updates

    def _asr_forward(
        self,
        part: list[tuple[int, int, SpeakerInstance]],
        rows: list[_Row],
        gating: _Gating,
        pre: torch.Tensor,
        pre_len: torch.Tensor,
        keep_all: bool,
    ) -> list[_InstanceResult]:
        # One host→device copy of the plan; the targets come from batched tensor operations.
        plan = torch.tensor(
            [
                (i, spk, gating.asr_valid[i], min(gating.recent_frames[i], self.nframes_per_chunk))
                for i, spk, _ in part
            ],
            dtype=torch.int64,
        ).to(self.device)
        idx = plan[:, 0]
        targets, background = speaker_targets(
            gating.recent, gating.active, plan, pre.shape[1], self.cfg.binary_diar_preds
        )
        instances = [p[2] for p in part]
        hyps = [inst.hypothesis for inst in instances]
        before = [_token_count(h) for h in hyps]
        # greedy_batch numbers frames from the instance's first decoded frame; greedy from the
        # chunk's. Either way the chunk's own frames are what the times need.
        frame_base = [inst.frames_decoded if self._batched_decoding else 0 for inst in instances]
        channel, time_cache, channel_len = gather_asr(instances)
        # NeMo's conformer_stream_step, split so that only the encoder runs under autocast.
        self.asr.set_speaker_targets(targets, background)
        try:
            with self._encoder_autocast():
                encoded, encoded_len, channel, time_cache, channel_len = (
                    self.asr.encoder.cache_aware_stream_step(
                        processed_signal=pre[idx],
                        processed_signal_length=pre_len[idx],
                        cache_last_channel=channel,
                        cache_last_time=time_cache,
                        cache_last_channel_len=channel_len,
                        keep_all_outputs=keep_all,
                        drop_extra_pre_encoded=self.layout.drop_extra_pre_encoded,
                        bypass_pre_encode=True,
                    )
                )
        finally:
            self.asr.clear_speaker_targets()
        encoded = self.asr._apply_prompt_to_encoded(encoded).to(self.dtype)
        channel, time_cache = channel.to(self.dtype), time_cache.to(self.dtype)
        best = self.asr.decoding.rnnt_decoder_predictions_tensor(
            encoder_output=encoded,
            encoded_lengths=encoded_len,
            return_hypotheses=True,
            partial_hypotheses=hyps,
        )
        out = []
        for j, (i, spk, inst) in enumerate(part):
            hyp = best[j]
            tokens = _as_list(hyp.y_sequence)
            n_new = len(tokens) - before[j]
            frames = _as_list(hyp.timestamp)[-n_new:] if n_new > 0 else []
            frames = [f - frame_base[j] for f in frames]
            out.append(
                _InstanceResult(
                    row=i,
                    speaker=spk,
                    instance=inst,
                    caches=(
                        channel[:, j : j + 1],
                        time_cache[:, j : j + 1],
                        channel_len[j : j + 1],
                    ),
                    hypothesis=hyp,
                    new_tokens=tokens[before[j] :],
                    new_frames=frames,
                )
            )
        return out

    def _add_text(
        self, stream: _Stream, spk: int, tokens: list[int], frames: list[int], offset: float
    ) -> None:
        """Hand a speaker's new tokens to the transcript, as the text NeMo's diff would give."""
        inst = stream.model.speakers[spk]
        if tokens:
            diff = "".join(self._piece_text[t] for t in tokens)
            if not inst.has_text:
                # SentencePiece strips the leading spaces of a decoded text.
                diff = diff.lstrip(" ")
            diff = diff.replace(_UNK_SPACE, " ")
            if diff:
                inst.has_text = True
                start = offset + frames[0] * self.frame_sec
                end = offset + (frames[-1] + 1) * self.frame_sec
                words, continues = self._words(tokens, frames, offset)
                stream.assembler.add_text(spk, diff, start, end, words, continues_word=continues)
        self._trim_hypothesis(inst)

    def _words(
        self, tokens: list[int], frames: list[int], offset: float
    ) -> tuple[list[WordTiming], bool]:
        words: list[WordTiming] = []
        continues = not self._word_start[tokens[0]]
        for token, frame in zip(tokens, frames, strict=True):
            start = offset + frame * self.frame_sec
            end = start + self.frame_sec
            piece = self._pieces[token]
            if self._word_start[token] or not words:
                words.append(WordTiming(piece, start, end))
            else:
                last = words[-1]
                words[-1] = WordTiming(last.text + piece, last.start_s, end)
        return words, continues

    def _trim_hypothesis(self, inst: SpeakerInstance) -> None:
        """Keep only the last token: decoding goes on from the decoder state, and the text a
        step adds comes from its own tokens, so the call's earlier tokens are not needed."""
        count = len(inst.hypothesis.y_sequence)
        if count > 1:
            _truncate(inst.hypothesis, count, start=count - 1)

    def _finish(self, stream: _Stream, audio_sec: float) -> StreamUpdate:
        segs = stream.assembler.collect(next_offset=stream.steps * self.step_sec, ended=True)
        self._streams.pop(stream.stream_id, None)
        return StreamUpdate(
            stream.stream_id, self._with_spans(stream, segs), ended=True, audio_sec=audio_sec
        )

    def _with_spans(
        self, stream: _Stream, segs: list[SegmentUpdate]
    ) -> tuple[tuple[SegmentUpdate, SequenceSpan], ...]:
        marks = stream.seq_marks
        out = []
        for seg in segs:
            span = SequenceSpan(
                _sequence_at(marks, int(seg.start_s * self.sample_rate)),
                _sequence_at(marks, int(seg.end_s * self.sample_rate)),
            )
            out.append((seg, span))
        # Marks before the earliest sample any open or future segment can start are done.
        horizon = stream.assembler.open_start()
        horizon = stream.steps * self.step_sec if horizon is None else horizon
        horizon_sample = int(horizon * self.sample_rate)
        while len(marks) > 1 and marks[1][0] <= horizon_sample:
            marks.popleft()
        return tuple(out)


def _check_precision(models: LoadedModels, cfg: EngineConfig) -> torch.dtype:
    """The dtype of the models' weights, which ``cfg.dtype`` needs (float64 for fp64, float32
    otherwise: bf16 autocasts from float32 weights); sets the TF32 switch on CUDA."""
    want = torch.float64 if cfg.dtype == "fp64" else torch.float32
    for role, model in (("diarizer", models.diarizer), ("ASR model", models.asr)):
        got = next(model.parameters()).dtype
        if got != want:
            raise ValueError(
                f"engine dtype {cfg.dtype!r} needs the {role}'s weights in {want}, they are "
                f"{got}: load the models with torch's default dtype set to {want}"
            )
    if models.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    return want


def _sequence_at(marks: deque[tuple[int, int]], sample: int) -> int:
    """Sequence number of the input record holding ``sample`` (-1 if none was recorded)."""
    found = marks[0][1] if marks else -1
    for start, seq in marks:
        if start > sample:
            break
        found = seq
    return found


def _subsampled(pre_encode: torch.nn.Module, lengths: torch.Tensor) -> torch.Tensor:
    """Frame counts after the encoder's subsampling, as its own forward computes them."""
    return calc_length(
        lengths,
        all_paddings=pre_encode._left_padding + pre_encode._right_padding,
        kernel_size=pre_encode._kernel_size,
        stride=pre_encode._stride,
        ceil_mode=pre_encode._ceil_mode,
        repeat_num=pre_encode._sampling_num,
    ).to(torch.int64)


def _subsampled_host(pre_encode: torch.nn.Module, lengths: list[int], drop: int) -> list[int]:
    """``_subsampled`` on the host, less the ``drop`` frames each chunk drops (at least 0)."""
    frames = _subsampled(pre_encode, torch.tensor(lengths, dtype=torch.int64))
    return [max(0, n - drop) for n in frames.tolist()]


def _cache_kwargs(caches: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict:
    channel, time_cache, channel_len = caches
    return {
        "cache_last_channel": channel,
        "cache_last_time": time_cache,
        "cache_last_channel_len": channel_len,
    }


def _as_list(values) -> list[int]:
    if values is None:
        return []
    if isinstance(values, torch.Tensor):
        return values.tolist()
    return list(values)


def _snapshot(hyp: Any) -> tuple[Any, dict[str, Any]]:
    """A hypothesis and copies of its fields (lists copied: decoding extends them in place)."""
    fields = {k: list(v) if isinstance(v, list) else v for k, v in hyp.__dict__.items()}
    return hyp, fields


def _token_count(hyp: Any) -> int:
    return 0 if hyp is None else len(hyp.y_sequence)


def _truncate(hyp: Any, stop: int, start: int = 0) -> None:
    """Keep a hypothesis' tokens ``[start:stop]`` (and the timestamps that run with them)."""
    ts = hyp.timestamp
    aligned = isinstance(ts, list | torch.Tensor) and len(ts) == len(hyp.y_sequence)
    hyp.y_sequence = hyp.y_sequence[start:stop]
    if aligned:
        hyp.timestamp = ts[start:stop]
