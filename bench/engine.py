"""Benchmark of the streaming engine: ``python -m bench engine`` (a benchmark, not a test).

For each number N of concurrent calls, one ``StreamingEngine`` on random-weight models of the
real classes (``worker.engine.models.build_random_models``) runs N live calls in *rounds*: a
round pushes the next chunk (1.12 s) of every call, in ``--push-ms`` pieces as input records
would bring it, then runs one engine step, which takes every call (the benchmark raises the
engine's per-step caps to N). The figures are those of the steady state:

* the calls are long (``--call-sec``, 60 s) and the first rounds are warm-up, not measured,
  until the diarizer's speaker cache and FIFO are full (``spkcache_len + fifo_len`` frames,
  30 s by default), since a step costs more once they are;
* a round's time is pushing the chunk of every call plus the step, synchronised on CUDA; its
  p50 and p95 over the measured rounds are ``step_ms_p50`` / ``step_ms_p95``; N calls keep up
  with real time when the p95 is at most the chunk's duration;
* per stage (``bench.stages``): the preprocessor (``features``, wherever the engine runs it),
  the diarizer forward, the ASR encoder forward and the RNN-T decoding, timed with CUDA events on
  CUDA; ``host`` is the rest of the round: the push path, the engine's bookkeeping (batching,
  the diarizer's streaming-state update, gating, speaker targets, transcript) and Python;
* memory: the peak device memory (CUDA: torch's allocator; CPU: the process's peak RSS) during
  the run above what it was before the calls were added, per call.

``--paced`` runs the measured rounds in real time (round k starts when its chunk would have
arrived) and stops at the first N that cannot keep up: the largest N before it is the number of
concurrent real-time calls. Without it the rounds run back to back, which measures the same
step times on an otherwise idle machine, sooner.

Unless ``--no-sequential``, one call is also run alone the same way: N calls one at a time would
take N times its round time per round, which gives the batching speed-up.

Call i is conversation ``i mod 4`` of ``producer_tools.conversation.default_conversations``
(espeak-ng; or the audio pre-rendered by ``make gpu-kit``, ``--audio``), repeated to the call's
length and started ``2.5 s × (i div 4)`` in, so that copies differ. Random weights make the greedy
decoder emit a token at almost every position up to ``max_symbols`` per frame (``--max-symbols``),
where a trained model mostly emits blanks: decoding costs more here than it will in service.

Thread rule: one Python thread pushes and steps the engine (the main one); torch's intra-op
threads are its own (``--threads``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import resource
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.report import append_markdown, header_lines, load_1m, load_line, table, utc_now
from bench.stages import STAGES, StageTimer, clock_for, instrument
from worker.engine.config import EngineConfig
from worker.engine.engine import StreamingEngine
from worker.engine.models import LoadedModels, build_random_models, load_models

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "callscribe" / "models"
DEFAULT_CALLS = (1, 4, 16)
DEFAULT_CALL_SEC = 60.0
DEFAULT_MEASURED_STEPS = 10
CALL_SHIFT_SEC = 2.5
LEAD_SEC = 0.1  # audio pushed beyond the chunk, so that the engine sees the chunk is not the last
PROGRESS_EVERY_SEC = 5.0
DTYPES = ("fp32", "bf16", "fp64")
MODEL_STAGES = ("diarizer", "asr_encoder", "rnnt_decode")

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


class BenchError(Exception):
    """A benchmark setting the engine or the run cannot honour; the message says which."""


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class RoundSample:
    """One measured round: its wall time split by stage (seconds)."""

    push_sec: float  # pushing the chunk of every call (features included where computed then)
    step_sec: float  # engine.step(), synchronised
    stages: dict[str, float]  # seconds per stage of bench.stages.STAGES, push and step together
    audio_sec: float  # audio the step consumed, all calls together
    lag_sec: float = 0.0  # paced: how late the round started after its chunk arrived

    @property
    def wall_sec(self) -> float:
        return self.push_sec + self.step_sec

    @property
    def host_sec(self) -> float:
        return self.wall_sec - sum(self.stages.values())


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else 0.0


@dataclass(frozen=True)
class CallsResult:
    """N concurrent calls in steady state."""

    calls: int
    rounds: tuple[RoundSample, ...]
    chunk_sec: float
    instances_per_call: float  # speaker instances per call per step, mean
    state_bytes_first: float  # engine.state_bytes per call at the first measured round
    state_bytes_last: float  # ... and at the last
    device_mem_bytes: int  # peak device memory above the start of the run
    paced: bool
    load_1m: float

    def _per_round(self, f: Callable[[RoundSample], float]) -> float:
        return sum(f(r) for r in self.rounds) / len(self.rounds)

    @property
    def step_ms_p50(self) -> float:
        return _pct([r.wall_sec for r in self.rounds], 50) * 1e3

    @property
    def step_ms_p95(self) -> float:
        return _pct([r.wall_sec for r in self.rounds], 95) * 1e3

    @property
    def engine_step_ms_p50(self) -> float:
        return _pct([r.step_sec for r in self.rounds], 50) * 1e3

    @property
    def stage_ms_per_step(self) -> dict[str, float]:
        out = {s: self._per_round(lambda r, s=s: r.stages[s]) * 1e3 for s in STAGES}
        out["host"] = self._per_round(lambda r: r.host_sec) * 1e3
        return out

    @property
    def wall_ms_per_step(self) -> float:
        return self._per_round(lambda r: r.wall_sec) * 1e3

    @property
    def host_ms_per_call_step(self) -> float:
        return self.stage_ms_per_step["host"] / self.calls

    @property
    def features_ms_per_call_step(self) -> float:
        return self.stage_ms_per_step["features"] / self.calls

    @property
    def model_ms_per_step(self) -> float:
        stages = self.stage_ms_per_step
        return sum(stages[s] for s in MODEL_STAGES)

    @property
    def throughput(self) -> float:
        """Audio seconds per wall second."""
        wall = sum(r.wall_sec for r in self.rounds)
        return sum(r.audio_sec for r in self.rounds) / wall if wall > 0 else 0.0

    @property
    def max_lag_ms(self) -> float:
        return max(r.lag_sec for r in self.rounds) * 1e3

    @property
    def realtime(self) -> bool:
        """p95 of a round within the chunk's duration (and, paced, no growing backlog)."""
        ok = self.step_ms_p95 <= self.chunk_sec * 1e3
        return ok and (not self.paced or self.max_lag_ms <= self.chunk_sec * 1e3)

    def as_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "step_ms_p50": self.step_ms_p50,
            "step_ms_p95": self.step_ms_p95,
            "host_ms_per_call_step": self.host_ms_per_call_step,
            "features_ms_per_call_step": self.features_ms_per_call_step,
            "model_ms_per_step": self.model_ms_per_step,
            "device_mem_mb_per_call": self.device_mem_bytes / 2**20 / self.calls,
            "engine_step_ms_p50": self.engine_step_ms_p50,
            "wall_ms_per_step": self.wall_ms_per_step,
            "stage_ms_per_step": self.stage_ms_per_step,
            "measured_steps": len(self.rounds),
            "audio_sec_per_sec": self.throughput,
            "instances_per_call": self.instances_per_call,
            "state_kib_per_call": [self.state_bytes_first / 1024, self.state_bytes_last / 1024],
            "realtime": self.realtime,
            "max_lag_ms": self.max_lag_ms,
            "load_1m": self.load_1m,
        }


