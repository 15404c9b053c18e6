"""Per-stage timing of the engine's model work, from outside the engine.

The benchmark wraps NeMo's own entry points on the loaded model objects (instance attributes,
removed again by ``StageTimer.remove``), so it needs no timing code inside the engine and keeps
measuring the same four stages however the engine's own code changes:

* ``features``: the ASR preprocessor (log-mel), wherever the engine calls it (push or step);
* ``diarizer``: the diarizer's pre-encode, encoder and transformer (``encoder.pre_encode``,
  ``frontend_encoder``, ``forward_infer``), not its streaming-state update, which is bookkeeping;
* ``asr_encoder``: the ASR encoder's pre-encode and cache-aware streaming step;
* ``rnnt_decode``: the RNN-T decoding of the encoder output.

Intervals nest (a stage can call into another); each interval is charged its own time less that
of the intervals inside it, so nothing is counted twice. On CUDA the marks are CUDA events,
read after one synchronisation at the end of the step; elsewhere ``time.perf_counter`` (the CPU
runs torch synchronously). The clock is injectable so the arithmetic is tested without a model.

Thread rule: the timer is used by the thread that steps the engine, and only by it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

STAGES = ("features", "diarizer", "asr_encoder", "rnnt_decode")


class Clock:
    """Marks on the host clock; seconds between two marks."""

    def mark(self) -> Any:
        return time.perf_counter()

    def elapsed(self, start: Any, end: Any) -> float:
        return end - start

    def sync(self) -> None:
        pass


class CudaClock(Clock):
    """Marks as CUDA events on the current stream: the device's time between them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)


def clock_for(device: torch.device) -> Clock:
    return CudaClock(device) if device.type == "cuda" else Clock()


@dataclass
class _Interval:
    stage: str
    start: Any
    end: Any = None
    children: list[_Interval] = field(default_factory=list)


class StageTimer:
    """Collects stage intervals until ``collect`` sums them (seconds per stage) and resets."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._open: list[_Interval] = []
        self._done: list[_Interval] = []  # outermost intervals only
        self.calls: dict[str, int] = dict.fromkeys(STAGES, 0)
        self._undo: list[Callable[[], None]] = []
        self._hooks_open: list[Any] = []  # stage contexts opened by a module's pre-hook

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if name not in self.calls:
            raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")
        interval = _Interval(name, self.clock.mark())
        (self._open[-1].children if self._open else self._done).append(interval)
        self._open.append(interval)
        try:
            yield
        finally:
            interval.end = self.clock.mark()
            self._open.pop()
            self.calls[name] += 1

    def collect(self) -> dict[str, float]:
        """Seconds per stage since the last ``collect`` (synchronises the device first)."""
        if self._open:
            raise RuntimeError(f"stage {self._open[-1].stage!r} is still open")
        self.clock.sync()
        totals = dict.fromkeys(STAGES, 0.0)

        def charge(interval: _Interval) -> float:
            inclusive = self.clock.elapsed(interval.start, interval.end)
            inner = sum(charge(child) for child in interval.children)
            totals[interval.stage] += max(0.0, inclusive - inner)
            return inclusive

        for interval in self._done:
            charge(interval)
        self._done = []
        return totals

    def reset_counts(self) -> None:
        self.calls = dict.fromkeys(STAGES, 0)

    # -- wrapping the models -----------------------------------------------------------------

    def wrap(self, owner: Any, attribute: str, stage: str) -> None:
        """Time every call of ``owner.attribute`` as ``stage`` (until ``remove``)."""
        original = getattr(owner, attribute)
        if isinstance(original, torch.nn.Module):
            # A submodule is called through nn.Module.__call__: time that via its hooks.
            pre = original.register_forward_pre_hook(lambda *_: self._enter(stage))
            post = original.register_forward_hook(lambda *_: self._exit())
            self._undo += [pre.remove, post.remove]
            return

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(stage):
                return original(*args, **kwargs)

        had_own = attribute in vars(owner)
        object.__setattr__(owner, attribute, timed)

        def undo() -> None:
            if had_own:
                object.__setattr__(owner, attribute, original)
            else:
                object.__delattr__(owner, attribute)

        self._undo.append(undo)

    def _enter(self, stage: str) -> None:
        context = self.stage(stage)
        context.__enter__()
        self._hooks_open.append(context)

    def _exit(self) -> None:
        context = self._hooks_open.pop()
        context.__exit__(None, None, None)

    def remove(self) -> None:
        """Put every wrapped attribute back."""
        while self._undo:
            self._undo.pop()()


def find_preprocessor(engine: Any) -> torch.nn.Module:
    """The ASR preprocessor module the engine's feature extraction calls."""
    extractor = getattr(engine, "extractor", None)
    module = getattr(extractor, "module", None)
    if not isinstance(module, torch.nn.Module):
        raise RuntimeError(
            "cannot find the engine's feature preprocessor (engine.extractor.module); "
            "bench/stages.py must learn where the engine keeps it now"
        )
    return module


def instrument(timer: StageTimer, engine: Any) -> None:
    """Wrap the four stages of ``engine``'s models (call after the engine is built: building
    one can replace the ASR model's decoding object)."""
    diar, asr = engine.models.diarizer, engine.models.asr
    timer.wrap(find_preprocessor(engine), "forward", "features")
    timer.wrap(diar.encoder, "pre_encode", "diarizer")
    timer.wrap(diar, "frontend_encoder", "diarizer")
    timer.wrap(diar, "forward_infer", "diarizer")
    timer.wrap(asr.encoder, "pre_encode", "asr_encoder")
    timer.wrap(asr.encoder, "cache_aware_stream_step", "asr_encoder")
    timer.wrap(asr.decoding, "rnnt_decoder_predictions_tensor", "rnnt_decode")
