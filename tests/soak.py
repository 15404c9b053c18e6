"""``python -m tests.soak``: real worker processes against a real broker for a while, under
faults, then an audit of what a read_committed reader of the transcripts saw.

What runs: a broker of its own (``deploy/kafka-local`` on a fresh data dir), the four topics,
worker processes from the CLI (tiny random models), and a publisher keeping a number of calls
going at real-time pace: when a call ends another starts, until the publishing time is up
(a call started near the end is cut to end at most ``--min-call-sec`` after it).

Faults, from one seed: every 10–30 s a random worker is SIGKILLed or SIGTERMed and a
replacement started, half the time under the same instance id (a StatefulSet's restarted pod)
and otherwise a new one; once, mid-run, the broker is stopped for 20–60 s and started again on
the same port. While the broker is down only SIGKILL is used: a SIGTERM then cannot commit and
the worker's shutdown grace cuts it short with exit 1, by design. A worker that exits on its
own is a crash; it is replaced after a few seconds, as a pod would be.

The audit reads the whole committed output once every call has ended and the workers are
stopped: lost calls (no STREAM_END), FINAL and STREAM_END event ids committed twice, and for each
call FINAL segment indexes 0..n-1 without holes or repeats, exactly one STREAM_END, last, that
counts n segments and the call's whole length; with ``--reference`` (workers in float64) each
call's FINALs against the engine run on the call alone. Dead letters are counted (good input
should have none).

Exit status 0 only when no call was lost, duplicated or malformed, no reference differed, nothing
was dead-lettered, no worker crashed and every SIGTERM (with the broker up) exited 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from producer_tools.conversation import SAMPLE_RATE, default_conversations
from schemas import AudioChunk, AudioEncoding, DeadLetter, TranscriptEvent
from tests.cluster import (
    CommittedTail,
    LocalBroker,
    PacedPublisher,
    WorkerProcess,
    committed_output,
)
from worker.audio import encode_pcm
from worker.config import WorkerConfig, load_config
from worker.service.topics import create_topics

CHUNK_MS = 200
CHUNK_SAMPLES = SAMPLE_RATE * CHUNK_MS // 1000
FIRST_CALLS_SPREAD_S = 10.0  # the first calls start over this long, not all at once
NEXT_CALL_GAP_S = (0.0, 2.0)  # a new call starts this long after the one it replaces ended
CRASH_RESTART_DELAY_S = 5.0  # a crashed worker is replaced after this (a pod's back-off)
READY_TIMEOUT_S = 400
SIGTERM_WAIT_S = 60.0  # past the worker's shutdown grace (20 s)
OUTAGE_WINDOW = (0.3, 0.6)  # the broker goes down between these fractions of the run
REPORT_LIMIT = 50  # ids listed per finding in the report


@dataclass(frozen=True)
class Call:
    """One published call: ``samples`` samples of the audio loop from ``offset``."""

    stream_id: str
    offset: int
    samples: int
    start_ms: int  # capture time of its first chunk

    @property
    def chunks(self) -> int:
        return math.ceil(self.samples / CHUNK_SAMPLES)

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE

    def audio(self, loop: np.ndarray) -> np.ndarray:
        return np.take(loop, np.arange(self.offset, self.offset + self.samples), mode="wrap")


class CallSchedule:
    """Keeps ``concurrency`` calls going: chunks of every open call in capture-time order, made
    as they are needed (a call's audio is cut from a loop of the canned conversations). No new
    call starts after ``until_ms``."""

    def __init__(
        self,
        rng: random.Random,
        loop: np.ndarray,
        concurrency: int,
        call_sec: tuple[float, float],
        until_ms: int,
    ) -> None:
        self.rng = rng
        self.loop = loop
        self.concurrency = concurrency
        self.call_sec = call_sec
        self.until_ms = until_ms
        self.calls: dict[str, Call] = {}  # every call begun, by stream id

    def chunks(self, first_ms: int) -> Iterator[AudioChunk]:
        due: list[tuple[int, str, int]] = []  # (capture time, stream id, sequence)
        for _ in range(self.concurrency):
            self._begin(due, first_ms + round(self.rng.uniform(0, FIRST_CALLS_SPREAD_S) * 1000))
        while due:
            at_ms, sid, seq = heapq.heappop(due)
            call = self.calls[sid]
            last = seq == call.chunks - 1
            start = call.offset + seq * CHUNK_SAMPLES
            stop = call.offset + min(call.samples, (seq + 1) * CHUNK_SAMPLES)
            piece = np.take(self.loop, np.arange(start, stop), mode="wrap")
            yield AudioChunk(
                stream_id=sid,
                sequence=seq,
                encoding=AudioEncoding.PCM_S16LE,
                sample_rate_hz=SAMPLE_RATE,
                payload=encode_pcm(piece, AudioEncoding.PCM_S16LE),
                capture_time_ms=at_ms,
                end_of_stream=last,
            )
            if not last:
                heapq.heappush(due, (at_ms + CHUNK_MS, sid, seq + 1))
            elif at_ms < self.until_ms:
                gap = self.rng.uniform(*NEXT_CALL_GAP_S)
                self._begin(due, at_ms + CHUNK_MS + round(gap * 1000))

    def _begin(self, due: list[tuple[int, str, int]], start_ms: int) -> None:
        shortest, longest = self.call_sec
        left = (self.until_ms - start_ms) / 1000
        seconds = min(self.rng.uniform(shortest, longest), max(shortest, left))
        sid = f"call-{len(self.calls):05d}"
        call = Call(sid, self.rng.randrange(len(self.loop)), round(seconds * SAMPLE_RATE), start_ms)
        self.calls[sid] = call
        heapq.heappush(due, (start_ms, sid, 0))


@dataclass
class Exit:
    """One worker process's end and what caused it."""

    name: str
    instance_id: str
    cause: str  # "SIGKILL", "SIGTERM" (sent by the soak), "final SIGTERM", or "crash"
    code: int
    broker_up: bool
    at_s: float  # since publishing began
    ignored_sigterm: bool = False  # still running SIGTERM_WAIT_S after it: SIGKILLed


@dataclass
class Slot:
    """One place in the fleet (a pod): its current process and how many it has had."""

    index: int
    instance_id: str
    generation: int = 0
    process: WorkerProcess | None = None
    restart_at: float | None = None  # a crashed process's replacement is due


@dataclass
class Fleet:
    """The worker processes: started, killed, replaced and accounted for."""

    config: WorkerConfig
    log_dir: Path
    size: int
    started: float = field(default_factory=time.monotonic)
    slots: list[Slot] = field(default_factory=list)
    exits: list[Exit] = field(default_factory=list)
    kills: Counter[str] = field(default_factory=Counter)
    everyone: list[WorkerProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.slots = [Slot(i, f"w{i}-g0") for i in range(self.size)]
        for slot in self.slots:
            self._launch(slot)

    def _launch(self, slot: Slot) -> None:
        config = dataclasses.replace(self.config, instance_id=slot.instance_id)
        name = f"w{slot.index}-g{slot.generation}"
        slot.process = WorkerProcess(config, name, self.log_dir)
        slot.restart_at = None
        self.everyone.append(slot.process)

    def _record(
        self, slot: Slot, cause: str, code: int, broker_up: bool, ignored_sigterm: bool = False
    ) -> None:
        assert slot.process is not None
        at_s = round(time.monotonic() - self.started, 1)
        self.exits.append(
            Exit(slot.process.name, slot.instance_id, cause, code, broker_up, at_s, ignored_sigterm)
        )

    def _wait(self, process: WorkerProcess, timeout_s: float) -> tuple[int, bool]:
        """Its exit status, and whether it had to be SIGKILLed after ``timeout_s``."""
        try:
            return process.proc.wait(timeout_s), False
        except subprocess.TimeoutExpired:
            process.send(signal.SIGKILL)
            return process.proc.wait(30), True

    def wait_ready(self) -> None:
        for slot in self.slots:
            assert slot.process is not None
            slot.process.wait_ready(READY_TIMEOUT_S)

    def reap(self, broker_up: bool) -> list[Exit]:
        """Notice crashes (exits nobody asked for) and start their replacements when due."""
        crashes = []
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is None:
                continue
            code = slot.process.exit_code()
            if slot.restart_at is None and code is not None:
                self._record(slot, "crash", code, broker_up)
                crashes.append(self.exits[-1])
                slot.restart_at = now + CRASH_RESTART_DELAY_S
            if slot.restart_at is not None and now >= slot.restart_at:
                slot.generation += 1
                self._launch(slot)
        return crashes

    def running(self) -> int:
        return sum(1 for s in self.slots if s.process and s.process.exit_code() is None)

    def kill(self, rng: random.Random, broker_up: bool) -> str:
        """SIGKILL or SIGTERM a random running worker and start its replacement."""
        live = [s for s in self.slots if s.process and s.process.exit_code() is None]
        if not live:
            return "nobody to kill"
        slot = rng.choice(live)
        assert slot.process is not None
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM]) if broker_up else signal.SIGKILL
        reuse_id = rng.random() < 0.5
        slot.process.send(sig)
        code, hung = self._wait(slot.process, SIGTERM_WAIT_S)
        self.kills[sig.name] += 1
        self._record(slot, sig.name, code, broker_up, ignored_sigterm=hung)
        victim = slot.process.name
        slot.generation += 1
        if not reuse_id:
            slot.instance_id = f"w{slot.index}-g{slot.generation}"
        self._launch(slot)
        id_note = "same instance id" if reuse_id else "new instance id"
        return f"{sig.name} {victim} (exit {code}); replacement {slot.process.name}, {id_note}"

    def stop_all(self, broker_up: bool) -> None:
        """SIGTERM every running worker and wait for it."""
        for slot in self.slots:
            if slot.process is not None and slot.process.exit_code() is None:
                slot.process.send(signal.SIGTERM)
        for slot in self.slots:
            if slot.process is None or slot.restart_at is not None:
                continue  # crashed (recorded already) and not yet replaced
            code, hung = self._wait(slot.process, SIGTERM_WAIT_S)
            self._record(slot, "final SIGTERM", code, broker_up, ignored_sigterm=hung)

    def close(self) -> None:
        for process in self.everyone:
            process.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rng = random.Random(args.seed)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="callscribe-soak-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    _say(f"work dir {work} (worker logs in {work / 'logs'})")
    broker = LocalBroker(work / "kafka")
    broker.start()
    broker_up = True
    fleet: Fleet | None = None
    tail: CommittedTail | None = None
    publisher: PacedPublisher | None = None
    report: dict[str, Any] = {}
    try:
        config = _config(broker.bootstrap, args)
        create_topics(config, partitions=args.partitions)
        fleet = Fleet(config, work / "logs", args.workers)
        fleet.wait_ready()
        _say(f"broker {broker.bootstrap}, {args.workers} workers ready; publishing")
        tail = CommittedTail(broker.bootstrap, config.output_topic)
        started = fleet.started = time.monotonic()  # times in the report count from here
        publish_s = args.minutes * 60
        now_ms = int(time.time() * 1000)
        loop = np.concatenate([c.audio for c in default_conversations().values()])
        schedule = CallSchedule(
            random.Random(rng.random()),
            loop,
            args.calls,
            (args.min_call_sec, args.max_call_sec),
            until_ms=now_ms + round(publish_s * 1000),
        )
        publisher = PacedPublisher(
            broker.bootstrap, config.input_topic, schedule.chunks(now_ms + 1000)
        )
        outage = _Outage(
            at=started + rng.uniform(*OUTAGE_WINDOW) * publish_s,
            length=rng.uniform(args.outage_min_sec, args.outage_max_sec),
        )
        next_kill = started + rng.uniform(args.kill_min_sec, args.kill_max_sec)
        next_progress = started + args.progress_sec
        # Publishing, with faults.
        while True:
            now = time.monotonic()
            for crash in fleet.reap(broker_up):
                _say(f"CRASH: {crash.name} exited {crash.code} on its own")
            if not args.no_broker_restart:
                broker_up = outage.advance(now, broker)
            if now < started + publish_s and now >= next_kill:
                _say(fleet.kill(rng, broker_up))
                next_kill = time.monotonic() + rng.uniform(args.kill_min_sec, args.kill_max_sec)
            if now >= next_progress:
                _progress(started, schedule, publisher, tail, fleet, broker_up)
                next_progress += args.progress_sec
            if now >= started + publish_s and broker_up and outage.over(args.no_broker_restart):
                break
            tail.wait(1.0)
        # Calls still open run to their end; no new ones start. Then every call must end.
        _say("publishing time is up: waiting for every call's STREAM_END")
        drain_deadline = time.monotonic() + args.drain_timeout_sec
        while publisher.is_alive() or publisher.started() - tail.ended():
            for crash in fleet.reap(broker_up):
                _say(f"CRASH: {crash.name} exited {crash.code} on its own")
            if time.monotonic() > drain_deadline:
                _say(f"drain timeout after {args.drain_timeout_sec} s")
                publisher.stop()
                break
            if time.monotonic() >= next_progress:
                _progress(started, schedule, publisher, tail, fleet, broker_up)
                next_progress += args.progress_sec
            tail.wait(1.0)
        publisher_error = None
        try:
            publisher.join(120)
        except (RuntimeError, TimeoutError) as exc:
            publisher_error = str(exc)
        _say("stopping the workers (SIGTERM)")
        fleet.stop_all(broker_up)
        tail.stop()
        _say("reading the committed output")
        events = committed_output(broker.bootstrap, config.output_topic, timeout_s=300)
        dead = committed_output(
            broker.bootstrap, config.dead_letter_topic, timeout_s=120, record=DeadLetter
        )
        published = {sid: schedule.calls[sid] for sid in publisher.started()}
        report = _audit(events, published, fleet, outage, args.delivery)
        report["dead_letters"] = len(dead)
        report["dead_letter_reasons"] = dict(Counter(d.reason for d in dead))
        report["publisher_error"] = publisher_error
        if args.reference:
            _say(f"running the engine on each of {len(published)} calls for the reference")
            report["reference_mismatches"] = _reference_mismatches(config, events, published, loop)
        else:
            report["reference_mismatches"] = None
        report["seconds"] = round(time.monotonic() - started, 1)
    finally:
        if publisher is not None:
            publisher.stop()
        if tail is not None:
            tail.stop()
        if fleet is not None:
            fleet.close()
        broker.stop()
        if not args.keep_broker_data:
            shutil.rmtree(work / "kafka", ignore_errors=True)
    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "work_dir": str(work),
        **report,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    report["ok"] = _ok(report)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report["ok"] else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--minutes", type=float, default=30.0, help="how long to publish calls (default 30)")
    add("--calls", type=int, default=20, help="calls kept going at once (default 20)")
    add("--min-call-sec", type=float, default=60.0, help="shortest call (default 60)")
    add("--max-call-sec", type=float, default=300.0, help="longest call (default 300)")
    add("--workers", type=int, default=3, help="worker processes (default 3)")
    add("--partitions", type=int, default=6, help="partitions of the topics (default 6)")
    add(
        "--delivery",
        choices=["exactly_once", "at_least_once"],
        default="exactly_once",
        help="the workers' delivery mode; duplicates fail only exactly_once (default)",
    )
    add("--kill-min-sec", type=float, default=10.0, help="shortest time between kills (10)")
    add("--kill-max-sec", type=float, default=30.0, help="longest time between kills (30)")
    add("--outage-min-sec", type=float, default=20.0, help="shortest broker outage (20)")
    add("--outage-max-sec", type=float, default=60.0, help="longest broker outage (60)")
    add("--no-broker-restart", action="store_true", help="keep the broker up throughout")
    add(
        "--reference",
        action="store_true",
        help="run the workers in float64 and compare every call's FINALs with the engine run "
        "on the call alone (costs about a CPU second per 20-40 s of audio, after the run)",
    )
    add(
        "--drain-timeout-sec",
        type=float,
        default=900.0,
        help="hang guard: longest wait for the calls' STREAM_ENDs after publishing (900)",
    )
    add("--progress-sec", type=float, default=30.0, help="seconds between progress lines (30)")
    add("--seed", type=int, default=0, help="seed of the calls and the faults (default 0)")
    add("--work-dir", type=Path, help="broker data and worker logs (default: a new temp dir)")
    add("--keep-broker-data", action="store_true", help="keep the broker's data dir at the end")
    add("--json", type=Path, help="also write the report (printed on stdout) here")
    return parser


