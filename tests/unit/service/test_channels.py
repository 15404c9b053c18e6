"""Channel modes: parsing, the lanes a call gets, and the fixed turn that merges them."""

from __future__ import annotations

import random

import pytest

from worker.config import ConfigError, WorkerConfig
from worker.engine.results import StreamUpdate
from worker.service.channels import ChannelMode, LanePlan, parse_mode, parse_roles, plan_lanes
from worker.service.streams import Lane, OpenStream


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("mix", (ChannelMode.MIX, None)),
        (" Split ", (ChannelMode.SPLIT, None)),
        ("channel:1", (ChannelMode.ONE, 1)),
    ],
)
def test_modes_parse(text: str, want: tuple) -> None:
    assert parse_mode(text) == want


@pytest.mark.parametrize("text", ["", "stereo", "channel", "channel:", "channel:-1", "channel:x"])
def test_bad_modes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="mix, split or channel:N"):
        parse_mode(text)


def test_config_validates_the_default_mode() -> None:
    assert WorkerConfig(channel_mode="channel:0").channel_mode == "channel:0"
    with pytest.raises(ConfigError, match="channel_mode"):
        WorkerConfig(channel_mode="both")


def test_roles_parse() -> None:
    assert parse_roles("agent, customer") == ("agent", "customer")
    assert parse_roles("") == ()
    assert parse_roles(",customer") == ("", "customer")


def test_lanes_by_mode() -> None:
    roles = "agent,customer"
    assert plan_lanes({}, 2, "mix", roles) == (LanePlan("", None, None),)
    assert plan_lanes({"channel_mode": "split"}, 2, "mix", roles) == (
        LanePlan("#0", 0, "agent"),
        LanePlan("#1", 1, "customer"),
    )
    assert plan_lanes({"channel_mode": "channel:1"}, 2, "mix", "") == (LanePlan("", 1, None),)
    # The call's metadata wins over the worker's settings, roles included.
    meta = {"channel_roles": "customer,agent"}
    assert plan_lanes(meta, 2, "channel:0", roles) == (LanePlan("", 0, "customer"),)
    # A mono call has one channel to hear, whatever the mode.
    assert plan_lanes({"channel_mode": "split"}, 1, "mix", roles) == (LanePlan("", None, None),)
    with pytest.raises(ValueError, match="2 channel"):
        plan_lanes({"channel_mode": "channel:2"}, 2, "mix", roles)


def _call(lanes: int) -> OpenStream:
    stream = OpenStream("call", 0, first_offset=0)
    stream.lanes = [Lane(f"k#{c}", None, c) for c in range(lanes)]
    return stream


def _updates(channel: int, steps: int) -> list[StreamUpdate]:
    return [StreamUpdate(f"k#{channel}:{i}", ended=i == steps - 1) for i in range(steps)]


@pytest.mark.parametrize("seed", range(20))
def test_lanes_merge_in_one_order_whatever_steps_they_came_in(seed: int) -> None:
    """The merged order is a function of each lane's own updates, not of their arrival."""
    rng = random.Random(seed)
    per_lane = {0: _updates(0, 5), 1: _updates(1, 3)}  # a lane may finish early (shorter)
    queues = {c: list(us) for c, us in per_lane.items()}
    stream = _call(2)
    merged = []
    while any(queues.values()):  # each lane's updates in its order, the lanes interleaved
        c = rng.choice([c for c in queues if queues[c]])
        stream.lanes[c].pending.append(queues[c].pop(0))
        merged += [u.stream_id for _, u in stream.merged()]
    assert merged == [
        "k#0:0", "k#1:0", "k#0:1", "k#1:1", "k#0:2", "k#1:2", "k#0:3", "k#0:4"
    ]  # fmt: skip
    assert all(lane.done for lane in stream.lanes)


def test_one_lane_merges_as_it_comes() -> None:
    stream = _call(1)
    for update in _updates(0, 3):
        stream.lanes[0].pending.append(update)
        assert [u for _, u in stream.merged()] == [update]
