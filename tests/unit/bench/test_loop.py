"""The loop benchmark (``bench.loop``) on a tiny input: its pass-through engine, its
count of what came out, and its report."""

from __future__ import annotations

import numpy as np

from bench.loop import (
    MODES,
    PCM_20MS,
    SECTION_TITLE,
    PassThroughEngine,
    append_markdown,
    bench_throughput,
    markdown_section,
    parse_format,
)


def test_pass_through_engine_gives_one_segment_per_record_and_ends_on_request() -> None:
    engine = PassThroughEngine()
    engine.add_stream("a")
    engine.push_audio("a", np.zeros(320, dtype=np.float32), 0)
    engine.push_audio("a", np.zeros(320, dtype=np.float32), 1)
    assert engine.ready_streams() == ["a"]
    [update] = engine.step()
    assert [(seg.segment_index, seg.final, span.first) for seg, span in update.segments] == [
        (0, False, 0),
        (1, False, 1),
    ]
    assert update.segments[1][0].start_s == 0.02 and not update.ended
    assert engine.ready_streams() == [] and engine.step() == []

    engine.push_audio("a", np.zeros(100, dtype=np.float32), 2)
    engine.push_audio("a", np.zeros(60, dtype=np.float32), 2)  # a resampler's tail: same record
    engine.end_stream("a")
    [update] = engine.step()
    assert [(seg.segment_index, seg.final) for seg, _ in update.segments] == [(2, True)]
    assert update.ended and update.segments[0][0].end_s == 0.05
    assert not engine.has_stream("a")


def test_formats_parse() -> None:
    assert parse_format("mulaw8k:20").payload_bytes == 160
    assert PCM_20MS.payload_bytes == 640


def test_every_record_comes_out_once_in_both_modes(kafka_bootstrap, tmp_path) -> None:
    results = bench_throughput(kafka_bootstrap, PCM_20MS, records=500, streams=10, partitions=2)

    assert [r.delivery for r in results] == list(MODES)
    for result in results:
        assert result.segment_events == 500, result
        assert result.stream_ends == 10 and result.dead_letters == 0, result
        assert result.complete and result.records_per_sec > 0 and result.thread_cpu_sec > 0

    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n\n## Engine\n\nsomeone else's section\n")
    append_markdown(report, markdown_section("python -m bench loop", results, []))
    text = report.read_text()
    assert text.startswith("# Benchmarks\n\n## Engine\n\nsomeone else's section\n\n## ")
    assert SECTION_TITLE in text and text.count("| PCM s16le 16 kHz, 20 ms |") == 2
