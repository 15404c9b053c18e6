"""Benchmark of the streaming engine: ``python -m bench engine`` (a benchmark, not a test).

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
  of the call: four long calls, the fastest of ten steps once the diarizer's caches are full
  against the fastest of the last ten, and the largest state in each half of the call.

How:

* Call i is conversation ``i mod 4`` of ``producer_tools.conversation.default_conversations``,
  rotated by ``2.5 s × (i div 4)`` so that copies differ. Each call is pushed up front, whole
  or (``--push-ms``) in pieces as input records would bring it, and ended; its features are
  computed at push time, which is timed and charged to the throughput pro rata of the audio
  the measured steps consumed.
* One at a time: the N calls run in order through one engine, each until done or for
  ``--steps`` steps. Batched, right after: one engine holds all N calls; ``step()`` runs until
  every call is done, or for ``--steps`` steps. Running each N's pair back to back keeps a
  shared machine's changing load out of the ratio as far as possible; the table shows the load.
* Each time is measured twice: wall time, and this process's CPU time, which other processes
  on a shared machine barely change (with one torch thread it is what the wall time would be
  on an idle machine); the speed-up is given on both.
* The first step of every run (of every call, one at a time) is warm-up and is not measured:
  it meets new tensor shapes and the first chunk's special case.
* State per stream is ``engine.state_bytes`` less the features of audio the up-front push left
  queued (a live stream queues at most about one chunk), the largest seen over the measured
  steps, averaged over the calls.
* Peak memory is the process's peak resident set (``VmHWM``) during each batched run; Linux
  lets it be reset per run, elsewhere it is the peak since the start (model loading included).

Random weights make the greedy decoder emit a token at almost every decoding position, up to
``max_symbols`` per encoder frame (10 in the real-size build, as in the real checkpoint; 1 in
the tiny one), where a trained model mostly emits blanks: decoding, and the per-token
transcript work, cost more here than with the real checkpoints. ``--max-symbols`` sets the cap.

Thread rule: one Python thread steps the engine (the main one); torch's intra-op threads are
its own (``--threads``; on a busy machine with few cores, one thread is steadier than two).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import math
import resource
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.report import append_markdown, header_lines, load_1m, load_line, table
from worker.engine.config import EngineConfig
from worker.engine.engine import StreamingEngine
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
    cpu_sec: float  # this process's CPU time for both, which others' load barely changes
    diarizer_sec: float
    asr_sec: float
    overhead_sec: float
    stream_steps: int  # streams run, summed over the measured steps
    instances: int  # speaker instances run, summed over the measured steps
    state_bytes: float  # per stream: the largest seen, averaged over the calls
    peak_rss: int  # bytes
    peak_gpu: int = 0  # bytes allocated by torch on CUDA at most (0 on the CPU)

    @property
    def wall_sec(self) -> float:
        return self.step_sec + self.feature_sec

    @property
    def throughput(self) -> float:
        """Audio seconds per wall second."""
        return self.audio_sec / self.wall_sec if self.wall_sec > 0 else 0.0

    @property
    def cpu_throughput(self) -> float:
        """Audio seconds per CPU second of this process."""
        return self.audio_sec / self.cpu_sec if self.cpu_sec > 0 else 0.0

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
        cpu_sec=sum(r.cpu_sec for r in runs),
        diarizer_sec=sum(r.diarizer_sec for r in runs),
        asr_sec=sum(r.asr_sec for r in runs),
        overhead_sec=sum(r.overhead_sec for r in runs),
        stream_steps=sum(r.stream_steps for r in runs),
        instances=sum(r.instances for r in runs),
        state_bytes=float(np.mean([r.state_bytes for r in runs])),
        peak_rss=max(r.peak_rss for r in runs),
        peak_gpu=max(r.peak_gpu for r in runs),
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
    def cpu_speedup(self) -> float:
        seq = self.sequential.cpu_throughput
        return self.batched.cpu_throughput / seq if seq > 0 else 0.0

    @property
    def per_call_rtf(self) -> float:
        return self.batched.throughput / self.calls


@dataclass(frozen=True)
class StepSample:
    """One step of the growth check: seconds, and the mean state per open stream."""

    total: float
    cpu: float  # this process's CPU time
    diarizer: float
    asr: float
    overhead: float
    state_bytes: float


@dataclass(frozen=True)
class GrowthResult:
    """A window of steps once the diarizer's speaker cache and FIFO are full, against the last
    window of the call. Times: the fastest step of each window (other work on a shared machine
    can slow a step, never speed it up); state: the largest in each half of the call."""

    calls: int
    call_sec: float
    steps: int
    window: int
    start_sec: float  # audio time where the first window starts
    start: StepSample
    end: StepSample


@dataclass(frozen=True)
class BenchReport:
    """Everything one model size measured."""

    size: str
    device: str
    threads: int
    steps: int | None  # per run, warm-up included; None: every call to its end
    engine: EngineConfig
    max_symbols: int  # the greedy decoder's tokens per encoder frame at most
    push_ms: float  # pieces the calls were pushed in (0: whole)
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
    cpu_sec: float = 0.0
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
    piece: int = 0,
    per_step: list[StepSample] | None = None,
) -> RunStats:
    """Push ``calls`` into ``engine`` (empty), ``piece`` samples at a time (0: whole), step
    them together, and measure."""
    device = engine.device
    ids = [f"{label}-{i}" for i in range(len(calls))]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    for stream_id, audio in zip(ids, calls, strict=True):
        engine.add_stream(stream_id)
        size = piece or len(audio)
        for seq, start in enumerate(range(0, len(audio), size)):
            engine.push_audio(stream_id, audio[start : start + size], sequence=seq)
        engine.end_stream(stream_id)
    _sync(device)
    push_sec = time.perf_counter() - started
    push_cpu_sec = time.process_time() - cpu_started
    pushed_sec = sum(len(a) for a in calls) / engine.sample_rate

    acc = _Accumulator()
    state: dict[str, int] = {}
    done = 0
    run_started = last_report = time.perf_counter()
    while engine.stream_ids and (steps is None or done < steps):
        t0, cpu0 = time.perf_counter(), time.process_time()
        updates = engine.step()
        _sync(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        for update in updates:
            if update.error is not None:
                raise RuntimeError(f"stream {update.stream_id} failed: {update.error.message}")
        timing = engine.last_timing
        done += 1
        if done > 1:  # the first step is warm-up
            acc.step_sec += wall
            acc.cpu_sec += cpu
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
                per_step.append(
                    StepSample(
                        timing.total, cpu, timing.diarizer, timing.asr, timing.overhead, now_bytes
                    )
                )
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
        cpu_sec=acc.cpu_sec + push_cpu_sec * acc.audio_sec / pushed_sec,
        diarizer_sec=acc.diarizer_sec,
        asr_sec=acc.asr_sec,
        overhead_sec=acc.overhead_sec,
        stream_steps=acc.stream_steps,
        instances=acc.instances,
        state_bytes=float(np.mean(list(state.values()))) if state else 0.0,
        peak_rss=peak_rss(),
        peak_gpu=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
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
    push_ms: float = 0.0,
    load_sec: float = 0.0,
    progress: Progress = _quiet,
) -> BenchReport:
    """Measure ``models`` with each number of concurrent ``calls``; see the module docstring.

    ``steps``: steps per run, the first of which is warm-up (None: every call to its end).
    ``push_ms``: push each call in pieces of this length, as records would bring it (0: whole).
    ``max_symbols`` changes the decoding of ``models`` for good (see ``set_max_symbols``).
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
    piece = round(push_ms * engine.sample_rate / 1000)

    progress("  warm-up: 1 call, 2 steps")
    _run(engine, all_calls[:1], 2, progress, "warmup", piece)

    results = []
    for n in sorted(set(calls)):
        # Each N's two runs back to back, so that both meet the same load on a shared machine.
        load = load_1m()
        progress(f"  {n} calls one at a time (load {load:.1f})")
        one_by_one = []
        for i, audio in enumerate(all_calls[:n]):
            one_by_one.append(_run(engine, [audio], steps, progress, f"seq{n}-{i}", piece))
            if n > 1:
                progress(f"    call {i + 1}/{n} done")
        progress(f"  {n} calls batched")
        _reset_peak_rss()
        fresh = StreamingEngine(models, config)
        batched = _run(fresh, all_calls[:n], steps, progress, f"b{n}", piece)
        results.append(CallsResult(n, batched, _combine(one_by_one), load))
        progress(
            f"    {batched.throughput:.2f} audio s/s, speed-up {results[-1].speedup:.2f}x "
            f"(CPU time: {results[-1].cpu_speedup:.2f}x), RTF/call {results[-1].per_call_rtf:.2f}"
        )

    growth = None
    if growth_sec > 0:
        progress(f"  growth check: {GROWTH_CALLS} calls of {growth_sec:.0f} s")
        growth = _growth(models, config, conversations, growth_sec, piece, progress)

    return BenchReport(
        size=size,
        device=_device_name(models.device),
        threads=torch.get_num_threads(),
        steps=steps,
        engine=config,
        max_symbols=int(models.asr.cfg.decoding.greedy.max_symbols),
        push_ms=push_ms,
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
    piece: int,
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
    per_step: list[StepSample] = []
    _run(engine, calls, None, progress, "long", piece, per_step)
    body = per_step[:-1]  # the last step runs a short final chunk
    # The diarizer's speaker cache and FIFO fill over the first ~30 s, and its cost with them.
    fill_sec = (config.spkcache_len + config.fifo_len) * engine.frame_sec
    first = math.ceil(fill_sec / engine.step_sec)  # measured steps start at the second chunk
    w = min(GROWTH_WINDOW, (len(body) - first) // 2)
    if w < 1:
        raise ValueError(
            f"growth check: {call_sec:g} s calls are too short, give at least "
            f"{fill_sec + 4 * engine.step_sec:.0f} s"
        )

    def fastest(rows: list[StepSample], state: float) -> StepSample:
        return StepSample(
            total=min(r.total for r in rows),
            cpu=min(r.cpu for r in rows),
            diarizer=min(r.diarizer for r in rows),
            asr=min(r.asr for r in rows),
            overhead=min(r.overhead for r in rows),
            state_bytes=state,
        )

    half = len(body) // 2
    return GrowthResult(
        calls=GROWTH_CALLS,
        call_sec=call_sec,
        steps=len(per_step),
        window=w,
        start_sec=(first + 1) * engine.step_sec,
        start=fastest(body[first : first + w], max(r.state_bytes for r in body[:half])),
        end=fastest(body[-w:], max(r.state_bytes for r in body[half:])),
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


# --------------------------------------------------------------------------------------------
# Reporting


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
    pushed = f"in {report.push_ms:g} ms pieces" if report.push_ms else "whole"
    lines = [
        f"### {report.size or 'models'}: {steps}, first step of each run not measured (warm-up)",
        "",
        f"Device {report.device}, {report.threads} torch threads; cache gating "
        f"{'on' if cfg.cache_gating else 'off'}, max speakers {cfg.max_speakers}, decoder max "
        f"symbols/frame {report.max_symbols}; calls pushed {pushed}. Models loaded in "
        f"{report.load_sec:.0f} s; RSS after loading {report.rss_after_load / 2**30:.2f} GiB.",
        "",
    ]
    cuda = report.device.startswith("cuda")
    rows = []
    for r in report.results:
        b = r.batched
        rows.append(
            [
                str(r.calls),
                str(b.steps),
                f"{b.instances_per_step:.1f} ({b.instances_per_stream:.1f})",
                f"{b.audio_sec:.1f}",
                f"{b.throughput:.2f}",
                f"{r.per_call_rtf:.2f}",
                f"{r.sequential.throughput:.2f}",
                f"{r.speedup:.2f}x",
                f"{b.cpu_throughput:.2f}",
                f"{r.cpu_speedup:.2f}x",
                f"{b.state_bytes / 1024:.0f}",
                f"{b.peak_rss / 2**30:.2f}",
                *([f"{b.peak_gpu / 2**30:.2f}"] if cuda else []),
                f"{r.load_1m:.1f}",
            ]
        )
    header = [
        "calls",
        "steps",
        "inst/step (/stream)",
        "audio s",
        "audio s/s",
        "RTF/call",
        "1-at-a-time audio s/s",
        "speed-up",
        "audio s/CPU s",
        "CPU speed-up",
        "state KiB/stream",
        "peak RSS GiB",
        *(["peak GPU GiB"] if cuda else []),
        "load",
    ]
    lines += [table(header, rows), ""]
    split = [_split_row(f"{r.calls} batched", r.batched) for r in report.results]
    split += [_split_row(f"{r.calls} one at a time", r.sequential) for r in report.results]
    header = ["run", "step ms", "diarizer ms (%)", "ASR ms (%)", "overhead ms (%)", "features ms"]
    lines += [table(header, split), ""]
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
        "inst/step: speaker instances per step (per call). audio s/CPU s and CPU speed-up: the "
        "same on this process's CPU time, which other processes' load barely changes. load: "
        "1-minute load average when the pair of runs started."
    )
    g = report.growth
    if g is not None:

        def row(label: str, x: StepSample) -> list[str]:
            times = (x.total, x.cpu, x.diarizer, x.asr)
            return [
                label,
                *(f"{t * 1e3:.0f}" for t in times),
                f"{x.overhead * 1e3:.1f}",
                f"{x.state_bytes / 1024:.0f}",
            ]

        lines += [
            "",
            f"Growth check: {g.calls} calls of {g.call_sec:.0f} s batched ({g.steps} steps). "
            f"Times: the fastest of {g.window} steps from {g.start_sec:.0f} s (the diarizer's "
            f"caches are full by then) and of the last {g.window}; state: the largest per "
            "stream in the first and in the second half of the calls.",
            "",
            table(
                [
                    "",
                    "step ms",
                    "step CPU ms",
                    "diarizer ms",
                    "ASR ms",
                    "overhead ms",
                    "state KiB/stream",
                ],
                [row(f"from {g.start_sec:.0f} s", g.start), row("end", g.end)],
            ),
        ]
    return "\n".join(lines)


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
        prog="python -m bench engine",
        description=(
            "Benchmark the streaming engine on random-weight models: throughput with N "
            "concurrent calls batched and one at a time, per-call real-time factor, the "
            "diarizer/ASR/overhead split of a step, state per stream, peak memory. Runs on "
            "CUDA when present, else on the CPU. Progress goes to stderr, the report to stdout."
        ),
        epilog=(
            "Defaults: tiny runs every call to its end and a 120 s growth check; real runs "
            "4 steps per run (1 warm-up + 3 measured) and no growth check. Real-size models "
            "are built once into the cache dir (~70 s, ~3 GB) and take 7-9 GB of RAM to load. "
            "On a busy machine with few cores, --threads 1 gives steadier numbers than two "
            "threads contending for two cores."
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
            "cap on the greedy decoder's tokens per encoder frame (default: the model's: 10 "
            "real, 1 tiny; random weights reach it at every frame, a trained model mostly "
            "emits blanks)"
        ),
    )
    parser.add_argument(
        "--push-ms",
        type=float,
        default=0.0,
        help=(
            "push each call in pieces of this many milliseconds, as input records would bring "
            "it, so the feature extraction per push is measured too (default: 0, whole calls)"
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

    load_before = load_line()
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
        measured = run_benchmark(
            models,
            args.calls,
            steps,
            size=size,
            config=config,
            growth_sec=growth,
            max_symbols=args.max_symbols,
            push_ms=args.push_ms,
            load_sec=load_sec,
            progress=progress,
        )
        reports.append(measured)
        print(format_report(measured), end="\n\n", flush=True)
        del models

    device = reports[0].device
    kind = "CUDA" if device.startswith("cuda") else "CPU"
    command = f"python -m bench engine {shlex.join(sys.argv[1:] if argv is None else argv)}"
    header = [
        f"- Device {device}, {reports[0].threads} torch threads.",
        *header_lines(command, load_before),
    ]
    print("\n".join(header))
    if args.markdown is not None:
        title = f"## Streaming engine ({kind}) — {started:%Y-%m-%d %H:%M} UTC"
        body = "\n\n".join(format_report(r) for r in reports)
        append_markdown(args.markdown, "\n".join([title, "", *header, "", body]))
        progress(f"appended to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
