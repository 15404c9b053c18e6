"""worker.engine.models: random stand-ins are the real classes, cache, load and fail clearly.

The tiny pair is built once per session (a few seconds after NeMo's import) and shared.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from worker.engine.models import (
    LoadedModels,
    ModelLoadError,
    build_random_models,
    load_models,
)

DIARIZER_NAME = "nvidia/diar_streaming_sortformer_4spk-v2.1"
ASR_NAME = "nvidia/multitalker-parakeet-streaming-0.6b-v1"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_paths(model_cache: Path) -> tuple[Path, Path]:
    return build_random_models("tiny", model_cache, seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_paths: tuple[Path, Path], model_cache: Path) -> LoadedModels:
    diarizer, asr = tiny_paths
    return load_models(str(diarizer), str(asr), "cpu", model_cache)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_build_writes_small_nemo_files(tiny_paths: tuple[Path, Path]) -> None:
    diarizer, asr = tiny_paths
    assert diarizer.suffix == asr.suffix == ".nemo"
    assert "tiny" in diarizer.name and "tiny" in asr.name
    for path in tiny_paths:
        assert 100_000 < path.stat().st_size < 4_000_000
    assert not list(diarizer.parent.glob("*.tmp.nemo")), "temporary files left behind"


def test_second_build_hits_the_cache(tiny_paths: tuple[Path, Path], model_cache: Path) -> None:
    before = [p.stat().st_mtime_ns for p in tiny_paths]
    again = build_random_models("tiny", model_cache, seed=0)
    assert again == tiny_paths
    assert [p.stat().st_mtime_ns for p in again] == before


def test_loaded_models_are_the_real_classes_in_eval_mode(tiny: LoadedModels) -> None:
    from nemo.collections.asr.models import EncDecMultiTalkerRNNTBPEModel, SortformerEncLabelModel

    assert isinstance(tiny.diarizer, SortformerEncLabelModel)
    assert isinstance(tiny.asr, EncDecMultiTalkerRNNTBPEModel)
    assert tiny.device == torch.device("cpu")
    for model in (tiny.diarizer, tiny.asr):
        assert not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
        assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert tiny.diarizer_id.startswith("random-diarizer-tiny-")
    assert tiny.asr_id.startswith("random-asr-tiny-")
    assert "@" in tiny.asr_id


def test_tiny_parameter_counts(tiny: LoadedModels) -> None:
    assert 150_000 < _n_params(tiny.diarizer) < 500_000
    assert 150_000 < _n_params(tiny.asr) < 500_000


def test_tiny_models_have_the_streaming_configuration(tiny: LoadedModels) -> None:
    asr, diarizer = tiny.asr, tiny.diarizer
    assert [70, 13] in asr.encoder.att_context_size_all
    asr.encoder.set_default_att_context_size([70, 13])
    cfg = asr.encoder.streaming_cfg
    assert cfg.valid_out_len == 14  # 14 encoder frames of 80 ms = 1.12 s per step
    assert cfg.drop_extra_pre_encoded == 2
    assert cfg.shift_size == [105, 112]
    assert set(asr.spk_kernels) == set(asr.bg_spk_kernels) == {"0"}
    assert asr.tokenizer.vocab_size == 128
    modules = diarizer.sortformer_modules
    assert (modules.spkcache_len, modules.fifo_len, modules.n_spk) == (188, 188, 4)
    assert diarizer.async_streaming is False
    assert diarizer.encoder._feat_in == asr.encoder._feat_in == 128


def test_missing_nemo_file_is_a_clear_error(tmp_path: Path, tiny_paths) -> None:
    missing = tmp_path / "nope.nemo"
    with pytest.raises(ModelLoadError, match=r"no such \.nemo file"):
        load_models(str(missing), str(tiny_paths[1]), "cpu", tmp_path)


def test_wrong_model_class_is_a_clear_error(tmp_path: Path, tiny_paths) -> None:
    diarizer, _ = tiny_paths
    with pytest.raises(ModelLoadError, match="ASR model"):
        load_models(str(diarizer), str(diarizer), "cpu", tmp_path)


def test_pretrained_name_fails_fast_when_offline(
    tmp_path: Path, tiny_paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="not in the cache and the hub is offline"):
        load_models(DIARIZER_NAME, str(tiny_paths[1]), "cpu", tmp_path)
    assert time.monotonic() - started < 10


def test_pretrained_name_fails_fast_when_hub_unreachable(
    tmp_path: Path, tiny_paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="unreachable"):
        load_models(str(tiny_paths[0]), ASR_NAME, "cpu", tmp_path)
    assert time.monotonic() - started < 10


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_a_clear_error(tiny_paths) -> None:
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_models(str(tiny_paths[0]), str(tiny_paths[1]), "cuda")


def _two_voice_audio(seconds: float, sample_rate: int = 16000) -> np.ndarray:
    """Alternating low and high 'voices' (harmonic tones) over a little noise, deterministic."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    low = sum(np.sin(2 * np.pi * 120 * k * t) / k for k in range(1, 6))
    high = sum(np.sin(2 * np.pi * 230 * k * t) / k for k in range(1, 6))
    first = (t % 2.0) < 1.0
    audio = np.where(first, low, high) * 0.2
    audio += 0.01 * np.random.default_rng(0).standard_normal(t.shape)
    return audio.astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("masked_asr", [False, True], ids=["speaker-kernels", "masked-features"])
