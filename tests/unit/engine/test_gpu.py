"""The engine on CUDA gives the CPU's transcripts (float64 on both: no near-tie can flip a
token, so any difference is a logic or device bug, not rounding). Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from producer_tools.conversation import default_conversations
from tests.unit.engine.test_engine import run_calls, segment_key
from worker.engine.config import EngineConfig
from worker.engine.models import LoadedModels, load_models

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("one_torch_thread")]

CONFIG = EngineConfig(dtype="fp64")


@pytest.fixture(scope="module")
def cuda_fp64_models(tiny_model_paths, fp64_models) -> LoadedModels:
    """The tiny models in float64 on CUDA (``fp64_models`` keeps float64 the default dtype)."""
    assert torch.get_default_dtype() == torch.float64
    diarizer, asr = tiny_model_paths
    return load_models(str(diarizer), str(asr), device="cuda")


def test_cuda_transcripts_equal_the_cpu_ones(fp64_models, cuda_fp64_models) -> None:
    calls: dict[str, np.ndarray] = {name: c.audio for name, c in default_conversations().items()}
    sizes = (5937, 16000, 320, 9000)
    starts = {name: 2 * k for k, name in enumerate(calls)}
    cpu = run_calls(fp64_models, calls, CONFIG, piece_sizes=sizes, start_tick=starts)
    cuda = run_calls(cuda_fp64_models, calls, CONFIG, piece_sizes=sizes, start_tick=starts)
    assert not cpu.errors and not cuda.errors
    assert max(cuda.batch_sizes) >= 3
    for name in calls:
        ours = [segment_key(s) for s in cuda.finals(name)]
        assert ours, name
        assert ours == [segment_key(s) for s in cpu.finals(name)], name
