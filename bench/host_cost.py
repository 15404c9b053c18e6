"""Host cost of the engine per call-step, on the CPU with the tiny models (not a test).

``python -m bench host-cost [--streams 64 256] [--steps 3]``

N calls push 20 ms records in lockstep and are stepped together (one step per 1.12 s chunk, all
N streams in it), one torch thread. The model work is timed by wrapping NeMo's own entry points
(the preprocessor's forward, the diarizer's ``forward_streaming_step``, the ASR encoder's
``pre_encode`` and ``cache_aware_stream_step``, the RNN-T ``rnnt_decoder_predictions_tensor``);
everything else spent in ``push_audio``/``end_stream``/``step`` is host time. Prints, per N:
``host_ms_per_call_step`` and ``features_ms_per_call_step`` (the preprocessor's own time), as
wall and CPU time of the engine's thread, with the load average beside them: the machine is
shared, so compare figures taken at similar load (CPU time moves less with it). The first step
(first chunks, lazy set-up) is not measured.

Works against older engines too (run it with PYTHONPATH pointing at another checkout), which is
how before/after figures are taken.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

SAMPLE_RATE = 16000
PUSH = 320  # 20 ms


def now() -> tuple[float, float]:
    """Wall and CPU seconds of this thread (with one torch thread, the ops run on it: CPU time
    barely moves with the load of a shared machine, wall time does)."""
    return time.perf_counter(), time.thread_time()


class Clock:
    """Wall and CPU seconds spent inside wrapped callables, by name; only the outermost call
    counts."""

    def __init__(self) -> None:
        self.spent: dict[str, np.ndarray] = {}
        self._depth = 0
        self.enabled = False

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        inner: Callable = getattr(owner, attr)

        def timed(*args, **kwargs):
            if self._depth or not self.enabled:
                return inner(*args, **kwargs)
            self._depth += 1
            t0 = np.array(now())
            try:
                return inner(*args, **kwargs)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + np.array(now()) - t0
                self._depth -= 1

        setattr(owner, attr, timed)


def measure(models, audio: np.ndarray, n: int, steps: int) -> dict[str, float]:
    from worker.engine.config import EngineConfig
    from worker.engine.engine import StreamingEngine

    config = EngineConfig(max_streams_per_step=n, max_instances_per_step=4 * n)
    engine = StreamingEngine(models, config)
    clock = Clock()
    clock.wrap(engine.extractor.module, "forward", "features")
    clock.wrap(engine.diar, "forward_streaming_step", "diarizer")
    clock.wrap(engine.asr.encoder.pre_encode, "forward", "encoder")
    clock.wrap(engine.asr.encoder, "cache_aware_stream_step", "encoder")
    clock.wrap(engine.asr.decoding, "rnnt_decoder_predictions_tensor", "decoder")
    rng = np.random.default_rng(0)
    offsets = rng.integers(0, len(audio) - 10 * SAMPLE_RATE, size=n)
    ids = [f"call-{k}" for k in range(n)]
    for sid in ids:
        engine.add_stream(sid)
    chunk_samples = engine.layout.chunk_frames * engine.extractor.hop
    ticks = (steps + 1) * chunk_samples // PUSH + 2
    call_steps = 0
    engine_sec = np.zeros(2)
    for tick in range(ticks):
        t0 = np.array(now())
        for sid, off in zip(ids, offsets, strict=True):
            start = off + tick * PUSH
            engine.push_audio(sid, audio[start : start + PUSH], sequence=tick)
        while engine.ready_streams():
            engine.step()
            if not clock.enabled:  # the first step is warm-up
                clock.enabled = True
                t0 = np.array(now())
                continue
            call_steps += engine.last_timing.streams
        if clock.enabled:
            engine_sec += np.array(now()) - t0
    model = sum(clock.spent.values())
    features = clock.spent.get("features", np.zeros(2))
    # (wall, cpu) pairs in ms per call-step
    return {
        "calls": n,
        "call_steps": call_steps,
        "host_ms_per_call_step": 1e3 * (engine_sec - model) / call_steps,
        "features_ms_per_call_step": 1e3 * features / call_steps,
        "model_ms_per_call_step": 1e3 * (model - features) / call_steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench host-cost", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--streams", type=int, nargs="+", default=[64, 256], help="numbers of calls (64 256)"
    )
    parser.add_argument("--steps", type=int, default=3, help="measured steps per N (3)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from nemo.utils import logging as nemo_logging

    from producer_tools.conversation import default_conversations
    from worker.engine.models import build_random_models, load_models

    nemo_logging.set_verbosity(nemo_logging.ERROR)
    cache = Path.home() / ".cache" / "callscribe" / "models"
    diarizer, asr = build_random_models("tiny", cache)
    models = load_models(str(diarizer), str(asr), device="cpu")
    audio = np.concatenate([c.audio for c in default_conversations().values()] * 4)
    for n in args.streams:
        load_before = os.getloadavg()[0]
        row = measure(models, audio, n, args.steps)
        load_after = os.getloadavg()[0]
        host, feats, model = (
            row[k]
            for k in (
                "host_ms_per_call_step",
                "features_ms_per_call_step",
                "model_ms_per_call_step",
            )
        )
        print(
            f"N={n:4d}  ms per call-step, wall/cpu: host {host[0]:.3f}/{host[1]:.3f}  "
            f"features {feats[0]:.3f}/{feats[1]:.3f}  model {model[0]:.2f}/{model[1]:.2f}  "
            f"({row['call_steps']} call-steps; load {load_before:.2f} -> {load_after:.2f})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
