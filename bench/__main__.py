"""``python -m bench engine|loop|host-cost …`` (each takes ``--help``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: python -m bench {engine,loop,host-cost} [options]

  engine     the streaming engine on random-weight models (python -m bench engine --help)
  loop       the Kafka loop with a pass-through engine (python -m bench loop --help)
  host-cost  the engine's host and feature time per call-step, lockstep calls, 20 ms pushes
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command, rest = (args[0], args[1:]) if args else ("", [])
    # Each benchmark is imported only when chosen: the engine's pulls in torch and NeMo.
    if command == "engine":
        from bench import engine

        return engine.main(rest)
    if command == "loop":
        from bench import loop

        return loop.main(rest)
    if command == "host-cost":
        from bench import host_cost

        return host_cost.main(rest)
    if command in {"-h", "--help"}:
        print(USAGE, end="")
        return 0
    print(USAGE, end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
