"""Benchmark of the streaming engine: ``python -m worker.bench`` (a benchmark, not a test).

What it measures, for each model size (random weights in the real classes and shapes, see
``worker.engine.models``) on the current device (CUDA when present, else CPU):

* throughput — audio seconds processed per wall second — with N concurrent calls batched in
  one ``StreamingEngine``, and with the same N calls run one at a time in the same process and
  run; their ratio is the batching speed-up;
* the per-call real-time factor, throughput / N (≥ 1: N live calls keep up), and the largest N
  measured that reaches it;
* where a step's time goes, from ``engine.last_timing``: the diarizer forward, the ASR part
  (pre-encode, per-instance speaker targets, cache gather, encoder and greedy decoding) and our
  own overhead, ``total − diarizer − ASR`` (chunking, speaker gating, state scatter and
  commit, transcript assembly);
* speaker instances per step, state bytes per stream, and peak resident memory;
* optionally (``--growth-sec``) whether a step's cost or a stream's state grows with the length
  of the call: a few long calls, first ten steps against the last ten.

How:

* Call i is conversation ``i mod 4`` of ``producer_tools.conversation.default_conversations``,
  rotated by ``2.5 s × (i div 4)`` so that copies differ. Each call is pushed whole, up front,
  and ended; its features are computed at push time, which is timed and charged to the
  throughput pro rata of the audio the measured steps consumed.
* One at a time: the N calls run in order through one engine, each until done or for
  ``--steps`` steps. Batched, right after: one engine holds all N calls; ``step()`` runs until
  every call is done, or for ``--steps`` steps. Running each N's pair back to back keeps a
  shared machine's changing load out of the ratio as far as possible; the table shows the load.
* The first step of every run (of every call, one at a time) is warm-up and is not measured:
  it meets new tensor shapes and the first chunk's special case.
* State per stream is ``engine.state_bytes`` less the features of audio the up-front push left
  queued (a live stream queues at most about one chunk), the largest seen over the measured
  steps, averaged over the calls.
* Peak memory is the process's peak resident set (``VmHWM``) during each batched run; Linux
  lets it be reset per run, elsewhere it is the peak since the start (model loading included).

Random weights make the greedy decoder emit a token at almost every decoding position, up to
``max_symbols`` (10) per encoder frame, where a trained model mostly emits blanks; decoding, and
the per-token transcript work, therefore cost more here than with the real checkpoints.
``--max-symbols`` caps that to show the effect.

Thread rule: one Python thread steps the engine (the main one); torch's intra-op threads are
its own (``--threads``; on a busy machine with few cores, one thread is steadier than two).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import os
import platform
import resource
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worker.engine.engine import EngineConfig, StreamingEngine
from worker.engine.models import LoadedModels, build_random_models, load_models

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "callscribe" / "models"
DEFAULT_CALLS = (1, 4, 8, 16)
# Steps per run by size (None: every call to its end); each includes one warm-up step.
DEFAULT_STEPS: dict[str, int | None] = {"tiny": None, "real": 4}
DEFAULT_GROWTH_SEC: dict[str, float] = {"tiny": 120.0, "real": 0.0}
GROWTH_CALLS = 4
GROWTH_WINDOW = 10  # steps compared at the start and at the end of the long calls
CALL_SHIFT_SEC = 2.5
PROGRESS_EVERY_SEC = 5.0

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class RunStats:
    """Sums over the measured steps of one run (N calls batched, or calls one at a time)."""

    calls: int
    steps: int  # measured steps that ran at least one stream
    audio_sec: float  # audio the measured steps consumed, all calls together
    step_sec: float  # wall time of the measured steps
    feature_sec: float  # feature extraction (at push time) charged to that audio
    diarizer_sec: float
    asr_sec: float
    overhead_sec: float
    stream_steps: int  # streams run, summed over the measured steps
    instances: int  # speaker instances run, summed over the measured steps
    state_bytes: float  # per stream: the largest seen, averaged over the calls
    peak_rss: int  # bytes

    @property
    def wall_sec(self) -> float:
        return self.step_sec + self.feature_sec

    @property
    def throughput(self) -> float:
        """Audio seconds per wall second."""
        return self.audio_sec / self.wall_sec if self.wall_sec > 0 else 0.0

    @property
    def step_total_sec(self) -> float:
        return self.diarizer_sec + self.asr_sec + self.overhead_sec

    def fractions(self) -> tuple[float, float, float]:
        """Diarizer, ASR and overhead as fractions of the engine's step time."""
        total = self.step_total_sec
        if total <= 0:
            return (0.0, 0.0, 0.0)
        return (self.diarizer_sec / total, self.asr_sec / total, self.overhead_sec / total)

    @property
    def instances_per_step(self) -> float:
        return self.instances / self.steps if self.steps else 0.0

    @property
    def instances_per_stream(self) -> float:
        return self.instances / self.stream_steps if self.stream_steps else 0.0


