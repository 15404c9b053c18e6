"""bench.stages: nested intervals are charged once, with a clock the test controls."""

from __future__ import annotations

import pytest
import torch

from bench.stages import Clock, StageTimer


class FakeClock(Clock):
    """Time moves only when the test says."""

    def __init__(self) -> None:
        self.now = 0.0

    def mark(self) -> float:
        return self.now


def test_nested_stages_are_charged_their_own_time() -> None:
    clock = FakeClock()
    timer = StageTimer(clock)
    with timer.stage("diarizer"):
        clock.now += 1.0
        with timer.stage("features"):
            clock.now += 0.25
            with timer.stage("diarizer"):  # a stage may nest in itself: counted once
                clock.now += 0.5
        clock.now += 2.0
    clock.now += 10.0  # outside any stage: host time, not a stage's
    with timer.stage("rnnt_decode"):
        clock.now += 0.125
    totals = timer.collect()
    assert totals == {"features": 0.25, "diarizer": 3.5, "asr_encoder": 0.0, "rnnt_decode": 0.125}
    assert timer.calls["diarizer"] == 2
    assert timer.collect() == dict.fromkeys(totals, 0.0)  # collect resets


def test_unknown_stage_and_open_stage_are_errors() -> None:
    timer = StageTimer(FakeClock())
    with pytest.raises(ValueError, match="unknown stage"), timer.stage("nope"):
        pass
    with timer.stage("features"), pytest.raises(RuntimeError, match="still open"):
        timer.collect()


class _Owner:
    def work(self, x: int) -> int:
        return x + 1


def test_wrapping_a_method_and_a_module_times_them_and_remove_restores() -> None:
    clock = FakeClock()
    timer = StageTimer(clock)
    owner = _Owner()
    module = torch.nn.Identity()
    timer.wrap(owner, "work", "asr_encoder")
    timer.wrap(type("Holder", (), {"m": module})(), "m", "features")
    assert owner.work(1) == 2 and module(torch.ones(1)).item() == 1.0
    assert timer.calls["asr_encoder"] == 1 and timer.calls["features"] == 1
    timer.remove()
    assert "work" not in vars(owner)
    assert not module._forward_hooks and not module._forward_pre_hooks
    owner.work(1)
    assert timer.calls["asr_encoder"] == 1
