"""bench.engine: a smoke run on the tiny models gives a report with sane numbers.

The tiny pair comes from the default model cache (``tiny_models``), like the benchmark's. The
calls are two-tone "voices" rather than espeak-ng conversations and torch uses one thread, to
keep the run to seconds on a busy machine.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.engine import (
    BenchReport,
    build_parser,
    format_report,
    make_calls,
    run_benchmark,
)
from worker.engine.models import LoadedModels


def _two_voices(seconds: float, low_hz: float, high_hz: float) -> np.ndarray:
    """Two harmonic 'voices' taking turns every second over a little noise."""
    t = np.arange(int(seconds * 16000)) / 16000
    low = sum(np.sin(2 * np.pi * low_hz * k * t) / k for k in range(1, 6))
    high = sum(np.sin(2 * np.pi * high_hz * k * t) / k for k in range(1, 6))
    audio = np.where((t % 2.0) < 1.0, low, high) * 0.2
    audio += 0.01 * np.random.default_rng(0).standard_normal(t.shape)
    return audio.astype(np.float32)


@pytest.fixture(scope="module")
def report(tiny_models: LoadedModels, one_torch_thread: None) -> BenchReport:
    conversations = [_two_voices(4.0, 120, 230), _two_voices(4.0, 150, 260)]
    return run_benchmark(
        tiny_models, calls=(1, 2), steps=2, size="tiny", conversations=conversations
    )


def test_report_has_one_result_per_number_of_calls(report: BenchReport) -> None:
    assert [r.calls for r in report.results] == [1, 2]
    assert report.threads == 1
    assert report.device == "cpu"


def test_throughput_and_speedup_are_positive(report: BenchReport) -> None:
    for result in report.results:
        for run in (result.batched, result.sequential):
            assert run.steps >= 1
            assert run.audio_sec > 0
            assert run.wall_sec > 0
            assert run.throughput > 0
            assert run.cpu_sec > 0 and run.cpu_throughput > 0
        assert result.per_call_rtf == pytest.approx(result.batched.throughput / result.calls)
        assert result.speedup > 0 and result.cpu_speedup > 0
    # Two calls stepped once each after warm-up consume twice the audio of one.
    one, two = report.results
    assert two.batched.audio_sec == pytest.approx(2 * one.batched.audio_sec, rel=0.05)
    assert two.sequential.audio_sec == pytest.approx(two.batched.audio_sec)


def test_time_split_fractions_sum_to_at_most_one(report: BenchReport) -> None:
    for run in [run for r in report.results for run in (r.batched, r.sequential)]:
        fractions = run.fractions()
        assert all(0.0 <= f <= 1.0 for f in fractions)
        assert sum(fractions) <= 1.0 + 1e-9
        assert run.diarizer_sec > 0 and run.asr_sec > 0


def test_state_memory_and_instances_are_sane(report: BenchReport) -> None:
    for result in report.results:
        run = result.batched
        assert run.state_bytes > 0
        assert run.peak_rss > 0
        assert 0 <= run.instances_per_stream <= report.engine.max_speakers
    assert report.rss_after_load > 0


def test_report_formats_as_tables(report: BenchReport) -> None:
    text = format_report(report)
    assert "| calls |" in text and "speed-up" in text and "overhead ms" in text
    assert "Real time (per-call RTF ≥ 1)" in text


def test_calls_pushed_in_pieces_measure_the_feature_cost(
    tiny_models: LoadedModels, one_torch_thread: None
) -> None:
    audio = [_two_voices(3.0, 120, 230)]
    whole = run_benchmark(tiny_models, calls=(1,), steps=2, conversations=audio)
    pieces = run_benchmark(tiny_models, calls=(1,), steps=2, conversations=audio, push_ms=20)
    assert pieces.push_ms == 20 and whole.push_ms == 0
    for report in (whole, pieces):
        (result,) = report.results
        assert result.batched.feature_sec > 0
        assert result.batched.audio_sec == pytest.approx(1.12, abs=0.01)


def test_calls_differ_and_keep_their_length() -> None:
    rng = np.random.default_rng(0)
    conversations = [rng.standard_normal(16000 * 3).astype(np.float32) for _ in range(2)]
    calls = make_calls(conversations, 5, 16000, shift_sec=1.0)
    assert [len(c) for c in calls] == [48000] * 5
    assert np.array_equal(calls[0], conversations[0])
    assert np.array_equal(calls[2][: 2 * 16000], conversations[0][16000:])
    assert not np.array_equal(calls[0], calls[2])


def test_command_line_parses_its_options() -> None:
    args = build_parser().parse_args(["--size", "tiny", "--calls", "1,2", "--steps", "all"])
    assert args.calls == (1, 2) and args.steps == 0 and args.size == "tiny"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--steps", "1"])