def _combine(runs: Sequence[RunStats]) -> RunStats:
    """Calls run one after another, as one run."""
    return RunStats(
        calls=sum(r.calls for r in runs),
        steps=sum(r.steps for r in runs),
        audio_sec=sum(r.audio_sec for r in runs),
        step_sec=sum(r.step_sec for r in runs),
        feature_sec=sum(r.feature_sec for r in runs),
        diarizer_sec=sum(r.diarizer_sec for r in runs),
        asr_sec=sum(r.asr_sec for r in runs),
        overhead_sec=sum(r.overhead_sec for r in runs),
        stream_steps=sum(r.stream_steps for r in runs),
        instances=sum(r.instances for r in runs),
        state_bytes=float(np.mean([r.state_bytes for r in runs])),
        peak_rss=max(r.peak_rss for r in runs),
    )


@dataclass(frozen=True)
class CallsResult:
    """N calls batched against the same N calls one at a time."""

    calls: int
    batched: RunStats
    sequential: RunStats
    load_1m: float = 0.0  # load average when the pair started (the machine may be shared)

    @property
    def speedup(self) -> float:
        seq = self.sequential.throughput
        return self.batched.throughput / seq if seq > 0 else 0.0

    @property
    def per_call_rtf(self) -> float:
        return self.batched.throughput / self.calls


@dataclass(frozen=True)
class GrowthResult:
    """The first and the last steps of a few long calls, per step and per stream."""

    calls: int
    call_sec: float
    steps: int
    window: int
    first_step_ms: float
    last_step_ms: float
    first_overhead_ms: float
    last_overhead_ms: float
    first_state_bytes: float
    last_state_bytes: float


@dataclass(frozen=True)
class BenchReport:
    """Everything one model size measured."""

    size: str
    device: str
    threads: int
    steps: int | None  # per run, warm-up included; None: every call to its end
    engine: EngineConfig
    max_symbols: int | None
    load_sec: float
    rss_after_load: int
    results: tuple[CallsResult, ...]
    growth: GrowthResult | None = None

    @property
    def max_realtime_calls(self) -> int | None:
        """The largest N measured whose per-call real-time factor is at least 1."""
        ok = [r.calls for r in self.results if r.per_call_rtf >= 1.0]
        return max(ok) if ok else None


# --------------------------------------------------------------------------------------------
# Measuring


