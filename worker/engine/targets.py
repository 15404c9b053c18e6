"""Speaker gating and the ASR's speaker targets for a whole step, as batched tensor operations.

NeMo builds both per stream and per speaker instance with Python loops that read tensor values
back to the host (``int()``, ``.tolist()``): on a GPU every read is a synchronisation, and there
are a few per stream per step. Here the recent diarizer predictions of all streams of a step are
stacked right-aligned into one tensor, gating is one comparison, the active speakers reach the
host in one copy, and the targets of all instances come from one gather.

The semantics are NeMo's (with the background fix the engine documents):

* a speaker is active when its prediction exceeded 0.5 in any of the stream's recent frames;
* an instance's targets are the last chunk's predictions of its speaker (the stream's last
  ``min(recent frames, frames_per_chunk, valid frames)`` predictions), left-padded with 1 to the
  chunk's valid frames and filled with 1 beyond them; its background targets say whether any
  other active speaker exceeded 0.5 in those frames (0 elsewhere).

Thread rule: pure functions, called from the engine's thread.
"""

from __future__ import annotations

import torch


def stack_right_aligned(recents: list[torch.Tensor]) -> torch.Tensor:
    """``(B, frames, n_spk)`` with row ``i`` holding ``recents[i]`` at its end, zeros before it
    (predictions are probabilities, so zeros never exceed a threshold)."""
    frames = max(r.shape[0] for r in recents)
    out = recents[0].new_zeros(len(recents), frames, recents[0].shape[1])
    for i, recent in enumerate(recents):
        if recent.shape[0]:
            out[i, frames - recent.shape[0] :] = recent
    return out


def active_mask(recent: torch.Tensor, max_speakers: int, gating: bool) -> torch.Tensor:
    """``(B, n_spk)`` bool: the speakers each stream runs an ASR instance for. Without gating,
    the first ``max_speakers``; with it, those whose recent peak exceeded 0.5 (predictions of
    speakers past ``max_speakers`` must already be zero)."""
    if not gating:
        mask = torch.zeros(recent.shape[0], recent.shape[2], dtype=torch.bool, device=recent.device)
        mask[:, :max_speakers] = True
        return mask
    return recent.amax(dim=1) > 0.5


def speaker_targets(
    recent: torch.Tensor,
    active: torch.Tensor,
    plan: torch.Tensor,
    width: int,
    binary: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and background targets ``(J, width)`` for ``J`` speaker instances.

    ``recent`` is ``stack_right_aligned`` of the streams' recent predictions, ``active`` their
    ``active_mask``; ``plan`` is ``(J, 4)`` int64 on the device, one row per instance:
    stream row, speaker, the chunk's valid encoder frames ``n``, and how many of the stream's
    last predictions form its window (``min(recent frames, frames_per_chunk)``).
    """
    rows, spk, valid, window = plan.unbind(dim=1)
    frames = recent.shape[1]
    t = torch.arange(width, device=recent.device)
    from_end = valid[:, None] - 1 - t[None, :]  # 0 at the last valid frame
    inside = (from_end >= 0) & (from_end < window[:, None])
    source = (frames - 1 - from_end).clamp(0, frames - 1)  # (J, width) into recent's frames
    preds = recent[rows].gather(1, source[:, :, None].expand(-1, -1, recent.shape[2]))
    own = preds.gather(2, spk[:, None, None].expand(-1, width, 1)).squeeze(2)
    others = active[rows].clone()
    others[torch.arange(len(spk), device=spk.device), spk] = False
    background = ((preds > 0.5) & others[:, None, :]).any(dim=2).to(recent.dtype)
    targets = torch.where(inside, own, torch.ones_like(own))
    background = torch.where(inside, background, torch.zeros_like(background))
    if binary:
        targets = (targets > 0.5).to(recent.dtype)
        background = (background > 0.5).to(recent.dtype)
    return targets, background
