"""Metrics hooks that compute rather than count."""

from __future__ import annotations

import json

from worker.metrics import Metrics


def _stats(stable: dict[int, int]) -> str:
    partitions = {str(p): {"ls_offset": off} for p, off in stable.items()}
    partitions["-1"] = {"ls_offset": -1}
    return json.dumps({"topics": {"call-audio": {"partitions": partitions}}})


def _lag(metrics: Metrics) -> dict[str, float]:
    return {
        s.labels["partition"]: s.value
        for family in metrics.registry.collect()
        if family.name == "callscribe_consumer_lag_records"
        for s in family.samples
    }


def test_lag_is_stable_offset_minus_position_and_leaves_with_the_partition() -> None:
    metrics = Metrics()
    metrics.on_client_stats(_stats({0: 100, 1: 50}))
    metrics.on_positions({0: 40, 1: 60})
    assert _lag(metrics) == {"0": 60, "1": 0}
    metrics.on_positions({0: 90})  # partition 1 was revoked
    assert _lag(metrics) == {"0": 10}
    metrics.on_positions({})
    assert _lag(metrics) == {}


def test_restarts_show_as_a_process_start_time() -> None:
    names = {family.name for family in Metrics().registry.collect()}
    assert "callscribe_process_start_time_seconds" in names
