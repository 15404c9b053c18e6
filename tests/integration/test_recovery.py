"""Crash safety: worker processes killed with SIGKILL mid-call, replacements joining (a
graceful cooperative rebalance for the survivor), and SIGTERM at the end. The committed output
must hold every event exactly once and every call's finals equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer

from producer_tools.stream import CallAudio, interleave, publish, read_events, to_chunks
from tests.integration.test_worker import _calls, _config, _direct_finals
from worker.config import to_flags
from worker.demo import free_port
from worker.service.topics import create_topics

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 400


class WorkerProcess:
    def __init__(self, config, name: str, log_dir: Path) -> None:
        self.port = free_port()
        self.name = name
        self.log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed in wait()
        cmd = [
            sys.executable,
            "-m",
            "worker",
            "run",
            *to_flags(config),
            "--random-models",
            "tiny",
            "--float64",
            "true",
            "--metrics-port",
            str(self.port),
            "--metrics-host",
            "127.0.0.1",
            "--transaction-interval-ms",
            "100",
            "--session-timeout-ms",
            "6000",
            "--transaction-timeout-ms",
            "10000",
            "--idle-timeout-sec",
            "120",
            "--log-level",
            "INFO",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env
        )

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.ready():
            assert self.proc.poll() is None, f"{self.name} exited: {self.tail()}"
            assert time.monotonic() < deadline, f"{self.name} not ready: {self.tail()}"
            time.sleep(0.5)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(90)

    def tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]


def test_kill_and_rebalance_keep_output_exactly_once(
    kafka_bootstrap, fp64_models, tmp_path
) -> None:
    config = _config(kafka_bootstrap, float64=True)
    create_topics(config, partitions=4)
    calls = _calls(6)
    workers = [WorkerProcess(config, "w1", tmp_path), WorkerProcess(config, "w2", tmp_path)]
    try:
        for w in workers:
            w.wait_ready()
        producer = Producer({"bootstrap.servers": config.bootstrap_servers})
        streams = [
            to_chunks(CallAudio(sid, audio), chunk_ms=200, start_ms=1_000_000)
            for sid, audio in calls.items()
        ]
        publish(producer, config.input_topic, interleave(streams))
        rng = np.random.default_rng(3)
        for round_ in range(2):  # kill one of the two, start a replacement, twice
            time.sleep(float(rng.uniform(4, 10)))
            victim = workers.pop(int(rng.integers(len(workers))))
            assert victim.proc.poll() is None, f"{victim.name} died on its own: {victim.tail()}"
            victim.kill()
            replacement = WorkerProcess(config, f"w{3 + round_}", tmp_path)
            workers.append(replacement)
            replacement.wait_ready()  # joining: a graceful cooperative rebalance for the other
        events = list(
            read_events(
                config.bootstrap_servers,
                config.output_topic,
                until_stream_ends=set(calls),
                timeout_s=300,
            )
        )
        for w in workers:
            assert w.terminate() == 0, f"{w.name} did not exit cleanly: {w.tail()}"
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
    logs = "".join(p.read_text() for p in tmp_path.glob("w*.log"))
    assert "rebuilding" in logs, "no kill landed mid-call: nothing was replayed"
    ids = Counter(e.event_id for e in events)
    assert [i for i, n in ids.items() if n > 1] == [], "events committed more than once"
    ends = Counter(e.stream_id for e in events if e.kind == "STREAM_END")
    assert ends == {sid: 1 for sid in calls}
    finals: dict[str, list] = defaultdict(list)
    for e in events:
        if e.kind == "FINAL":
            finals[e.stream_id].append(
                (e.segment_index, e.speaker, e.text, round(e.start_s, 6), round(e.end_s, 6))
            )
    for sid, audio in calls.items():
        assert sorted(finals[sid]) == sorted(_direct_finals(fp64_models, config, audio)), sid
