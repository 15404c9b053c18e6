"""Follow the transcript topic as a reader would: committed events only, decoded, rendered.

``follow`` yields the ``TranscriptEvent`` records a ``read_committed`` consumer sees (events of
aborted or still-open worker transactions never appear). Three renderers:

* ``JsonLines``: one JSON object per event (the record's Avro fields), for machines.
* ``PlainLines``: one line per FINAL (and per PARTIAL with ``partials``) and per call end.
* ``LiveView``: for a terminal. Finals scroll up, each speaker in its own colour; the partials
  of segments still open stay in a live region at the bottom, rewritten in place as revisions
  arrive, and replaced by their final line when it comes.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Final, TextIO

from confluent_kafka import Consumer, KafkaError

from schemas import CodecError, EventKind, TranscriptEvent, WireFormat, make_codec
from worker.config import WorkerConfig

POLL_SEC: Final = 0.2
CATCH_UP_TIMEOUT_SEC: Final = 120.0  # joining the group and reading to the end, at most
MAX_LIVE_LINES: Final = 20  # open partials shown at once; older ones wait off screen
_COLOURS: Final = ("\x1b[36m", "\x1b[33m", "\x1b[35m", "\x1b[32m", "\x1b[34m", "\x1b[31m")
_DIM: Final = "\x1b[2m"
_BOLD: Final = "\x1b[1m"
_RESET: Final = "\x1b[0m"


class TailError(Exception):
    """The transcript topic cannot be read (missing topic, broker error)."""


def follow(
    bootstrap_servers: str,
    topic: str,
    *,
    stream_id: str | None = None,
    from_beginning: bool = True,
    stop_at_stream_end: bool = False,
    idle_timeout_sec: float | None = None,
    schema_registry_url: str = "",
    wire_format: WireFormat = WireFormat.PLAIN,
    warn: TextIO = sys.stderr,
) -> Iterator[TranscriptEvent]:
    """Committed events of ``topic`` (only ``stream_id``'s, if given), in partition order.

    Stops after ``stream_id``'s STREAM_END with ``stop_at_stream_end``, or when no event came
    for ``idle_timeout_sec``; otherwise runs until the caller stops iterating. The idle clock
    starts only once the consumer has read to the end of every partition it was given: joining
    the group and fetching may take long on a loaded machine, and that is not the topic being
    quiet (``CATCH_UP_TIMEOUT_SEC`` bounds that wait). A record that does
    not decode is reported on ``warn`` and skipped.
    """
    if stop_at_stream_end and stream_id is None:
        raise ValueError("stop_at_stream_end needs a stream_id")
    codec = make_codec(
        TranscriptEvent,
        topic=topic,
        wire_format=wire_format,
        registry_url=schema_registry_url,
        schema_id=WorkerConfig().schema_id_transcript_event,  # the worker's id when hand-framed
    )
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"callscribe-tail-{time.time_ns()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest" if from_beginning else "latest",
            "enable.partition.eof": True,  # tells when the consumer has caught up
        }
    )
    assigned: set[int] = set()
    at_end: set[int] = set()

    def on_assign(_consumer: object, partitions: list) -> None:
        assigned.update(p.partition for p in partitions)

    def on_revoke(_consumer: object, partitions: list) -> None:
        assigned.difference_update(p.partition for p in partitions)

    try:
        metadata = consumer.list_topics(timeout=10)
        if topic not in metadata.topics:
            raise TailError(f"topic {topic!r} does not exist on {bootstrap_servers}")
        # A fresh group: auto.offset.reset picks the start.
        consumer.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)
        started = time.monotonic()
        last_event: float | None = None  # the idle clock: set once caught up
        while (
            idle_timeout_sec is None
            or last_event is None
            or time.monotonic() - last_event < idle_timeout_sec
        ):
            waiting = idle_timeout_sec is not None and last_event is None
            if waiting and time.monotonic() - started > CATCH_UP_TIMEOUT_SEC:
                raise TailError(
                    f"{topic}: not read to its end within {CATCH_UP_TIMEOUT_SEC:g} s "
                    "(no partitions assigned, or a broker that does not answer)"
                )
            msg = consumer.poll(POLL_SEC)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
                    if last_event is None and assigned and assigned <= at_end:
                        last_event = time.monotonic()  # caught up: quiet from now on counts
                    continue
                raise TailError(f"reading {topic}: {msg.error()}")
            at_end.discard(msg.partition())
            if stream_id is not None and msg.key() != stream_id.encode():
                continue
            try:
                event = codec.decode(msg.value())
            except CodecError as exc:
                print(
                    f"skipping record {msg.partition()}@{msg.offset()}: {exc.reason}: {exc}",
                    file=warn,
                )
                continue
            if last_event is not None:
                last_event = time.monotonic()
            yield event
            if stop_at_stream_end and event.kind is EventKind.STREAM_END:
                return
    finally:
        consumer.close()


def event_json(event: TranscriptEvent) -> str:
    """The event as one line of JSON: its Avro fields, words as objects."""
    return json.dumps(event.to_avro(), ensure_ascii=False, separators=(",", ":"))


class JsonLines:
    """One JSON object per event."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def show(self, event: TranscriptEvent) -> None:
        self.out.write(event_json(event) + "\n")
        self.out.flush()

    def close(self) -> None:
        pass


class PlainLines:
    """Finals and call ends, one line each (partials too with ``partials``)."""

    def __init__(self, out: TextIO, partials: bool = False) -> None:
        self.out = out
        self.partials = partials

    def show(self, event: TranscriptEvent) -> None:
        if event.kind is EventKind.PARTIAL and not self.partials:
            return
        self.out.write(format_line(event) + "\n")
        self.out.flush()

    def close(self) -> None:
        pass


class LiveView:
    """Finals scroll; open segments' latest partials are redrawn in place below them."""

    def __init__(self, out: TextIO, colour: bool = True) -> None:
        self.out = out
        self.colour = colour
        self.open: dict[tuple[str, int], TranscriptEvent] = {}
        self.drawn = 0  # lines of the live region now on screen
        self._speaker_colour: dict[tuple[str, str], str] = {}

    def show(self, event: TranscriptEvent) -> None:
        parts = []
        if self.drawn:  # back to the top of the live region, and erase it
            parts.append(f"\x1b[{self.drawn}F\x1b[J")
        key = (event.stream_id, event.segment_index)
        if event.kind is EventKind.PARTIAL:
            self.open[key] = event
        else:
            self.open.pop(key, None)
            if event.kind is EventKind.STREAM_END:
                for k in [k for k in self.open if k[0] == event.stream_id]:
                    del self.open[k]
            parts.append(self._line(event) + "\n")
        live = list(self.open.values())[-MAX_LIVE_LINES:]
        parts.extend(self._line(e) + "\n" for e in live)
        self.drawn = len(live)
        self.out.write("".join(parts))
        self.out.flush()

    def close(self) -> None:
        self.drawn = 0  # leave the last partials on screen

    def _line(self, event: TranscriptEvent) -> str:
        text = format_line(event)
        if not self.colour:
            return text
        if event.kind is EventKind.STREAM_END:
            return f"{_BOLD}{text}{_RESET}"
        colour = self._speaker_colour.setdefault(
            (event.stream_id, event.speaker or ""),
            _COLOURS[len(self._speaker_colour) % len(_COLOURS)],
        )
        dim = _DIM if event.kind is EventKind.PARTIAL else ""
        return f"{dim}{colour}{text}{_RESET}"


def format_line(event: TranscriptEvent) -> str:
    """One line a person can read."""
    if event.kind is EventKind.STREAM_END:
        length = f"{event.end_s:.1f} s, {event.segment_index} segments"
        return f"{event.stream_id}  ── call ended ({length})"
    mark = "…" if event.kind is EventKind.PARTIAL else " "
    text = " ".join(event.text.split())
    return (
        f"{event.stream_id}  [{event.start_s:7.2f}–{event.end_s:7.2f}] "
        f"{event.speaker or '?'}:{mark}{text}"
    )
