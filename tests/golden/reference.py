"""NeMo's own multi-talker streaming pipeline, run on one call alone: the golden reference.

This is NVIDIA's recipe from the model card (``CacheAwareStreamingAudioBuffer`` over the whole
file, ``SpeakerTaggedASR.perform_parallel_streaming_stt_spk`` per chunk), with the engine's
settings and fp32 (no autocast), and with the two NeMo 3.0 bugs the engine fixes patched the
same way, so a difference means the engine is wrong, not NeMo:

* background-speaker targets use the active speaker ids, not ``range(len(ids))``;
* a speaker's new text is the suffix after the previous text, not ``str.replace``;
* a step where no speaker is active still advances the clock (NeMo returns before adding
  the chunk's duration, so later segments come out 1.12 s early per silent chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from nemo.collections.asr.parts.utils.multispk_transcribe_utils import (
    MultiTalkerInstanceManager,
    SpeakerTaggedASR,
)
from nemo.collections.asr.parts.utils.streaming_utils import CacheAwareStreamingAudioBuffer
from omegaconf import OmegaConf

from worker.engine.engine import EngineConfig


class _ASRState(MultiTalkerInstanceManager.ASRState):
    def _is_new_text(self, spk_idx: int, text: str):
        prev = self._prev_history_speaker_texts[spk_idx]
        if text is None or text == prev:
            return None
        return text[len(prev) :] if text.startswith(prev) else text.strip()


class _InstanceManager(MultiTalkerInstanceManager):
    ASRState = _ASRState

    def get_active_speakers_info(self, active_speakers, chunk_audio, chunk_lengths):
        audio, lengths, targets, background = [], [], [], []
        hyps, channel, time, channel_len = [], [], [], []
        for batch_idx, speaker_ids in enumerate(active_speakers):
            preds = self.diar_states.previous_chunk_preds[batch_idx]
            state = self.batch_asr_states[batch_idx]
            for speaker_id in speaker_ids:
                audio.append(chunk_audio[batch_idx, :])
                lengths.append(chunk_lengths[batch_idx])
                targets.append(preds[:, speaker_id])
                others = [i for i in speaker_ids if i != speaker_id]  # the fix
                background.append((preds[:, others] > 0.5).sum(dim=-1) > 0)
                if speaker_id not in state.get_speakers():
                    self.add_speaker(batch_idx, speaker_id)
                hyps.append(state.previous_hypothesis[speaker_id])
                channel.append(state.cache_last_channel[:, speaker_id])
                time.append(state.cache_last_time[:, speaker_id])
                channel_len.append(state.cache_last_channel_len[speaker_id])
        if not audio:
            return None, None, None, None
        self.active_previous_hypotheses = hyps
        self.active_asr_pred_out_stream = [None] * len(hyps)
        self.active_cache_last_channel = torch.stack(channel).transpose(0, 1)
        self.active_cache_last_time = torch.stack(time).transpose(0, 1)
        self.active_cache_last_channel_len = torch.stack(channel_len)
        return (
            torch.stack(audio),
            torch.stack(lengths),
            torch.stack(targets),
            torch.stack(background),
        )


@dataclass
class ReferenceResult:
    segments: list[dict]  # NeMo seglst entries: speaker, start_time, end_time, words
    tokens: dict[int, list[int]]  # speaker index -> every token of the call


def run_reference(asr, diar, audio: np.ndarray, cfg: EngineConfig) -> ReferenceResult:
    """NeMo's pipeline on one call. The models must already carry the engine's settings."""
    nemo_cfg = OmegaConf.create(
        {
            "deploy_mode": True,
            "fix_prev_words_count": 5,
            "update_prev_words_sentence": 5,
            "ignored_initial_frame_steps": 5,
            "max_num_of_spks": cfg.max_speakers,
            "sent_break_sec": cfg.sent_break_sec,
            "att_context_size": list(cfg.att_context_size),
            "cache_gating": cfg.cache_gating,
            "cache_gating_buffer_size": cfg.cache_gating_buffer_size,
            "binary_diar_preds": cfg.binary_diar_preds,
            "masked_asr": False,
            "mask_preencode": False,
            "single_speaker_mode": False,
            "batch_size": 1,
            "generate_realtime_scripts": False,
        }
    )
    was_async = diar.async_streaming
    diar.async_streaming = False  # SpeakerTaggedASR builds the synchronous state
    try:
        buffer = CacheAwareStreamingAudioBuffer(
            model=asr, online_normalization=False, pad_and_drop_preencoded=True
        )
        dtype = np.float64 if torch.get_default_dtype() == torch.float64 else np.float32
        buffer.append_audio(audio.astype(dtype), stream_id=-1)
        streamer = SpeakerTaggedASR(nemo_cfg, asr, diar)
        streamer.instance_manager = _InstanceManager(
            asr_model=asr,
            diar_model=diar,
            max_num_of_spks=diar._cfg.max_num_of_spks,
            batch_size=1,
            sent_break_sec=cfg.sent_break_sec,
        )
        drop = asr.encoder.streaming_cfg.drop_extra_pre_encoded
        step_sec = streamer._nframes_per_chunk * streamer._frame_len_sec
        with torch.inference_mode():
            for step, (chunk, lengths) in enumerate(buffer):
                streamer._offset_chunk_start_time = step * step_sec  # the clock fix
                streamer.perform_parallel_streaming_stt_spk(
                    step_num=step,
                    chunk_audio=chunk.to(torch.get_default_dtype()),  # NeMo's mel is float32
                    chunk_lengths=lengths,
                    is_buffer_empty=buffer.is_buffer_empty(),
                    drop_extra_pre_encoded=drop,
                )
    finally:
        diar.async_streaming = was_async
    state = streamer.instance_manager.batch_asr_states[0]
    tokens = {}
    for spk in state.get_speakers():
        hyp = state.previous_hypothesis[spk]
        if hyp is not None:
            seq = hyp.y_sequence
            tokens[spk] = seq.tolist() if isinstance(seq, torch.Tensor) else list(seq)
    segments = [s for s in state.seglsts if s["words"].strip()]
    return ReferenceResult(segments=segments, tokens=tokens)
