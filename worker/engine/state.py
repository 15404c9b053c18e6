"""Per-stream state, explicit and bounded, and the one piece of code that batches it.

A stream's model state is a handful of tensors with a leading batch row of 1:

* the diarizer's streaming state in NeMo's ``async_streaming`` form: fixed-size speaker cache
  and FIFO (with their lengths, predictions and silence profile), so streams of any age stack
  into one batch;
* the last ``gating_frames`` diarizer predictions (all the speaker gating and speaker targets
  look at; NeMo keeps the whole call's);
* per speaker instance: the cache-aware encoder's three caches and the RNNT decoder hypothesis,
  trimmed after every step to its last token (NeMo keeps and re-decodes the whole call's
  tokens every step).

``gather_*`` stacks rows of many streams into batch tensors; ``scatter_diarizer`` writes a batch
result back (the engine commits ASR results per instance). Nothing here grows with the length
of a call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_DIAR_FIELDS = (
    "spkcache",
    "spkcache_lengths",
    "spkcache_preds",
    "fifo",
    "fifo_lengths",
    "fifo_preds",
    "mean_sil_emb",
    "n_sil_frames",
)


@dataclass
class SpeakerInstance:
    """One speaker's ASR instance within a stream."""

    cache_last_channel: torch.Tensor  # (layers, 1, cache_frames, d_model)
    cache_last_time: torch.Tensor  # (layers, 1, d_model, conv_context)
    cache_last_channel_len: torch.Tensor  # (1,)
    hypothesis: Any = None  # NeMo Hypothesis, trimmed to its last token
    has_text: bool = False  # the speaker's text so far is not empty
    frames_decoded: int = 0  # encoder frames decoded so far (greedy_batch counts from here)

    def nbytes(self) -> int:
        tensors = (self.cache_last_channel, self.cache_last_time, self.cache_last_channel_len)
        size = sum(t.numel() * t.element_size() for t in tensors)
        if self.hypothesis is not None:
            size += 8 * len(self.hypothesis.y_sequence)
        return size


@dataclass
class DiarizerRow:
    """One stream's row of the diarizer's async streaming state."""

    tensors: dict[str, torch.Tensor]  # each with a leading dim of 1
    recent_preds: torch.Tensor  # (frames <= gating_frames, n_spk)

    def nbytes(self) -> int:
        tensors = [*self.tensors.values(), self.recent_preds]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class StreamModelState:
    """Model-side state of one stream (host-side facts live on the engine's stream record)."""

    diar: DiarizerRow
    speakers: dict[int, SpeakerInstance] = field(default_factory=dict)

    def nbytes(self) -> int:
        return self.diar.nbytes() + sum(s.nbytes() for s in self.speakers.values())


def new_diarizer_row(diar_model: torch.nn.Module, device: torch.device) -> DiarizerRow:
    state = diar_model.sortformer_modules.init_streaming_state(
        batch_size=1, async_streaming=True, device=device
    )
    n_spk = diar_model.sortformer_modules.n_spk
    tensors = {
        name: getattr(state, name)
        for name in _DIAR_FIELDS
        if getattr(state, name, None) is not None
    }
    # fifo_preds is rebuilt on every update; start it like the update leaves it.
    dtype = state.fifo.dtype
    tensors.setdefault(
        "fifo_preds", torch.zeros(1, state.fifo.shape[1], n_spk, device=device, dtype=dtype)
    )
    return DiarizerRow(
        tensors=tensors, recent_preds=torch.zeros(0, n_spk, device=device, dtype=dtype)
    )


def gather_diarizer(rows: list[DiarizerRow], state_type: type) -> Any:
    """One NeMo ``StreamingSortformerState`` holding ``rows`` in order."""
    state = state_type()
    for name in rows[0].tensors:
        setattr(state, name, torch.cat([r.tensors[name] for r in rows], dim=0))
    return state


def scatter_diarizer(state: Any, rows: list[DiarizerRow]) -> None:
    """Write row ``i`` of a stepped batch state back to ``rows[i]``."""
    for name in rows[0].tensors:
        batch = getattr(state, name)
        for i, row in enumerate(rows):
            row.tensors[name] = batch[i : i + 1].clone()


def new_speaker_instance(asr_model: torch.nn.Module, device: torch.device) -> SpeakerInstance:
    channel, time, channel_len = asr_model.encoder.get_initial_cache_state(
        batch_size=1, device=device
    )
    return SpeakerInstance(channel, time, channel_len)


def gather_asr(instances: list[SpeakerInstance]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder caches of ``instances`` stacked along the batch dimension (dim 1 for the caches)."""
    return (
        torch.cat([s.cache_last_channel for s in instances], dim=1),
        torch.cat([s.cache_last_time for s in instances], dim=1),
        torch.cat([s.cache_last_channel_len for s in instances], dim=0),
    )