@dataclass(frozen=True)
class BenchReport:
    """Everything one benchmark run measured."""

    size: str
    device: str
    dtype: str
    threads: int
    engine: EngineConfig
    max_symbols: int
    push_ms: float
    call_sec: float
    warmup_steps: int
    measured_steps: int
    paced: bool
    results: tuple[CallsResult, ...]
    alone: CallsResult | None = None  # one call by itself (the one-at-a-time baseline)
    stopped_at: int | None = None  # paced: the first N that did not keep up

    @property
    def chunk_ms(self) -> float:
        return self.results[0].chunk_sec * 1e3 if self.results else 0.0

    @property
    def max_realtime_calls(self) -> int | None:
        ok = [r.calls for r in self.results if r.realtime]
        return max(ok) if ok else None

    def speedup(self, result: CallsResult) -> float | None:
        if self.alone is None or self.alone.throughput <= 0:
            return None
        return result.throughput / self.alone.throughput

    def as_json(self, command: str = "") -> dict[str, Any]:
        return {
            "benchmark": "engine",
            "command": command,
            "size": self.size,
            "device": self.device,
            "dtype": self.dtype,
            "threads": self.threads,
            "push_ms": self.push_ms,
            "call_sec": self.call_sec,
            "chunk_ms": self.chunk_ms,
            "warmup_steps": self.warmup_steps,
            "measured_steps": self.measured_steps,
            "paced": self.paced,
            "max_symbols": self.max_symbols,
            "engine": dataclasses.asdict(self.engine),
            "results": [
                {**r.as_json(), "speedup_vs_one_at_a_time": self.speedup(r)} for r in self.results
            ],
            "one_call_alone": None if self.alone is None else self.alone.as_json(),
            "max_realtime_calls": self.max_realtime_calls,
            "paced_stopped_at": self.stopped_at,
        }