def _config(bootstrap: str, args: argparse.Namespace) -> WorkerConfig:
    run = uuid.uuid4().hex[:8]
    return load_config(
        environ={},
        overrides={
            "bootstrap_servers": bootstrap,
            "input_topic": f"soak-audio-{run}",
            "output_topic": f"soak-transcripts-{run}",
            "dead_letter_topic": f"soak-dead-{run}",
            "progress_topic": f"soak-progress-{run}",
            "group_id": f"soak-{run}",
            "delivery": args.delivery,
            "random_models": "tiny",
            "float64": args.reference,
        },
    )


@dataclass
class _Outage:
    """The one broker restart: down at ``at`` for ``length`` seconds."""

    at: float
    length: float
    stopped_at: float | None = None
    down_s: float | None = None
    refused: bool | None = None  # the port refused connections while it was down

    def advance(self, now: float, broker: LocalBroker) -> bool:
        """Stop or start the broker when due; whether it is up."""
        if self.stopped_at is None and now >= self.at:
            broker.stop()
            self.stopped_at = time.monotonic()
            self.refused = broker.refuses_connections()
            _say(f"BROKER DOWN for {self.length:.0f} s (port refused: {self.refused})")
        elif self.stopped_at is not None and self.down_s is None:
            if now < self.stopped_at + self.length:
                return False
            self.refused = self.refused and broker.refuses_connections()
            broker.start()
            self.down_s = round(time.monotonic() - self.stopped_at, 1)
            _say(f"BROKER UP again on {broker.bootstrap} after {self.down_s} s")
        return self.stopped_at is None or self.down_s is not None

    def over(self, skipped: bool) -> bool:
        return skipped or self.down_s is not None


