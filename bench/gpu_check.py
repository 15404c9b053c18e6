"""Correctness of the engine on a device against the CPU float64 reference (bench/gpu.sh).

The same calls run through the engine on the CPU in float64 (the golden tests' reference
precision) and on the device in each dtype asked for; per call and speaker, the tokens are
compared. Random weights leave many near-ties between tokens, which rounding flips, and a flip
changes the decoder's state after it, so the check is an agreement ratio (difflib's, over the
token sequences of every call and speaker) against a stated floor per dtype, not equality.
Exits 1 when a dtype falls below its floor, 2 when a dtype cannot run.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from bench.engine import BenchError, apply_dtype, default_call_audio
from worker.engine.config import EngineConfig
from worker.engine.engine import StreamingEngine
from worker.engine.models import build_random_models, load_models

FLOORS = {"fp32": 0.98, "bf16": 0.80}  # token agreement with CPU fp64, at least


def run_tokens(models, config: EngineConfig, calls: list[np.ndarray]) -> dict[str, list[int]]:
    """Every call through one engine, whole; tokens per ``call/speaker``."""
    engine = StreamingEngine(models, config)
    tokens: dict[str, list[int]] = {}
    record = engine._add_text  # the tokens each step adds, as the golden tests read them

    def spy(stream, spk, toks, frames, offset):
        tokens.setdefault(f"{stream.stream_id}/{spk}", []).extend(toks)
        return record(stream, spk, toks, frames, offset)

    engine._add_text = spy
    for i, audio in enumerate(calls):
        engine.add_stream(f"call{i}")
        engine.push_audio(f"call{i}", audio)
        engine.end_stream(f"call{i}")
    while engine.stream_ids:
        for update in engine.step():
            if update.error is not None:
                raise RuntimeError(f"{update.stream_id}: {update.error.message}")
    return tokens


def agreement(ref: dict[str, list[int]], got: dict[str, list[int]]) -> float:
    matched = total = 0
    for key in sorted(set(ref) | set(got)):
        a, b = ref.get(key, []), got.get(key, [])
        matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
        matched += sum(block.size for block in matcher.get_matching_blocks())
        total += max(len(a), len(b))
    return matched / total if total else 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--size", choices=("tiny", "real"), default="real")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="fp32,bf16", help="device dtypes to check")
    parser.add_argument("--calls", type=int, default=4, help="calls checked [4]")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/callscribe/models")
    parser.add_argument("--audio", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    calls = default_call_audio(args.audio)[: args.calls]
    diar, asr = build_random_models(args.size, args.cache_dir)
    say(f"check: reference, CPU fp64, {len(calls)} calls ({args.size})")
    torch.set_default_dtype(torch.float64)
    ref = run_tokens(load_models(str(diar), str(asr), "cpu"), EngineConfig(), calls)
    torch.set_default_dtype(torch.float32)
    results, code = {}, 0
    for dtype in [d for d in args.dtypes.split(",") if d]:
        try:
            config = apply_dtype(dtype, EngineConfig())
        except BenchError as exc:
            say(f"check: {dtype}: cannot run: {exc}")
            results[dtype] = {"error": str(exc)}
            code = max(code, 2)
            continue
        say(f"check: {args.device} {dtype}")
        got = run_tokens(load_models(str(diar), str(asr), args.device), config, calls)
        torch.set_default_dtype(torch.float32)
        ratio = agreement(ref, got)
        ok = ratio >= FLOORS[dtype] if dtype in FLOORS else ratio == 1.0
        results[dtype] = {
            "token_agreement": ratio,
            "floor": FLOORS.get(dtype, 1.0),
            "ok": ok,
            "tokens": sum(len(t) for t in got.values()),
        }
        say(
            f"check: {dtype}: token agreement {ratio:.4f} (floor {FLOORS.get(dtype, 1.0)}) "
            f"{'ok' if ok else 'FAILED'}"
        )
        code = max(code, 0 if ok else 1)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "size": args.size,
                    "device": args.device,
                    "reference_tokens": sum(len(t) for t in ref.values()),
                    "dtypes": results,
                },
                indent=2,
            )
            + "\n"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