# --------------------------------------------------------------------------------------------
# Calls


class CallAudio:
    """N calls of any length from a few conversations, without holding N copies: call i is
    conversation ``i mod k`` repeated, starting ``shift_sec × (i div k)`` in."""

    def __init__(
        self, conversations: Sequence[np.ndarray], sample_rate: int, shift_sec: float
    ) -> None:
        if not conversations or min(len(c) for c in conversations) == 0:
            raise BenchError("no call audio: give at least one non-empty conversation")
        self._convs = [np.asarray(c, dtype=np.float32) for c in conversations]
        self._shift = round(shift_sec * sample_rate)

    def samples(self, call: int, start: int, count: int) -> np.ndarray:
        k = len(self._convs)
        audio = self._convs[call % k]
        first = start + (call // k) * self._shift
        return np.take(audio, np.arange(first, first + count), mode="wrap")


def default_call_audio(audio_dir: Path | None = None) -> list[np.ndarray]:
    """The four synthetic conversations, 16 kHz float32: read from ``audio_dir`` (``*.npy``,
    as ``make gpu-kit`` renders them) or made with espeak-ng."""
    if audio_dir is not None:
        files = sorted(audio_dir.glob("*.npy"))
        if not files:
            raise BenchError(f"no *.npy call audio in {audio_dir}")
        return [np.load(f).astype(np.float32, copy=False) for f in files]
    from producer_tools.conversation import default_conversations

    return [c.audio for c in default_conversations().values()]


# --------------------------------------------------------------------------------------------
# Measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class _DeviceMemory:
    """Peak device memory above a baseline: torch's allocator on CUDA, the peak RSS elsewhere
    (reset through /proc/self/clear_refs where Linux allows, else the peak since the start)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
            self.base = (_status_kib("VmRSS") or 0) * 1024

    def peak_above_base(self) -> int:
        if self.device.type == "cuda":
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)
        kib = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, kib * 1024 - self.base)


@dataclass(frozen=True)
class RunPlan:
    """How the calls of one measurement are fed and for how long."""

    call_sec: float = DEFAULT_CALL_SEC
    warmup_steps: int | None = None  # None: until the diarizer's caches are full
    measured_steps: int = DEFAULT_MEASURED_STEPS
    push_ms: float = 20.0  # 0: each round's chunk in one push
    paced: bool = False


def fill_steps(engine: StreamingEngine) -> int:
    """Steps after which the diarizer's speaker cache and FIFO are full (a step's cost grows
    until then), plus one."""
    cfg = engine.cfg
    fill_sec = (cfg.spkcache_len + cfg.fifo_len) * engine.frame_sec
    return math.ceil(fill_sec / engine.step_sec) + 1


def _engine_for(models: LoadedModels, config: EngineConfig, n: int) -> StreamingEngine:
    """An engine whose per-step caps let one step take all ``n`` calls."""
    config = dataclasses.replace(
        config,
        max_streams_per_step=max(config.max_streams_per_step, n),
        max_instances_per_step=max(config.max_instances_per_step, n * config.max_speakers),
    )
    return StreamingEngine(models, config)


def run_calls(
    models: LoadedModels,
    config: EngineConfig,
    n: int,
    audio: CallAudio,
    plan: RunPlan,
    progress: Progress = _quiet,
) -> CallsResult:
    """Run ``n`` concurrent calls as the module docstring says; measure the rounds after the
    warm-up."""
    device = models.device
    engine = _engine_for(models, config, n)
    warmup = fill_steps(engine) if plan.warmup_steps is None else plan.warmup_steps
    rounds = warmup + plan.measured_steps
    rate = engine.sample_rate
    step_samples = round(engine.step_sec * rate)
    need_sec = rounds * engine.step_sec + LEAD_SEC
    if plan.call_sec < need_sec:
        raise BenchError(
            f"calls of {plan.call_sec:g} s are too short for {warmup} warm-up and "
            f"{plan.measured_steps} measured steps of {engine.step_sec:g} s: give --call-sec "
            f"{math.ceil(need_sec)} or more"
        )
    call_samples = round(plan.call_sec * rate)
    piece = round(plan.push_ms * rate / 1000) or step_samples
    lead = math.ceil(LEAD_SEC * rate / piece) * piece

    timer = StageTimer(clock_for(device))
    instrument(timer, engine)
    ids = [f"call-{i}" for i in range(n)]
    cursor = [0] * n
    seq = [0] * n
    samples: list[RoundSample] = []
    instances = 0
    state_first = state_last = 0.0
    load = load_1m()
    try:
        _sync(device)
        memory = _DeviceMemory(device)
        for stream_id in ids:
            engine.add_stream(stream_id)
        started = last_report = time.perf_counter()
        paced_start = 0.0
        for k in range(rounds):
            measured = k >= warmup
            lag = 0.0
            if plan.paced and measured:
                if k == warmup:
                    paced_start = time.perf_counter()
                due = paced_start + (k - warmup) * engine.step_sec
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                lag = max(0.0, time.perf_counter() - due)
            target = min(call_samples, (k + 1) * step_samples + lead)
            timer.collect()  # drop anything timed outside the round
            t0 = time.perf_counter()
            for i, stream_id in enumerate(ids):
                while cursor[i] < target:
                    count = min(piece, target - cursor[i])
                    engine.push_audio(stream_id, audio.samples(i, cursor[i], count), seq[i])
                    cursor[i] += count
                    seq[i] += 1
            _sync(device)
            t1 = time.perf_counter()
            updates = engine.step()
            _sync(device)
            t2 = time.perf_counter()
            stages = timer.collect()
            failed = [u for u in updates if u.error is not None]
            if failed:
                u = failed[0]
                raise BenchError(f"stream {u.stream_id} failed: {u.error.message}")
            if len(updates) != n:
                raise BenchError(
                    f"a step ran {len(updates)} of {n} calls; the engine did not take them all"
                )
            if measured:
                audio_sec = sum(u.audio_sec for u in updates)
                samples.append(RoundSample(t1 - t0, t2 - t1, stages, audio_sec, lag))
                instances += engine.last_timing.instances
                state = sum(engine.state_bytes(s) for s in ids) / n
                state_first = state if k == warmup else state_first
                state_last = state
            now = time.perf_counter()
            if now - last_report >= PROGRESS_EVERY_SEC:
                phase = "measured" if measured else "warm-up"
                progress(f"    {n} calls: round {k + 1}/{rounds} ({phase}, {now - started:.0f} s)")
                last_report = now
        device_mem = memory.peak_above_base()
    finally:
        timer.remove()
        for stream_id in ids:
            engine.drop_stream(stream_id)
    return CallsResult(
        calls=n,
        rounds=tuple(samples),
        chunk_sec=engine.step_sec,
        instances_per_call=instances / (n * len(samples)),
        state_bytes_first=state_first,
        state_bytes_last=state_last,
        device_mem_bytes=device_mem,
        paced=plan.paced,
        load_1m=load,
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
    plan: RunPlan | None = None,
    *,
    size: str = "",
    dtype: str = "fp32",
    config: EngineConfig | None = None,
    conversations: Sequence[np.ndarray] | None = None,
    sequential: bool = True,
    max_symbols: int | None = None,
    progress: Progress = _quiet,
) -> BenchReport:
    """Measure ``models`` with each number of concurrent ``calls``; see the module docstring.

    ``max_symbols`` changes the decoding of ``models`` for good (see ``set_max_symbols``).
    """
    if not calls or min(calls) < 1:
        raise BenchError(f"calls must be positive numbers, got {list(calls)}")
    plan = plan or RunPlan()
    if plan.measured_steps < 1:
        raise BenchError(f"measured steps must be at least 1, got {plan.measured_steps}")
    config = config or EngineConfig()
    if max_symbols is not None:
        set_max_symbols(models, max_symbols)
    if conversations is None:
        conversations = default_call_audio()
    probe = StreamingEngine(models, config)
    audio = CallAudio(conversations, probe.sample_rate, CALL_SHIFT_SEC)
    warmup = fill_steps(probe) if plan.warmup_steps is None else plan.warmup_steps
    plan = dataclasses.replace(plan, warmup_steps=warmup)
    del probe

    alone = None
    if sequential:
        progress(f"  1 call alone ({warmup} warm-up + {plan.measured_steps} measured steps)")
        alone = run_calls(models, config, 1, audio, dataclasses.replace(plan, paced=False))
    results: list[CallsResult] = []
    stopped_at = None
    for n in sorted(set(calls)):
        progress(f"  {n} calls (load {load_1m():.1f})")
        result = run_calls(models, config, n, audio, plan, progress)
        results.append(result)
        progress(
            f"    step p50 {result.step_ms_p50:.0f} ms, p95 {result.step_ms_p95:.0f} ms "
            f"(chunk {result.chunk_sec * 1e3:.0f} ms); host {result.host_ms_per_call_step:.3f} "
            f"ms/call-step, features {result.features_ms_per_call_step:.3f} ms/call-step"
        )
        if plan.paced and not result.realtime:
            stopped_at = n
            progress(f"    {n} calls do not keep up with real time: stopping here")
            break

    return BenchReport(
        size=size,
        device=_device_name(models.device),
        dtype=dtype,
        threads=torch.get_num_threads(),
        engine=config,
        max_symbols=int(models.asr.cfg.decoding.greedy.max_symbols),
        push_ms=plan.push_ms,
        call_sec=plan.call_sec,
        warmup_steps=warmup,
        measured_steps=plan.measured_steps,
        paced=plan.paced,
        results=tuple(results),
        alone=alone,
        stopped_at=stopped_at,
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


# --------------------------------------------------------------------------------------------
# dtype


def engine_dtypes() -> tuple[str, ...]:
    """The dtypes this engine runs: all three once ``EngineConfig`` has its ``dtype`` field;
    before that fp32, and fp64 by loading the models with float64 as torch's default."""
    if "dtype" in {f.name for f in dataclasses.fields(EngineConfig)}:
        return DTYPES
    return ("fp32", "fp64")