def _progress(
    started: float,
    schedule: CallSchedule,
    publisher: PacedPublisher,
    tail: CommittedTail,
    fleet: Fleet,
    broker_up: bool,
) -> None:
    done = len(tail.ended())
    crashes = sum(1 for e in fleet.exits if e.cause == "crash")
    _say(
        f"{time.monotonic() - started:6.0f} s: calls begun {len(publisher.started())}, "
        f"done {done}; events {tail.events}; kills {sum(fleet.kills.values())} "
        f"({dict(fleet.kills)}); crashes {crashes}; workers up {fleet.running()}/{fleet.size}; "
        f"broker {'up' if broker_up else 'DOWN'}; load {os.getloadavg()[0]:.1f}"
    )


def _audit(
    events: list[TranscriptEvent],
    published: dict[str, Call],
    fleet: Fleet,
    outage: _Outage,
    delivery: str,
) -> dict[str, Any]:
    ids = Counter(e.event_id for e in events if e.kind != "PARTIAL")
    duplicated = sorted(i for i, n in ids.items() if n > 1)
    if delivery == "at_least_once":  # repeats are allowed: judge the first copy of each
        seen: set[str] = set()
        firsts = []
        for e in events:
            if e.event_id not in seen:
                seen.add(e.event_id)
                firsts.append(e)
        events = firsts
    by_call: dict[str, list[TranscriptEvent]] = defaultdict(list)
    for e in events:
        by_call[e.stream_id].append(e)
    lost = sorted(sid for sid in published if not any(e.kind == "STREAM_END" for e in by_call[sid]))
    malformed = {}
    for sid, call in sorted(published.items()):
        if sid not in lost and (problem := _call_problem(call, by_call[sid])):
            malformed[sid] = problem
    unknown = sorted(set(by_call) - set(published))
    crashes = [e for e in fleet.exits if e.cause == "crash"]
    unclean = [e for e in fleet.exits if "SIGTERM" in e.cause and e.broker_up and e.code != 0]
    return {
        "calls_published": len(published),
        "audio_seconds_published": round(sum(c.seconds for c in published.values()), 1),
        "calls_completed": len(published) - len(lost),
        "lost_calls": len(lost),
        "lost_call_ids": lost[:REPORT_LIMIT],
        "events": len(events),
        "duplicated_final_ids": len(duplicated),
        "duplicated_final_id_examples": duplicated[:REPORT_LIMIT],
        "malformed_calls": len(malformed),
        "malformed_call_examples": dict(list(malformed.items())[:REPORT_LIMIT]),
        "calls_never_published": unknown[:REPORT_LIMIT],
        "crash_loops": len([e for e in crashes if e.code != 0]),
        "unclean_sigterm_exits": len(unclean),
        "kills": dict(fleet.kills),
        "worker_exits": [dataclasses.asdict(e) for e in fleet.exits],
        "broker_restart": {
            "stopped_at_s": None
            if outage.stopped_at is None
            else round(outage.stopped_at - fleet.started, 1),
            "down_s": outage.down_s,
            "port_refused_while_down": outage.refused,
        },
    }


