"""Send many calls at once, each at the pace of a live call (or faster), and report progress.

One thread sends every call's chunks in order of their due time. A live chunk exists only once
its last sample has been captured, so chunk ``k`` of a call that starts ``start_s`` into the run
is due when its audio ends: ``(start_s + (k + 1) * chunk_s) / speed`` seconds after the run
begins. ``speed`` 1 is real time, 2 twice as fast, 0 as fast as Kafka takes them (starts still
keep their order).

Capture time: each chunk is stamped as a live chunk whose audio has just been captured, i.e.
``capture_time_ms`` (its first sample) = the wall-clock time it is sent minus its audio
duration. At ``speed`` 1 that is the call's start plus the audio before the chunk, as on a live
call, so the worker's latency figures are true. At any other speed the stamp follows the same
rule (send time minus audio duration) while the audio runs faster or slower than the wall
clock: the worker's latency and event wall-clock times then do not describe a live call.

The clocks (monotonic for the schedule, wall for the stamps) and the sleep are injected, so the
schedule is tested without waiting.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, TextIO

import numpy as np

from producer_tools.producer import AudioStream

DEFAULT_PROGRESS_SEC: Final = 5.0


@dataclass
class PacedCall:
    """A call to send: its open stream, its frames at the stream's rate, when it starts."""

    stream: AudioStream
    frames: np.ndarray  # (n_frames, channels) float32
    start_s: float = 0.0
    next_frame: int = field(default=0, init=False)

    @property
    def duration_s(self) -> float:
        return self.frames.shape[0] / self.stream.sample_rate

    def next_block(self) -> np.ndarray:
        return self.frames[self.next_frame : self.next_frame + self.stream.chunk_frames]

    def due_s(self) -> float:
        """Audio time at which the next chunk ends (it exists then), from the start of the run."""
        end = self.next_frame + self.next_block().shape[0]
        return self.start_s + end / self.stream.sample_rate


@dataclass(frozen=True)
class RunReport:
    """What a paced run achieved."""

    calls: int
    chunks: int
    audio_s: float
    wall_s: float
    max_concurrent: int

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.wall_s if self.wall_s > 0 else float("inf")

    @property
    def audio_per_wall(self) -> float:
        """Seconds of audio sent per second of wall time (1.0: one call in real time)."""
        return self.audio_s / self.wall_s if self.wall_s > 0 else float("inf")

    def summary(self) -> str:
        return (
            f"{self.calls} call(s), {self.chunks} chunks, {self.audio_s:.1f} s of audio in "
            f"{self.wall_s:.1f} s: {self.chunks_per_s:.1f} chunks/s, "
            f"{self.audio_per_wall:.2f} s of audio per second, "
            f"at most {self.max_concurrent} call(s) at once"
        )


def run_paced(
    calls: Sequence[PacedCall],
    *,
    speed: float = 1.0,
    progress: TextIO | None = None,
    progress_sec: float = DEFAULT_PROGRESS_SEC,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    wall: Callable[[], float] = time.time,
) -> RunReport:
    """Send every call to its end (``end_of_stream`` on its last chunk); flush; report."""
    if speed < 0:
        raise ValueError(f"speed must be 0 (as fast as possible) or more, got {speed}")
    started = clock()
    next_progress = started + progress_sec
    heap = [(call.due_s(), i) for i, call in enumerate(calls)]
    heapq.heapify(heap)
    chunks = 0
    open_calls: set[int] = set()
    max_concurrent = 0
    total_s = sum(c.duration_s for c in calls)
    while heap:
        due_s, i = heapq.heappop(heap)
        call = calls[i]
        if speed > 0:
            wait = started + due_s / speed - clock()
            if wait > 0:
                sleep(wait)
        open_calls.add(i)
        max_concurrent = max(max_concurrent, len(open_calls))
        stream = call.stream
        block = call.next_block()
        stream.anchor(round((wall() - block.shape[0] / stream.sample_rate) * 1000))
        call.next_frame += block.shape[0]
        chunks += 1
        if call.next_frame >= call.frames.shape[0]:
            stream.end(block)
            open_calls.discard(i)
        else:
            stream.write(block)
            heapq.heappush(heap, (call.due_s(), i))
        if progress is not None and clock() >= next_progress:
            sent_s = sum(c.next_frame / c.stream.sample_rate for c in calls)
            print(
                f"  {sent_s:.1f}/{total_s:.1f} s of audio sent ({100 * sent_s / total_s:.0f}%), "
                f"{len(open_calls)} call(s) open, {chunks} chunks",
                file=progress,
                flush=True,
            )
            next_progress = clock() + progress_sec
    for producer in {id(c.stream.producer): c.stream.producer for c in calls}.values():
        producer.flush()
    return RunReport(
        calls=len(calls),
        chunks=chunks,
        audio_s=total_s,
        wall_s=clock() - started,
        max_concurrent=max_concurrent,
    )