def apply_dtype(dtype: str, config: EngineConfig) -> EngineConfig:
    """``config`` with ``dtype`` set, or torch's default dtype set for the float64 path. Call
    before loading the models. Raises ``BenchError`` for a dtype the engine lacks."""
    if dtype not in DTYPES:
        raise BenchError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if dtype not in engine_dtypes():
        raise BenchError(
            f"--dtype {dtype}: this engine has no dtype setting yet (EngineConfig has no 'dtype' "
            f"field); it runs {' and '.join(engine_dtypes())} only"
        )
    if "dtype" in {f.name for f in dataclasses.fields(EngineConfig)}:
        return dataclasses.replace(config, dtype=dtype)  # type: ignore[call-arg]
    torch.set_default_dtype(torch.float64 if dtype == "fp64" else torch.float32)
    return config


# --------------------------------------------------------------------------------------------
# Reporting


def format_report(report: BenchReport) -> str:
    """The report as markdown: a few lines and two tables."""
    cfg = report.engine
    pushed = f"{report.push_ms:g} ms pushes" if report.push_ms else "one push per chunk"
    mode = "paced in real time" if report.paced else "rounds back to back"
    lines = [
        f"### {report.size or 'models'}, {report.dtype}, {report.device}: calls of "
        f"{report.call_sec:g} s, {report.warmup_steps} warm-up + {report.measured_steps} "
        f"measured steps, {pushed}, {mode}",
        "",
        f"{report.threads} torch threads; cache gating {'on' if cfg.cache_gating else 'off'}, "
        f"max speakers {cfg.max_speakers}, decoder max symbols/frame {report.max_symbols}; "
        f"chunk {report.chunk_ms:.0f} ms.",
        "",
    ]
    rows = []
    for r in report.results:
        speedup = report.speedup(r)
        rows.append(
            [
                str(r.calls),
                f"{r.step_ms_p50:.1f}",
                f"{r.step_ms_p95:.1f}",
                "yes" if r.realtime else "no",
                f"{r.host_ms_per_call_step:.3f}",
                f"{r.features_ms_per_call_step:.3f}",
                f"{r.model_ms_per_step:.1f}",
                f"{r.device_mem_bytes / 2**20 / r.calls:.1f}",
                f"{r.instances_per_call:.1f}",
                f"{r.throughput:.2f}",
                "—" if speedup is None else f"{speedup:.2f}x",
                f"{r.load_1m:.1f}",
            ]
        )
    header = [
        "calls",
        "step ms p50",
        "p95",
        "real time",
        "host ms/call-step",
        "features ms/call-step",
        "model ms/step",
        "mem MiB/call",
        "inst/call",
        "audio s/s",
        "speed-up",
        "load",
    ]
    lines += [table(header, rows), ""]
    split_rows = []
    for r in report.results:
        stages = r.stage_ms_per_step
        split_rows.append(
            [
                str(r.calls),
                f"{r.wall_ms_per_step:.1f}",
                *(f"{stages[s]:.1f}" for s in (*STAGES, "host")),
            ]
        )
    split_header = ["calls", "round ms", *(f"{s} ms" for s in STAGES), "host ms"]
    lines += [table(split_header, split_rows), ""]
    best = report.max_realtime_calls
    verdict = f"up to N = {best}" if best is not None else "at no N measured"
    if report.stopped_at is not None:
        verdict += f" (stopped at N = {report.stopped_at}, which did not keep up)"
    lines.append(f"Real time (round p95 ≤ {report.chunk_ms:.0f} ms chunk): {verdict}.")
    if report.alone is not None:
        a = report.alone
        lines.append(
            f"One call alone: round p50 {a.step_ms_p50:.1f} ms, {a.throughput:.2f} audio s/s "
            "(the speed-up's baseline: N calls one at a time)."
        )
    lines.append(
        "A round pushes the next chunk of every call and runs one step; times are per measured "
        "round (means, except the percentiles). host: the round less the four model stages "
        "(push path, batching, the diarizer's state update, gating, transcript, Python). "
        "mem: peak device memory above the start of the run (CPU: peak RSS), per call. "
        "load: 1-minute load average at the start of the N's run."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line


def _calls(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,4,16, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench engine",
        description=(
            "Benchmark the streaming engine on random-weight models in steady state: per N "
            "concurrent calls, round (push + step) p50/p95, time per stage, host and feature "
            "time per call-step, device memory per call; optionally paced in real time. "
            "Progress goes to stderr, the report to stdout."
        ),
        epilog=(
            "Real-size models are built once into the cache dir (~70 s, ~3 GB). On a busy "
            "machine with few cores, --threads 1 gives steadier numbers."
        ),
    )
    parser.add_argument("--size", choices=("tiny", "real"), default="tiny", help="[tiny]")
    parser.add_argument(
        "--calls", type=_calls, default=DEFAULT_CALLS, help="numbers of concurrent calls [1,4,16]"
    )
    parser.add_argument(
        "--call-sec",
        type=_positive(float),
        default=DEFAULT_CALL_SEC,
        help="length of every call; at least the warm-up plus the measured steps [60]",
    )
    parser.add_argument(
        "--steps",
        type=_positive(int),
        default=DEFAULT_MEASURED_STEPS,
        help=f"measured steps per N, after the warm-up [{DEFAULT_MEASURED_STEPS}]",
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="unmeasured steps first [until the diarizer's speaker cache and FIFO are full]",
    )
    parser.add_argument(
        "--push-ms",
        type=float,
        default=20.0,
        help="push audio in pieces of this many ms, as input records bring it; 0: one push per "
        "chunk [20]",
    )
    parser.add_argument(
        "--paced",
        action="store_true",
        help="run the measured steps in real time and stop at the first N that falls behind",
    )
    parser.add_argument(
        "--no-sequential", action="store_true", help="skip the one-call-alone baseline run"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="the engine's compute dtype [fp32] (bf16 needs the engine's dtype setting)",
    )
    parser.add_argument(
        "--max-speakers", type=int, default=EngineConfig.max_speakers, help="1-4 [4]"
    )
    parser.add_argument(
        "--no-cache-gating", action="store_true", help="run every speaker instance every step"
    )
    parser.add_argument(
        "--max-symbols",
        type=int,
        default=None,
        help="the greedy decoder's tokens per encoder frame at most [the model's: 10 real, 1 tiny]",
    )
    parser.add_argument("--device", default=None, help="torch device [cuda if available, else cpu]")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="random models [%(default)s]"
    )
    parser.add_argument(
        "--audio", type=Path, default=None, help="a folder of pre-rendered call audio (*.npy)"
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write JSON here")
    parser.add_argument(
        "--markdown", type=Path, default=None, metavar="PATH", help="append the report here"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = f"python -m bench engine {shlex.join(argv)}".strip()

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = load_line()
    started = utc_now()
    try:
        config = EngineConfig(max_speakers=args.max_speakers, cache_gating=not args.no_cache_gating)
        config = apply_dtype(args.dtype, config)
        conversations = default_call_audio(args.audio)
        progress(f"[{args.size}] building or finding the models in {args.cache_dir}")
        diarizer, asr = build_random_models(args.size, args.cache_dir)
        t0 = time.perf_counter()
        models = load_models(str(diarizer), str(asr), args.device)
        progress(f"[{args.size}] loaded in {time.perf_counter() - t0:.0f} s on {models.device}")
        plan = RunPlan(
            call_sec=args.call_sec,
            warmup_steps=args.warmup_steps,
            measured_steps=args.steps,
            push_ms=args.push_ms,
            paced=args.paced,
        )
        report = run_benchmark(
            models,
            args.calls,
            plan,
            size=args.size,
            dtype=args.dtype,
            config=config,
            conversations=conversations,
            sequential=not args.no_sequential,
            max_symbols=args.max_symbols,
            progress=progress,
        )
    except BenchError as exc:
        print(f"python -m bench engine: {exc}", file=sys.stderr)
        return 2
    header = header_lines(command, load_before)
    text = format_report(report)
    print("\n".join([*header, "", text]), flush=True)
    if args.json is not None:
        from bench.report import write_json

        write_json(args.json, report.as_json(command))
        progress(f"wrote {args.json}")
    if args.markdown is not None:
        kind = "CUDA" if report.device.startswith("cuda") else "CPU"
        title = f"## Streaming engine ({kind}) — {started:%Y-%m-%d %H:%M} UTC"
        append_markdown(args.markdown, "\n".join([title, "", *header, "", text]))
        progress(f"appended to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
