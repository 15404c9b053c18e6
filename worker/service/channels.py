"""A call's channel mode: which of its audio channels the engine hears, and as whom.

Pure functions of the call's first chunk and the configuration, so a replay of the call makes
the same choice. Modes (``channel_mode`` in the first chunk's metadata, else the worker's
``channel_mode`` setting):

- ``mix``: the channels averaged to one stream (one engine stream per call; the default).
- ``split``: each channel its own engine stream (its own diarizer and speakers), the call's
  events merged into one transcript and tagged with the channel and its role. Twice the
  model work of ``mix`` for a stereo call.
- ``channel:N``: channel N alone, its events tagged with N and its role.

Roles come from ``channel_roles`` (comma-separated, channel 0 first, e.g. ``agent,customer``)
in the metadata, else the worker's setting; a channel without one has no role. A mono call
has only one channel to hear: every mode transcribes it as it is, untagged.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "MODE_KEY",
    "ROLES_KEY",
    "ChannelMode",
    "LanePlan",
    "parse_mode",
    "parse_roles",
    "plan_lanes",
]

MODE_KEY = "channel_mode"
ROLES_KEY = "channel_roles"


class ChannelMode(StrEnum):
    MIX = "mix"
    SPLIT = "split"
    ONE = "channel"  # written ``channel:N``


@dataclass(frozen=True)
class LanePlan:
    """One engine stream of a call: ``channel`` None hears the channels mixed."""

    suffix: str  # appended to the call's engine key ("" for a call's only stream)
    channel: int | None
    role: str | None


def parse_mode(text: str) -> tuple[ChannelMode, int | None]:
    """``mix`` | ``split`` | ``channel:N`` → (mode, N); ValueError with a reason otherwise."""
    value = text.strip().lower()
    if value in (ChannelMode.MIX, ChannelMode.SPLIT):
        return ChannelMode(value), None
    head, sep, tail = value.partition(":")
    if head == ChannelMode.ONE and sep and tail.isdigit():
        return ChannelMode.ONE, int(tail)
    raise ValueError(f"channel mode must be mix, split or channel:N, got {text!r}")


def parse_roles(text: str) -> tuple[str, ...]:
    """``agent,customer`` → ("agent", "customer"); an empty item is a channel with no role."""
    return tuple(item.strip() for item in text.split(",")) if text.strip() else ()


def plan_lanes(
    metadata: dict[str, str], channels: int, default_mode: str, default_roles: str
) -> tuple[LanePlan, ...]:
    """The engine streams of a call with ``channels`` channels; ValueError for a bad mode or a
    channel the call does not have."""
    mode, index = parse_mode(metadata.get(MODE_KEY, default_mode))
    roles = parse_roles(metadata.get(ROLES_KEY, default_roles))

    def role(channel: int) -> str | None:
        return roles[channel] or None if channel < len(roles) else None

    if channels == 1 or mode is ChannelMode.MIX:
        return (LanePlan("", None, None),)
    if mode is ChannelMode.ONE:
        if index is None or index >= channels:
            raise ValueError(f"channel:{index} selected but the call has {channels} channel(s)")
        return (LanePlan("", index, role(index)),)
    return tuple(LanePlan(f"#{c}", c, role(c)) for c in range(channels))
