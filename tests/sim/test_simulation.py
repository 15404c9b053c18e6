"""Exactly once under faults, by deterministic simulation: a faulted run of the real workers and
engine (tiny models) commits what an uninterrupted run commits, for every seed.

``CALLSCRIBE_SIM_SEEDS`` sets how many seeds run here (default 300); ``python -m tests.sim``
runs thousands and writes a report.
"""

from __future__ import annotations

import os

import pytest

from tests.sim.harness import run_seed

SEEDS = int(os.environ.get("CALLSCRIBE_SIM_SEEDS", "300"))
SEEDS_PER_TEST = 25


@pytest.fixture(scope="module")
def clips():
    from producer_tools.conversation import default_conversations

    return [c.audio for c in default_conversations().values()]


@pytest.mark.parametrize("first", range(0, SEEDS, SEEDS_PER_TEST))
def test_faulted_runs_commit_what_uninterrupted_runs_commit(first, engine_factory, clips) -> None:
    violations: list[str] = []
    faults: dict[str, int] = {}
    for seed in range(first, min(first + SEEDS_PER_TEST, SEEDS)):
        found, faulted = run_seed(seed, engine_factory, clips)
        violations += found
        for kind, n in faulted.faults.items():
            faults[kind] = faults.get(kind, 0) + n
    assert sum(faults.values()) > 0, "no fault was injected: the test tested nothing"
    assert violations == [], "\n".join(violations)
