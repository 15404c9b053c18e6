"""bench.engine on the tiny models with tiny N: the JSON it writes, and stage times that add up.

No test here looks at how fast anything ran. The calls are two-tone "voices" rather than
espeak-ng conversations, short, with one warm-up step, and torch uses one thread, to keep the
run to seconds on a busy machine.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from bench import engine as bench_engine
from bench.engine import (
    BenchError,
    BenchReport,
    CallAudio,
    CallsResult,
    RoundSample,
    RunPlan,
    apply_dtype,
    build_parser,
    format_report,
    run_benchmark,
    run_calls,
)
from bench.report import write_json
from bench.stages import STAGES
from worker.engine.config import EngineConfig
from worker.engine.models import LoadedModels

PLAN = RunPlan(call_sec=5.0, warmup_steps=1, measured_steps=2, push_ms=20.0)
JSON_FIELDS = {
    "calls": int,
    "step_ms_p50": float,
    "step_ms_p95": float,
    "host_ms_per_call_step": float,
    "features_ms_per_call_step": float,
    "model_ms_per_step": float,
    "device_mem_mb_per_call": float,
}


def _two_voices(seconds: float, low_hz: float, high_hz: float) -> np.ndarray:
    """Two harmonic 'voices' taking turns every second over a little noise."""
    t = np.arange(int(seconds * 16000)) / 16000
    low = sum(np.sin(2 * np.pi * low_hz * k * t) / k for k in range(1, 6))
    high = sum(np.sin(2 * np.pi * high_hz * k * t) / k for k in range(1, 6))
    audio = np.where((t % 2.0) < 1.0, low, high) * 0.2
    audio += 0.01 * np.random.default_rng(0).standard_normal(t.shape)
    return audio.astype(np.float32)


CONVERSATIONS = [_two_voices(3.0, 120, 230), _two_voices(3.0, 150, 260)]


@pytest.fixture(scope="module")
def report(tiny_models: LoadedModels, one_torch_thread: None) -> BenchReport:
    return run_benchmark(
        tiny_models, calls=(1, 2), plan=PLAN, size="tiny", conversations=CONVERSATIONS
    )


def test_json_has_the_issue_fields_per_n(report: BenchReport, tmp_path) -> None:
    path = tmp_path / "engine.json"
    write_json(path, report.as_json("python -m bench engine --calls 1,2"))
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "engine" and doc["dtype"] == "fp32" and doc["device"] == "cpu"
    assert doc["chunk_ms"] == pytest.approx(1120.0)
    assert [r["calls"] for r in doc["results"]] == [1, 2]
    for row in doc["results"]:
        for name, kind in JSON_FIELDS.items():
            assert isinstance(row[name], kind), (name, row[name])
            assert row[name] >= 0, (name, row[name])
        assert row["step_ms_p50"] <= row["step_ms_p95"]
        assert set(row["stage_ms_per_step"]) == {*STAGES, "host"}
        assert row["measured_steps"] == PLAN.measured_steps
    assert doc["one_call_alone"]["calls"] == 1
    assert doc["warmup_steps"] == 1 and doc["measured_steps"] == 2


def test_every_stage_is_timed_and_they_add_up_to_the_round(report: BenchReport) -> None:
    for result in report.results:
        assert len(result.rounds) == PLAN.measured_steps
        for r in result.rounds:
            # Each model stage ran (its hook is in place) and took some time.
            assert all(r.stages[s] > 0 for s in STAGES), r.stages
            # Nothing is counted twice: the stages fit inside the round, the rest is host.
            assert sum(r.stages.values()) <= r.wall_sec
            assert r.host_sec >= 0
            assert sum(r.stages.values()) + r.host_sec == pytest.approx(r.wall_sec)
        stages = result.stage_ms_per_step
        assert sum(stages.values()) == pytest.approx(result.wall_ms_per_step)
        model = stages["diarizer"] + stages["asr_encoder"] + stages["rnnt_decode"]
        assert result.model_ms_per_step == pytest.approx(model)
        assert result.host_ms_per_call_step == pytest.approx(stages["host"] / result.calls)
        assert result.features_ms_per_call_step == pytest.approx(stages["features"] / result.calls)


def test_each_step_takes_every_call_and_consumes_one_chunk_each(report: BenchReport) -> None:
    for result in report.results:
        for r in result.rounds:
            assert r.audio_sec == pytest.approx(1.12 * result.calls, abs=0.01)
        assert 0 < result.instances_per_call <= report.engine.max_speakers


def test_report_formats_as_tables(report: BenchReport) -> None:
    text = format_report(report)
    assert "| calls |" in text and "host ms/call-step" in text and "rnnt_decode ms" in text
    assert "Real time (round p95 ≤ 1120 ms chunk)" in text


def test_the_models_are_left_unwrapped(report: BenchReport, tiny_models: LoadedModels) -> None:
    diar, asr = tiny_models.diarizer, tiny_models.asr
    assert "forward_infer" not in vars(diar) and "frontend_encoder" not in vars(diar)
    assert "cache_aware_stream_step" not in vars(asr.encoder)
    assert not asr.encoder.pre_encode._forward_hooks
    assert not asr.encoder.pre_encode._forward_pre_hooks


def test_calls_too_short_for_the_plan_are_refused(
    tiny_models: LoadedModels, one_torch_thread: None
) -> None:
    audio = CallAudio(CONVERSATIONS, 16000, 1.0)
    plan = dataclasses.replace(PLAN, call_sec=2.0)
    with pytest.raises(BenchError, match=r"too short.*--call-sec 4"):
        run_calls(tiny_models, EngineConfig(), 1, audio, plan)


def _fake_result(n: int, round_sec: float) -> CallsResult:
    stages = dict.fromkeys(STAGES, 0.0)
    rounds = tuple(RoundSample(0.0, round_sec, stages, 1.12 * n) for _ in range(3))
    return CallsResult(n, rounds, 1.12, 2.0, 0.0, 0.0, 0, True, 0.0)


def test_paced_run_stops_at_the_first_n_that_falls_behind(
    tiny_models: LoadedModels, monkeypatch
) -> None:
    seen = []

    def fake_run_calls(models, config, n, audio, plan, progress=None):
        seen.append(n)
        return _fake_result(n, 0.5 if n < 4 else 2.0)

    monkeypatch.setattr(bench_engine, "run_calls", fake_run_calls)
    plan = dataclasses.replace(PLAN, paced=True)
    report = run_benchmark(
        tiny_models, (1, 2, 4, 8), plan, conversations=CONVERSATIONS, sequential=False
    )
    assert seen == [1, 2, 4]
    assert report.max_realtime_calls == 2 and report.stopped_at == 4
    assert "stopped at N = 4" in format_report(report)


def test_realtime_needs_the_p95_round_within_the_chunk() -> None:
    assert _fake_result(2, 1.0).realtime
    assert not _fake_result(2, 1.2).realtime


def test_call_audio_wraps_and_shifts_without_copies() -> None:
    a = np.arange(10, dtype=np.float32)
    b = -np.arange(10, dtype=np.float32)
    audio = CallAudio([a, b], sample_rate=2, shift_sec=1.5)
    assert audio.samples(0, 8, 4).tolist() == [8, 9, 0, 1]
    assert audio.samples(1, 0, 2).tolist() == [0, -1]
    assert audio.samples(2, 0, 2).tolist() == [3, 4]  # copy 1 of conversation 0: 3 samples in


def test_dtype_flag_says_what_the_engine_lacks() -> None:
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    if "dtype" in fields:
        assert apply_dtype("bf16", EngineConfig()).dtype == "bf16"  # type: ignore[attr-defined]
        return
    with pytest.raises(BenchError, match="no dtype setting yet"):
        apply_dtype("bf16", EngineConfig())
    previous = torch.get_default_dtype()
    try:
        assert apply_dtype("fp64", EngineConfig()) == EngineConfig()
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(previous)


def test_command_line_parses_its_options() -> None:
    args = build_parser().parse_args(
        ["--calls", "1,2", "--call-sec", "90", "--dtype", "fp64", "--paced", "--no-sequential"]
    )
    assert args.calls == (1, 2) and args.call_sec == 90 and args.dtype == "fp64"
    assert args.paced and args.no_sequential
    for bad in (["--call-sec", "0"], ["--steps", "-1"], ["--dtype", "fp16"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)