def make_calls(
    conversations: Sequence[np.ndarray], n: int, sample_rate: int, shift_sec: float = CALL_SHIFT_SEC
) -> list[np.ndarray]:
    """N different calls from a few conversations: call i is conversation ``i mod k`` rotated
    left by ``shift_sec × (i div k)`` (wrapping around)."""
    k = len(conversations)
    calls = []
    for i in range(n):
        audio = conversations[i % k]
        shift = int((i // k) * shift_sec * sample_rate) % len(audio)
        calls.append(np.roll(audio, -shift).astype(np.float32, copy=False))
    return calls


def default_call_audio() -> list[np.ndarray]:
    """The four synthetic conversations (espeak-ng), 16 kHz float32."""
    from producer_tools.conversation import default_conversations

    return [c.audio for c in default_conversations().values()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0); elsewhere the peak stays process-wide."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """Peak resident set in bytes (since the last reset, where the kernel allows one)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024


def current_rss() -> int:
    kib = _status_kib("VmRSS")
    return peak_rss() if kib is None else kib * 1024


def _live_state_bytes(engine: StreamingEngine, stream_id: str) -> int:
    """``state_bytes`` less the features of audio still queued by the up-front push."""
    x = engine.extractor
    queued_frames = int(engine.buffered_sec(stream_id) * engine.sample_rate / x.hop)
    item = torch.empty((), dtype=x.dtype).element_size()
    return max(0, engine.state_bytes(stream_id) - queued_frames * x.n_mels * item)


@dataclass
class _Accumulator:
    """Collects one run's measured steps."""

    steps: int = 0
    audio_sec: float = 0.0
    step_sec: float = 0.0
    diarizer_sec: float = 0.0
    asr_sec: float = 0.0
    overhead_sec: float = 0.0
    stream_steps: int = 0
    instances: int = 0


def _run(
    engine: StreamingEngine,
    calls: Sequence[np.ndarray],
    steps: int | None,
    progress: Progress,
    label: str,
    per_step: list[tuple[float, float, float]] | None = None,
) -> RunStats:
    """Push ``calls`` into ``engine`` (empty), step them together, and measure."""
    device = engine.device
    ids = [f"{label}-{i}" for i in range(len(calls))]
    _sync(device)
    started = time.perf_counter()
    for stream_id, audio in zip(ids, calls, strict=True):
        engine.add_stream(stream_id)
        engine.push_audio(stream_id, audio, sequence=0)
        engine.end_stream(stream_id)
    _sync(device)
    push_sec = time.perf_counter() - started
    pushed_sec = sum(len(a) for a in calls) / engine.sample_rate

    acc = _Accumulator()
    state: dict[str, int] = {}
    done = 0
    run_started = last_report = time.perf_counter()
    while engine.stream_ids and (steps is None or done < steps):
        t0 = time.perf_counter()
        updates = engine.step()
        _sync(device)
        wall = time.perf_counter() - t0
        for update in updates:
            if update.error is not None:
                raise RuntimeError(f"stream {update.stream_id} failed: {update.error.message}")
        timing = engine.last_timing
        done += 1
        if done > 1:  # the first step is warm-up
            acc.step_sec += wall
            acc.audio_sec += sum(u.audio_sec for u in updates)
            if timing.streams:
                acc.steps += 1
                acc.diarizer_sec += timing.diarizer
                acc.asr_sec += timing.asr
                acc.overhead_sec += timing.overhead
                acc.stream_steps += timing.streams
                acc.instances += timing.instances
            live = {s: _live_state_bytes(engine, s) for s in engine.stream_ids}
            for stream_id, size in live.items():
                state[stream_id] = max(state.get(stream_id, 0), size)
            if per_step is not None and timing.streams:
                now_bytes = float(np.mean(list(live.values()))) if live else 0.0
                per_step.append((timing.total, timing.overhead, now_bytes))
        now = time.perf_counter()
        if now - last_report >= PROGRESS_EVERY_SEC:
            total = "" if steps is None else f"/{steps}"
            progress(f"    {label}: step {done}{total} ({now - run_started:.0f} s)")
            last_report = now
    for stream_id in engine.stream_ids:
        engine.drop_stream(stream_id)
    if acc.steps == 0:
        raise ValueError(f"{label}: no step after the warm-up step ran; give more --steps")
    return RunStats(
        calls=len(calls),
        steps=acc.steps,
        audio_sec=acc.audio_sec,
        step_sec=acc.step_sec,
        feature_sec=push_sec * acc.audio_sec / pushed_sec,
        diarizer_sec=acc.diarizer_sec,
        asr_sec=acc.asr_sec,
        overhead_sec=acc.overhead_sec,
        stream_steps=acc.stream_steps,
        instances=acc.instances,
        state_bytes=float(np.mean(list(state.values()))) if state else 0.0,
        peak_rss=peak_rss(),
    )


def set_max_symbols(models: LoadedModels, max_symbols: int) -> None:
    """Cap the greedy decoder's tokens per encoder frame (before an engine is built)."""
    from omegaconf import open_dict

    decoding = models.asr.cfg.decoding
    with open_dict(decoding):
        decoding.greedy.max_symbols = max_symbols
    models.asr.change_decoding_strategy(decoding, verbose=False)


def run_benchmark(
    models: LoadedModels,
    calls: Sequence[int] = DEFAULT_CALLS,
    steps: int | None = None,
    *,
    size: str = "",
    config: EngineConfig | None = None,
    conversations: Sequence[np.ndarray] | None = None,
    growth_sec: float = 0.0,
    max_symbols: int | None = None,
    load_sec: float = 0.0,
    progress: Progress = _quiet,
) -> BenchReport:
    """Measure ``models`` with each number of concurrent ``calls``; see the module docstring.

    ``steps``: steps per run, the first of which is warm-up (None: every call to its end).
    """
    if not calls or min(calls) < 1:
        raise ValueError(f"calls must be positive numbers, got {list(calls)}")
    if steps is not None and steps < 2:
        raise ValueError(f"steps must be at least 2 (one warm-up step), got {steps}")
    config = config or EngineConfig()
    if max_symbols is not None:
        set_max_symbols(models, max_symbols)
    if conversations is None:
        conversations = default_call_audio()
    rss_after_load = current_rss()
    engine = StreamingEngine(models, config)
    all_calls = make_calls(conversations, max(calls), engine.sample_rate)

    progress("  warm-up: 1 call, 2 steps")
    _run(engine, all_calls[:1], 2, progress, "warmup")

    results = []
    for n in sorted(set(calls)):
        # Each N's two runs back to back, so that both meet the same load on a shared machine.
        load = _load_1m()
        progress(f"  {n} calls one at a time (load {load:.1f})")
        one_by_one = []
        for i, audio in enumerate(all_calls[:n]):
            one_by_one.append(_run(engine, [audio], steps, progress, f"seq{n}-{i}"))
            if n > 1:
                progress(f"    call {i + 1}/{n} done")
        progress(f"  {n} calls batched")
        _reset_peak_rss()
        batched = _run(StreamingEngine(models, config), all_calls[:n], steps, progress, f"b{n}")
        results.append(CallsResult(n, batched, _combine(one_by_one), load))
        progress(
            f"    {batched.throughput:.2f} audio s/s, speed-up {results[-1].speedup:.2f}x, "
            f"RTF/call {results[-1].per_call_rtf:.2f}"
        )

    growth = None
    if growth_sec > 0:
        progress(f"  growth check: {GROWTH_CALLS} calls of {growth_sec:.0f} s")
        growth = _growth(models, config, conversations, growth_sec, progress)

    return BenchReport(
        size=size,
        device=_device_name(models.device),
        threads=torch.get_num_threads(),
        steps=steps,
        engine=config,
        max_symbols=max_symbols,
        load_sec=load_sec,
        rss_after_load=rss_after_load,
        results=tuple(results),
        growth=growth,
    )


def _growth(
    models: LoadedModels,
    config: EngineConfig,
    conversations: Sequence[np.ndarray],
    call_sec: float,
    progress: Progress,
) -> GrowthResult:
    config = dataclasses.replace(
        config, max_buffered_audio_sec=max(config.max_buffered_audio_sec, call_sec + 5.0)
    )
    engine = StreamingEngine(models, config)
    n = int(call_sec * engine.sample_rate)
    calls = []
    for audio in make_calls(conversations, GROWTH_CALLS, engine.sample_rate):
        calls.append(np.tile(audio, n // len(audio) + 1)[:n])
    per_step: list[tuple[float, float, float]] = []
    _run(engine, calls, None, progress, "long", per_step)
    body = per_step[:-1]  # the last step runs a short final chunk
    w = min(GROWTH_WINDOW, len(body) // 2)
    if w < 1:
        raise ValueError(f"growth check: {call_sec} s calls are too short")
    first, last = body[:w], body[-w:]

    def mean(rows: list[tuple[float, float, float]], k: int, scale: float = 1.0) -> float:
        return float(np.mean([r[k] for r in rows])) * scale

    return GrowthResult(
        calls=GROWTH_CALLS,
        call_sec=call_sec,
        steps=len(per_step),
        window=w,
        first_step_ms=mean(first, 0, 1e3),
        last_step_ms=mean(last, 0, 1e3),
        first_overhead_ms=mean(first, 1, 1e3),
        last_overhead_ms=mean(last, 1, 1e3),
        first_state_bytes=first[0][2],
        last_state_bytes=last[-1][2],
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


# --------------------------------------------------------------------------------------------
# Reporting


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells = [list(header), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _pct(part: float, fraction: float) -> str:
    return f"{part * 1e3:.0f} ({fraction * 100:.0f}%)"


def _split_row(label: str, run: RunStats) -> list[str]:
    d, a, o = run.fractions()
    n = run.steps
    return [
        label,
        f"{run.step_total_sec / n * 1e3:.0f}",
        _pct(run.diarizer_sec / n, d),
        _pct(run.asr_sec / n, a),
        _pct(run.overhead_sec / n, o),
        f"{run.feature_sec / n * 1e3:.0f}",
    ]


def format_report(report: BenchReport) -> str:
    """The report as text: markdown tables and a few lines around them."""
    cfg = report.engine
    steps = "every call to its end" if report.steps is None else f"{report.steps} steps per run"
    symbols = "model default (10)" if report.max_symbols is None else str(report.max_symbols)
    lines = [
        f"### {report.size or 'models'}: {steps}, first step of each run not measured (warm-up)",
        "",
        f"Device {report.device}, {report.threads} torch threads; cache gating "
        f"{'on' if cfg.cache_gating else 'off'}, max speakers {cfg.max_speakers}, decoder max "
        f"symbols/frame {symbols}. Models loaded in {report.load_sec:.0f} s; RSS after loading "
        f"{report.rss_after_load / 2**30:.2f} GiB.",
        "",
    ]
    rows = []
    for r in report.results:
        b = r.batched
        rows.append(
            [
                str(r.calls),
                str(b.steps),
                f"{b.instances_per_step:.1f} ({b.instances_per_stream:.1f})",
                f"{b.audio_sec:.1f}",
                f"{b.wall_sec:.2f}",
                f"{b.throughput:.2f}",
                f"{r.per_call_rtf:.2f}",
                f"{r.sequential.throughput:.2f}",
                f"{r.speedup:.2f}x",
                f"{b.state_bytes / 1024:.0f}",
                f"{b.peak_rss / 2**30:.2f}",
                f"{r.load_1m:.1f}",
            ]
        )
    header = [
        "calls",
        "steps",
        "inst/step (/stream)",
        "audio s",
        "wall s",
        "audio s/s",
        "RTF/call",
        "1-at-a-time audio s/s",
        "speed-up",
        "state KiB/stream",
        "peak RSS GiB",
        "load",
    ]
    lines += [_table(header, rows), ""]
    split = [_split_row(f"{r.calls} batched", r.batched) for r in report.results]
    split += [_split_row(f"{r.calls} one at a time", r.sequential) for r in report.results]
    header = ["run", "step ms", "diarizer ms (%)", "ASR ms (%)", "overhead ms (%)", "features ms"]
    lines += [_table(header, split), ""]
    best = report.max_realtime_calls
    if best is None:
        top = max(report.results, key=lambda r: r.per_call_rtf)
        lines.append(
            f"Real time (per-call RTF ≥ 1): at no N measured; best RTF/call {top.per_call_rtf:.2f} "
            f"at N = {top.calls}."
        )
    else:
        rtf = next(r.per_call_rtf for r in report.results if r.calls == best)
        lines.append(
            f"Real time (per-call RTF ≥ 1): up to N = {best} measured (RTF/call {rtf:.2f})."
        )
    lines.append(
        "Times are means per measured step; % of the engine's step time. 'features': feature "
        "extraction at push time charged to that step's audio (counted in wall s, not in step ms). "
        "inst/step: speaker instances per step (per call). load: 1-minute load average when the "
        "pair of runs started."
    )
    g = report.growth
    if g is not None:
        lines += [
            "",
            f"Growth check: {g.calls} calls of {g.call_sec:.0f} s batched ({g.steps} steps); mean "
            f"of the first {g.window} measured steps against the last {g.window}:",
            "",
            _table(
                ["", "step ms", "overhead ms", "state KiB/stream"],
                [
                    [
                        "first",
                        f"{g.first_step_ms:.0f}",
                        f"{g.first_overhead_ms:.1f}",
                        f"{g.first_state_bytes / 1024:.0f}",
                    ],
                    [
                        "last",
                        f"{g.last_step_ms:.0f}",
                        f"{g.last_overhead_ms:.1f}",
                        f"{g.last_state_bytes / 1024:.0f}",
                    ],
                ],
            ),
        ]
    return "\n".join(lines)


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def _versions() -> str:
    try:
        import nemo

        nemo_version = nemo.__version__
    except Exception:  # a version string is all we want
        nemo_version = "?"
    return f"torch {torch.__version__}, nemo {nemo_version}, python {platform.python_version()}"


def _load_1m() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


# --------------------------------------------------------------------------------------------
# Command line


def _calls(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,4,8,16, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _steps(text: str) -> int:
    """Steps per run; 0 stands for 'all'."""
    if text in {"all", "0"}:
        return 0
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"at least 2 (the first step is warm-up) or 'all', got {text!r}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker.bench",
        description=(
            "Benchmark the streaming engine on random-weight models: throughput with N "
            "concurrent calls batched and one at a time, per-call real-time factor, the "
            "diarizer/ASR/overhead split of a step, state per stream, peak memory. Runs on "
            "CUDA when present, else on the CPU. Progress goes to stderr, the report to stdout."
        ),
        epilog=(
            "Defaults: tiny runs every call to its end and a 120 s growth check; real runs "
            "4 steps per run (1 warm-up + 3 measured) and no growth check. Real-size models "
            "are built once into the cache dir (~70 s, ~3 GB) and need ~9 GB RAM to load."
        ),
    )
    parser.add_argument(
        "--size",
        choices=("tiny", "real", "both"),
        default="both",
        help="model size to measure (default: both, tiny first)",
    )
    parser.add_argument(
        "--calls",
        type=_calls,
        default=DEFAULT_CALLS,
        help="numbers of concurrent calls, comma-separated (default: 1,4,8,16)",
    )
    parser.add_argument(
        "--steps",
        type=_steps,
        default=None,
        help=(
            "steps per run, the first being warm-up, or 'all' to run every call to its end "
            "(default: all for tiny, 4 for real)"
        ),
    )
    parser.add_argument(
        "--growth-sec",
        type=float,
        default=None,
        help=(
            f"length of the {GROWTH_CALLS} calls of the growth check, 0 to skip "
            "(default: 120 for tiny, 0 for real)"
        ),
    )
    parser.add_argument(
        "--max-speakers",
        type=int,
        default=EngineConfig.max_speakers,
        help="speaker instances per call at most, 1-4 (default: %(default)s)",
    )
    parser.add_argument(
        "--no-cache-gating",
        action="store_true",
        help="run every speaker instance every step instead of only the recently active ones",
    )
    parser.add_argument(
        "--max-symbols",
        type=int,
        default=None,
        help=(
            "cap on the greedy decoder's tokens per encoder frame (default: the model's, 10; "
            "random weights reach it at every frame, a trained model rarely emits one)"
        ),
    )
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda when available, else cpu)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's own choice, reported)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE_DIR,
        help="where the random models are built and reused (default: %(default)s)",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        metavar="PATH",
        help="also append the report, as a dated section, to this markdown file",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = EngineConfig(max_speakers=args.max_speakers, cache_gating=not args.no_cache_gating)
    sizes = ("tiny", "real") if args.size == "both" else (args.size,)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    load_before = _load()
    started = dt.datetime.now(dt.UTC)
    reports = []
    for size in sizes:
        progress(f"[{size}] building or finding the models in {args.cache_dir}")
        diarizer, asr = build_random_models(size, args.cache_dir)
        t0 = time.perf_counter()
        models = load_models(str(diarizer), str(asr), args.device)
        load_sec = time.perf_counter() - t0
        progress(f"[{size}] loaded in {load_sec:.0f} s on {models.device}")
        steps = DEFAULT_STEPS[size] if args.steps is None else (args.steps or None)
        growth = DEFAULT_GROWTH_SEC[size] if args.growth_sec is None else args.growth_sec
        report = run_benchmark(
            models,
            args.calls,
            steps,
            size=size,
            config=config,
            growth_sec=growth,
            max_symbols=args.max_symbols,
            load_sec=load_sec,
            progress=progress,
        )
        reports.append(report)
        print(format_report(report), end="\n\n", flush=True)
        del models

    device = reports[0].device
    kind = "CUDA" if device.startswith("cuda") else "CPU"
    header = [
        f"## Streaming engine ({kind}) — {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"- Machine: {_machine()}; device {device}, {reports[0].threads} torch threads.",
        f"- Versions: {_versions()}.",
        f"- Load average (1/5/15 min): {load_before} at the start, {_load()} at the end.",
        f"- Command: `python -m worker.bench {shlex.join(sys.argv[1:] if argv is None else argv)}`",
        "",
    ]
    print("\n".join(header[2:-1]))
    if args.markdown is not None:
        body = "\n\n".join(format_report(r) for r in reports)
        with args.markdown.open("a", encoding="utf-8") as out:
            out.write("\n" + "\n".join(header) + "\n" + body + "\n")
        progress(f"appended to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