def _call_problem(call: Call, events: list[TranscriptEvent]) -> str:
    """What is wrong with one call's committed events (partition order), or ""."""
    ends = [i for i, e in enumerate(events) if e.kind == "STREAM_END"]
    if len(ends) != 1:
        return f"{len(ends)} STREAM_ENDs"
    if ends[0] != len(events) - 1:
        return f"{len(events) - 1 - ends[0]} events after STREAM_END"
    end = events[-1]
    indexes = sorted(e.segment_index for e in events if e.kind == "FINAL")
    if indexes != list(range(len(indexes))):
        repeats = [i for i, n in Counter(indexes).items() if n > 1]
        holes = sorted(set(range(max(indexes, default=-1) + 1)) - set(indexes))
        return f"FINAL segment indexes with repeats {repeats[:10]} and holes {holes[:10]}"
    if end.segment_index != len(indexes):
        return f"STREAM_END counts {end.segment_index} segments, {len(indexes)} FINALs committed"
    if abs(end.end_s - call.seconds) > 1e-3 or end.last_sequence != call.chunks - 1:
        return (
            f"ended at {end.end_s:.3f} s (sequence {end.last_sequence}), the call lasts "
            f"{call.seconds:.3f} s ({call.chunks} chunks)"
        )
    return ""


