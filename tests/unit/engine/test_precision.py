"""worker.engine precision settings: dtype (fp32, bf16 autocast, fp64) and the TF32 switch.

bf16 is checked where it acts: forward hooks record the dtype each module computed in, so a
setting that silently did nothing (or autocast that leaked into the preprocessor or the RNN-T
decoder) fails here. The CUDA checks are marked ``gpu`` and skipped without CUDA.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from producer_tools.conversation import default_conversations
from worker.engine.config import EngineConfig
from worker.engine.engine import StreamingEngine
from worker.engine.models import LoadedModels, load_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def short_call() -> np.ndarray:
    return next(iter(default_conversations().values())).audio[: 4 * 16000]


def first_linear(module: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in module.modules() if isinstance(m, torch.nn.Linear))


@contextmanager
def output_dtypes(modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, set[torch.dtype]]]:
    """Records the dtype of every floating-point output of each module while the block runs."""
    seen: dict[str, set[torch.dtype]] = {name: set() for name in modules}
    handles = []
    for name, module in modules.items():

        def hook(_module, _args, output, name=name) -> None:
            outputs = output if isinstance(output, tuple | list) else (output,)
            seen[name].update(
                t.dtype for t in outputs if isinstance(t, torch.Tensor) and t.is_floating_point()
            )

        handles.append(module.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def watched(engine: StreamingEngine) -> dict[str, torch.nn.Module]:
    return {
        "diarizer encoder": first_linear(engine.diar.encoder),
        "asr encoder": first_linear(engine.asr.encoder),
        "preprocessor": engine.extractor.module,
        "rnnt joint": first_linear(engine.asr.joint),
    }


def run_one(models: LoadedModels, audio: np.ndarray, config: EngineConfig):
    """One call through a fresh engine in 0.5 s pieces: its updates, and the dtypes its
    modules computed in."""
    engine = StreamingEngine(models, config)
    updates = []
    with output_dtypes(watched(engine)) as seen:
        engine.add_stream("a")
        for start in range(0, len(audio), 8000):
            engine.push_audio("a", audio[start : start + 8000])
            while engine.ready_streams():
                updates += engine.step()
        engine.end_stream("a")
        while engine.ready_streams():
            updates += engine.step()
    return updates, seen


@pytest.mark.parametrize(("dtype", "encoders"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_bf16_autocasts_the_encoders_only(tiny_models, short_call, dtype, encoders) -> None:
    updates, seen = run_one(tiny_models, short_call, EngineConfig(dtype=dtype))
    assert [u.error for u in updates if u.error is not None] == []
    assert updates[-1].ended
    assert any(seg.final for u in updates for seg, _ in u.segments), "no final segment"
    assert seen["diarizer encoder"] == {encoders}
    assert seen["asr encoder"] == {encoders}
    assert seen["preprocessor"] == {torch.float32}
    assert seen["rnnt joint"] == {torch.float32}


def test_bf16_keeps_the_stored_state_in_float32(tiny_models, short_call) -> None:
    """State written back after a bf16 step keeps the models' dtype, so streams stepped in
    different batches (and a retry from the same state) always stack into one tensor."""
    engine = StreamingEngine(tiny_models, EngineConfig(dtype="bf16"))
    engine.add_stream("a")
    engine.push_audio("a", short_call[: 3 * 16000])
    engine.step()
    state = engine._streams["a"].model
    tensors = [*state.diar.tensors.values(), state.diar.recent_preds]
    for inst in state.speakers.values():
        tensors += [inst.cache_last_channel, inst.cache_last_time]
    assert state.speakers, "some speaker should be active after the first step"
    floating = {t.dtype for t in tensors if t.is_floating_point()}
    assert floating == {torch.float32}


def test_models_in_the_wrong_dtype_are_a_clear_error(tiny_models) -> None:
    with pytest.raises(
        ValueError, match=r"dtype 'fp64' needs the diarizer's weights in torch\.float64"
    ):
        StreamingEngine(tiny_models, EngineConfig(dtype="fp64"))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"dtype": "fp16"}, "dtype must be one of fp32, bf16, fp64"),
        ({"dtype": "float32"}, "dtype must be one of fp32, bf16, fp64"),
        ({"dtype": "fp64", "allow_tf32": True}, "cannot apply with dtype fp64"),
    ],
)
def test_bad_precision_settings_say_what_is_allowed(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**settings)


@pytest.mark.gpu
def test_bf16_on_cuda_autocasts_the_encoders_only(tiny_model_paths, short_call) -> None:
    diarizer, asr = tiny_model_paths
    models = load_models(str(diarizer), str(asr), device="cuda")
    updates, seen = run_one(models, short_call, EngineConfig(dtype="bf16", allow_tf32=True))
    assert [u.error for u in updates if u.error is not None] == []
    assert any(seg.final for u in updates for seg, _ in u.segments), "no final segment"
    assert seen["diarizer encoder"] == {torch.bfloat16}
    assert seen["asr encoder"] == {torch.bfloat16}
    assert seen["preprocessor"] == {torch.float32}
    assert seen["rnnt joint"] == {torch.float32}
    assert torch.backends.cuda.matmul.allow_tf32
