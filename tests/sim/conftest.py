"""Simulation fixtures: engines on the tiny float64 models, shared by the seeds and scenarios."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def engine_factory(fp64_models):
    """Makes engines on the tiny models, one torch thread (more only contend on a small
    machine)."""
    import torch

    from tests.sim.harness import sim_config
    from worker.engine.engine import StreamingEngine

    config = sim_config()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield lambda: StreamingEngine(fp64_models, config.engine)
    torch.set_num_threads(threads)