def _reference_mismatches(
    config: WorkerConfig,
    events: list[TranscriptEvent],
    published: dict[str, Call],
    loop: np.ndarray,
) -> list[str]:
    """Calls whose committed FINALs differ from the engine's on the call alone (float64)."""
    import torch

    from tests.integration.test_worker import _direct_finals
    from worker.engine.models import build_random_models, load_models

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    diarizer, asr = build_random_models("tiny", config.model_cache_dir)
    models = load_models(str(diarizer), str(asr), device="cpu")
    finals: dict[str, list[tuple]] = defaultdict(list)
    for e in events:
        if e.kind == "FINAL":
            key = (e.segment_index, e.speaker, e.text, round(e.start_s, 6), round(e.end_s, 6))
            finals[e.stream_id].append(key)
    longest = max((c.seconds for c in published.values()), default=0.0)
    # _direct_finals pushes a whole call before stepping; the buffer limit changes no output.
    engine = dataclasses.replace(config.engine, max_buffered_audio_sec=longest + 5.0)
    unbounded = dataclasses.replace(config, engine=engine)
    mismatched = []
    for sid, call in sorted(published.items()):
        expected = _direct_finals(models, unbounded, call.audio(loop))
        if sorted(finals[sid]) != sorted(expected):
            mismatched.append(sid)
    return mismatched


def _ok(report: dict[str, Any]) -> bool:
    return (
        report.get("calls_published", 0) > 0
        and report.get("lost_calls") == 0
        and (
            report.get("duplicated_final_ids") == 0
            or report["settings"]["delivery"] != "exactly_once"
        )
        and report.get("malformed_calls") == 0
        and not report.get("reference_mismatches")
        and report.get("crash_loops") == 0
        and report.get("unclean_sigterm_exits") == 0
        and report.get("dead_letters") == 0
        and not report.get("publisher_error")
    )


def _say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} soak: {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
