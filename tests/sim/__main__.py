"""``python -m tests.sim [--seeds N] [--first S] [--json PATH]``: many simulation seeds, with
progress, and a report of violations and faults injected."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__)
    parser.add_argument("--seeds", type=int, default=5000, help="how many seeds to run")
    parser.add_argument("--first", type=int, default=0, help="first seed")
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    import torch

    from producer_tools.conversation import default_conversations
    from tests.sim.harness import run_seed, sim_config
    from worker.engine.engine import StreamingEngine
    from worker.engine.models import build_random_models, load_models

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    diarizer, asr = build_random_models("tiny", Path.home() / ".cache/callscribe/models")
    models = load_models(str(diarizer), str(asr), device="cpu")
    config = sim_config()
    clips = [c.audio for c in default_conversations().values()]
    factory = lambda: StreamingEngine(models, config.engine)  # noqa: E731
    faults: Counter[str] = Counter()
    violations: list[str] = []
    started = time.monotonic()
    done, interrupted = 0, False
    for n, seed in enumerate(range(args.first, args.first + args.seeds), 1):
        try:
            found, faulted = run_seed(seed, factory, clips)
        except KeyboardInterrupt:  # Ctrl-C: report the seeds that ran
            interrupted = True
            break
        except Exception as exc:  # a harness or worker crash is a finding too: go on
            violations.append(f"seed {seed}: crashed: {type(exc).__name__}: {exc}")
            done = n
            continue
        done = n
        violations += found
        faults.update(faulted.faults)
        if n % 50 == 0 or n == args.seeds:
            rate = n / (time.monotonic() - started)
            print(
                f"{n}/{args.seeds} seeds, {len(violations)} violations, "
                f"{sum(faults.values())} faults, {rate:.1f} seeds/s",
                file=sys.stderr,
                flush=True,
            )
    report = {
        "seeds": done,
        "interrupted": interrupted,
        "first_seed": args.first,
        "violations": violations,
        "faults": dict(sorted(faults.items())),
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
