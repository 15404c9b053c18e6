"""worker.engine.targets: batched gating and speaker targets equal the per-stream loops.

The reference below is the engine's former per-stream, per-instance code (NeMo's logic with the
background fix), kept here verbatim in spirit: random ragged states in float64 must give exactly
the same active speakers and the same targets, whatever the mix of ages, valid lengths, gating
and binarisation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.engine.engine import StreamingEngine, _subsampled_host
from worker.engine.models import LoadedModels
from worker.engine.targets import active_mask, speaker_targets, stack_right_aligned

N_SPK = 4
FRAMES_PER_CHUNK = 14
GATING_FRAMES = 28


def reference_active(recent: torch.Tensor, max_speakers: int, gating: bool) -> list[int]:
    if not gating:
        return list(range(max_speakers))
    peak = recent.max(dim=0).values
    values, indices = torch.topk(peak, k=max_speakers)
    return sorted(indices[values > 0.5].tolist())


def reference_targets(recents, active, part, valid, width, binary):
    targets = torch.zeros(len(part), width, dtype=torch.float64)
    background = torch.zeros_like(targets)
    for j, (i, spk) in enumerate(part):
        n = valid[i]
        window = recents[i][-FRAMES_PER_CHUNK:][-n:] if n else recents[i][:0]
        others = [s for s in active[i] if s != spk]
        fg = window[:, spk]
        bg = (window[:, others] > 0.5).sum(dim=-1) > 0 if others else torch.zeros_like(fg)
        targets[j, : n - len(fg)] = 1.0
        targets[j, n - len(fg) : n] = fg
        background[j, n - len(bg) : n] = bg.to(targets.dtype)
        targets[j, n:] = 1.0
    if binary:
        targets = (targets > 0.5).to(targets.dtype)
        background = (background > 0.5).to(targets.dtype)
    return targets, background


def random_recents(rng: np.random.Generator, rows: int, max_speakers: int) -> list[torch.Tensor]:
    """Recent predictions of streams of every age: none yet, a few frames, a full window."""
    recents = []
    for _ in range(rows):
        frames = int(rng.choice([1, 3, FRAMES_PER_CHUNK - 1, FRAMES_PER_CHUNK, 20, GATING_FRAMES]))
        preds = torch.from_numpy(rng.uniform(0, 1, (frames, N_SPK)) ** 3)
        preds[rng.uniform(size=preds.shape) < 0.2] = 0.5  # exactly at the threshold
        preds[:, max_speakers:] = 0.0
        recents.append(preds)
    return recents


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize(
    ("max_speakers", "gating", "binary"),
    [(4, True, True), (4, True, False), (2, True, True), (3, False, True), (4, False, False)],
)
def test_batched_gating_and_targets_equal_the_loops(seed, max_speakers, gating, binary) -> None:
    rng = np.random.default_rng(seed)
    rows = int(rng.integers(1, 9))
    recents = random_recents(rng, rows, max_speakers)
    width = 12
    valid = [int(rng.choice([0, 1, 5, width - 1, width])) for _ in range(rows)]

    recent = stack_right_aligned(recents)
    mask = active_mask(recent, max_speakers, gating)
    active = [np.flatnonzero(m).tolist() for m in mask.numpy()]
    assert active == [reference_active(r, max_speakers, gating) for r in recents]

    part = [(i, spk) for i in range(rows) for spk in active[i]]
    if not part:
        return
    plan = torch.tensor(
        [(i, spk, valid[i], min(len(recents[i]), FRAMES_PER_CHUNK)) for i, spk in part]
    )
    targets, background = speaker_targets(recent, mask, plan, width, binary)
    ref_targets, ref_background = reference_targets(recents, active, part, valid, width, binary)
    assert torch.equal(targets, ref_targets)
    assert torch.equal(background, ref_background)


def test_the_comparison_catches_a_shifted_window() -> None:
    """The reference is sensitive to the window's placement (so the test above can fail)."""
    rng = np.random.default_rng(0)
    recents = random_recents(rng, 3, 4)
    recent = stack_right_aligned(recents)
    mask = active_mask(recent, 4, False)
    part = [(i, spk) for i in range(3) for spk in range(4)]
    valid = [12, 12, 12]
    plan = torch.tensor([(i, spk, 11, min(len(recents[i]), FRAMES_PER_CHUNK)) for i, spk in part])
    targets, _ = speaker_targets(recent, mask, plan, 12, False)
    ref, _ = reference_targets(recents, [list(range(4))] * 3, part, valid, 12, False)
    assert not torch.equal(targets, ref)


def test_host_subsampling_equals_the_encoders_own(tiny_models: LoadedModels) -> None:
    """The engine computes valid encoder frames on the host; they must be the lengths each
    model's pre-encode returns, for every chunk length a stream can have."""
    engine = StreamingEngine(tiny_models)
    lengths = list(range(0, engine.layout.input_frames + 1))
    for pre_encode in (engine.asr.encoder.pre_encode, engine.diar.encoder.pre_encode):
        x = torch.zeros(len(lengths), engine.layout.input_frames, engine.extractor.n_mels)
        with torch.inference_mode():
            _, device_lengths = pre_encode(x=x, lengths=torch.tensor(lengths))
        expected = [max(0, int(n) - 2) for n in device_lengths]
        assert _subsampled_host(pre_encode, lengths, 2) == expected
