"""Engine unit-test fixtures: the tiny random-weight models, loaded once per session on the CPU.

``tiny_model_paths`` (the cached ``.nemo`` files) comes from the top-level ``tests/conftest.py``.
Every ``StreamingEngine`` writes its settings into the models it is given, so a test builds its
engine before it steps anything and never runs two engines with different settings at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from worker.engine.models import LoadedModels, load_models


@pytest.fixture(scope="session")
def tiny_models(tiny_model_paths: tuple[Path, Path]) -> LoadedModels:
    """Both tiny models in float32 on the CPU, shared by every engine test of the session."""
    if torch.get_default_dtype() != torch.float32:
        pytest.fail(f"tiny_models must load in float32, default is {torch.get_default_dtype()}")
    diarizer, asr = tiny_model_paths
    return load_models(str(diarizer), str(asr), device="cpu")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the module. The tiny models' kernels are too small to gain from
    more, and on a busy machine two threads contending for two cores make a step 10-40x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