def test_tiny_pair_runs_through_nemo_multitalker_streaming(
    tiny: LoadedModels, masked_asr: bool
) -> None:
    """NeMo's own SpeakerTaggedASR accepts the tiny pair: the configs are complete."""
    from nemo.collections.asr.parts.utils.multispk_transcribe_utils import SpeakerTaggedASR
    from nemo.collections.asr.parts.utils.streaming_utils import CacheAwareStreamingAudioBuffer

    asr, diarizer = tiny.asr, tiny.diarizer
    asr.encoder.set_default_att_context_size([70, 13])
    cfg = OmegaConf.create(
        {
            "deploy_mode": True,
            "batch_size": 1,
            "max_num_of_spks": 4,
            "att_context_size": [70, 13],
            "masked_asr": masked_asr,
            "mask_preencode": False,
            "cache_gating": True,
            "cache_gating_buffer_size": 2,
            "single_speaker_mode": False,
            "binary_diar_preds": False,
            "sent_break_sec": 30.0,
            "fix_prev_words_count": 5,
            "update_prev_words_sentence": 5,
            "ignored_initial_frame_steps": 5,
            "generate_realtime_scripts": False,
        }
    )
    buffer = CacheAwareStreamingAudioBuffer(model=asr, online_normalization=False)
    buffer.append_audio(_two_voice_audio(4.0), stream_id=-1)
    streamer = SpeakerTaggedASR(cfg, asr, diarizer)
    drop_extra = asr.encoder.streaming_cfg.drop_extra_pre_encoded
    steps = 0
    with torch.inference_mode():
        for step, (chunk, lengths) in enumerate(buffer):
            streamer.perform_parallel_streaming_stt_spk(
                step_num=step,
                chunk_audio=chunk,
                chunk_lengths=lengths,
                is_buffer_empty=buffer.is_buffer_empty(),
                drop_extra_pre_encoded=0 if step == 0 else drop_extra,
            )
            steps += 1
    assert steps == 4  # 4 s: a 1.05 s first chunk, then 1.12 s steps
    preds = streamer.instance_manager.diar_states.diar_pred_out_stream
    assert preds.shape[0] == 1 and preds.shape[2] == 4 and preds.shape[1] >= 3 * 14
    assert torch.all((preds >= 0) & (preds <= 1))
    segments = streamer.generate_seglst_dicts_from_parallel_streaming(
        samples=[{"audio_filepath": "session.wav"}]
    )
    assert isinstance(segments, list)
    for segment in segments:
        assert {"speaker", "start_time", "end_time", "words", "session_id"} <= set(segment)
        assert segment["speaker"].startswith("speaker_")
