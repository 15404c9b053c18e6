"""Real processes for the tests that break them: a local broker that can be stopped and started
again on the same port and data dir, worker processes run from the CLI, a publisher that sends
calls at real-time pace and rides out a broker outage, a read_committed tail, and a full read of
the committed output.

Used by ``tests/integration/test_broker_restart.py`` and the soak (``python -m tests.soak``).
Thread rule: the publisher and the tail each own one Kafka client on their own thread; every
other method runs on the caller's thread.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    IsolationLevel,
    KafkaError,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec
from prometheus_client.parser import text_string_to_metric_families

from schemas import AudioChunk, RecordCodec, TranscriptEvent, WireFormat
from worker.config import CONNECTION_SETTINGS, WorkerConfig, to_flags
from worker.demo import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_LOCAL = REPO_ROOT / "deploy" / "kafka-local"
MISSING_PREREQUISITE_EXIT = 2  # deploy/kafka-local's code for "no java / mvn"
# Settings a worker process gets from the harness's config; the metrics port is its own.
WORKER_SETTINGS = (
    *CONNECTION_SETTINGS,
    "instance_id",
    "delivery",
    "random_models",
    "float64",
    "transaction_interval_ms",
    "transaction_timeout_ms",
    "session_timeout_ms",
    "idle_timeout_sec",
    "log_level",
)
# How the worker loop logs its partitions changing hands (worker/service/loop.py).
_PARTITIONS_LOG = re.compile(r"(assigned|revoked|lost) partitions \[([0-9, ]*)\]")
# Long enough for the publisher to keep a chunk queued through any outage a test makes.
PRODUCER_MESSAGE_TIMEOUT_MS = 300_000


class BrokerError(RuntimeError):
    """deploy/kafka-local failed; ``code`` is its exit status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class LocalBroker:
    """One ``deploy/kafka-local`` broker on its own data dir. Started again after a stop, it
    keeps its data and its port, so clients reconnect to the same address."""

    def __init__(self, data_dir: Path, start_timeout_s: int = 120) -> None:
        self.data_dir = data_dir
        self.start_timeout_s = start_timeout_s
        self.host = "127.0.0.1"
        self.port = 0  # picked by the first start

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def _run(self, command: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KAFKA_START_TIMEOUT": str(self.start_timeout_s)}
        env["KAFKA_PORT"] = str(self.port)  # 0 on the first start: a free one
        return subprocess.run(
            [str(KAFKA_LOCAL), command, "--data-dir", str(self.data_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def start(self) -> str:
        """Start (the first time: on a free port; later: on the same one); the bootstrap."""
        done = self._run("start", self.start_timeout_s + 600)  # a cold start fetches jars
        if done.returncode != 0:
            raise BrokerError(done.returncode, f"kafka-local start failed:\n{done.stderr}")
        host, port = done.stdout.strip().rsplit(":", 1)
        if self.port and int(port) != self.port:
            raise BrokerError(1, f"broker came back on {host}:{port}, not {self.bootstrap}")
        self.host, self.port = host, int(port)
        return self.bootstrap

    def stop(self) -> None:
        done = self._run("stop", 90)
        if done.returncode != 0:
            raise BrokerError(done.returncode, f"kafka-local stop failed:\n{done.stderr}")

    def refuses_connections(self) -> bool:
        """True when nothing listens on the broker's port (a connection is refused)."""
        try:
            socket.create_connection((self.host, self.port), timeout=2).close()
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
        return False


class WorkerProcess:
    """``python -m worker run`` with the harness's settings of ``config``, logging to a file."""

    def __init__(
        self, config: WorkerConfig, name: str, log_dir: Path, extra_flags: Sequence[str] = ()
    ) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        cmd = [
            sys.executable,
            "-m",
            "worker",
            "run",
            *to_flags(config, WORKER_SETTINGS),
            "--metrics-port",
            str(self.port),
            "--metrics-host",
            "127.0.0.1",
            *extra_flags,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        self.signalled: signal.Signals | None = None  # the last signal the harness sent

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exit_code(self) -> int | None:
        """None while it runs."""
        return self.proc.poll()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1):
                pass
        except OSError:
            return False
        return True

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.exit_code() is not None:
                raise RuntimeError(f"{self.name} exited {self.exit_code()}: {self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout_s} s: {self.tail()}")
            time.sleep(0.5)

    def owned_partitions(self) -> set[int]:
        """The input partitions it holds, as its log tells (assignments are incremental)."""
        owned: set[int] = set()
        for kind, ids in _PARTITIONS_LOG.findall(self.log_path.read_text(errors="replace")):
            changed = {int(i) for i in ids.split(",") if i.strip()}
            owned = owned | changed if kind == "assigned" else owned - changed
        return owned

    def active_streams(self) -> int:
        """The calls this worker holds now, from its metrics."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == "callscribe_active_streams":
                return int(family.samples[0].value)
        raise RuntimeError(f"{self.name}: no callscribe_active_streams in /metrics")

    def send(self, sig: signal.Signals) -> None:
        self.signalled = sig
        self.proc.send_signal(sig)

    def terminate(self, timeout_s: float = 90) -> int | None:
        """SIGTERM and the exit status; None if it still runs ``timeout_s`` later."""
        self.send(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Kill it if it still runs; close the log."""
        if self.proc.poll() is None:
            self.send(signal.SIGKILL)
            self.proc.wait(30)
        self._log.close()

    def tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]


class PacedPublisher:
    """Sends chunks on a thread when their capture time comes (as a live site would), with an
    idempotent producer that keeps every chunk queued through a broker outage. Knows which
    calls have started and which have had their last chunk handed to the producer."""

    def __init__(self, bootstrap: str, topic: str, chunks: Iterable[AudioChunk]) -> None:
        self._chunks = chunks
        self._topic = topic
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "message.timeout.ms": PRODUCER_MESSAGE_TIMEOUT_MS,
                "on_delivery": self._on_delivery,
            }
        )
        self._lock = threading.Lock()
        self._started: set[str] = set()
        self._ended: set[str] = set()
        self._stop = threading.Event()
        self.sent = 0
        self.delivery_errors: list[str] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def _on_delivery(self, err: KafkaError | None, _msg: object) -> None:
        if err is not None and len(self.delivery_errors) < 100:
            self.delivery_errors.append(str(err))

    def _run(self) -> None:
        codec = RecordCodec(AudioChunk, WireFormat.PLAIN)
        try:
            for chunk in self._chunks:
                delay = chunk.capture_time_ms / 1000 - time.time()
                if self._stop.wait(max(0.0, delay)):
                    break
                with self._lock:
                    self._started.add(chunk.stream_id)
                    if chunk.end_of_stream:  # marked first: a call not marked has not ended
                        self._ended.add(chunk.stream_id)
                key, value = chunk.stream_id.encode(), codec.encode(chunk)
                while True:
                    try:
                        self._producer.produce(self._topic, key=key, value=value)
                        break
                    except BufferError:
                        self._producer.poll(0.05)
                self._producer.poll(0)
                self.sent += 1
            # Every chunk either reaches the broker or fails after message.timeout.ms.
            while len(self._producer) > 0:
                self._producer.flush(1)
        except BaseException as exc:  # reported by join()
            self.error = exc

    def started(self) -> set[str]:
        """Calls whose first chunk was handed to the producer."""
        with self._lock:
            return set(self._started)

    def ended(self) -> set[str]:
        """Calls whose last chunk was handed to the producer."""
        with self._lock:
            return set(self._ended)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Send no more chunks (what is queued is still delivered)."""
        self._stop.set()

    def join(self, timeout_s: float) -> None:
        """Wait for every chunk to be delivered; raise if the thread failed or one was lost."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"publisher still running after {timeout_s} s")
        if self.error is not None:
            raise RuntimeError(f"publisher failed: {self.error!r}") from self.error
        if self.delivery_errors:
            raise RuntimeError(f"chunks not delivered: {self.delivery_errors[:5]}")


def _consumer(bootstrap: str, topic: str) -> tuple[Consumer, list[TopicPartition]]:
    """A read_committed consumer assigned every partition of ``topic`` from the beginning."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    partitions = sorted(admin.list_topics(topic, timeout=30).topics[topic].partitions)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"audit-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
        }
    )
    assigned = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions]
    consumer.assign(assigned)
    return consumer, assigned


class CommittedTail:
    """The output topic as a read_committed reader sees it live, on a thread: which calls have
    committed events and how many STREAM_ENDs each. Errors of a broker that is away (transport,
    all brokers down) are waited out, as any client would."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer, _ = _consumer(bootstrap, topic)
        self._codec = RecordCodec(TranscriptEvent, WireFormat.PLAIN)
        self._changed = threading.Condition()
        self._started: set[str] = set()
        self._ends: Counter[str] = Counter()
        self.events = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tail", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                msg = self._consumer.poll(0.2)
                if msg is None:
                    continue
                if msg.error():
                    if msg.error().fatal():
                        raise RuntimeError(f"tail: {msg.error()}")
                    continue  # partition EOF, or the broker is away: keep polling
                event = self._codec.decode(msg.value())
                with self._changed:
                    self.events += 1
                    self._started.add(event.stream_id)
                    if event.kind == "STREAM_END":
                        self._ends[event.stream_id] += 1
                    self._changed.notify_all()
        except BaseException as exc:  # reported by the accessors
            self.error = exc
        finally:
            self._consumer.close()
            with self._changed:
                self._changed.notify_all()

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"tail failed: {self.error!r}") from self.error

    def started(self) -> set[str]:
        """Calls with at least one committed event."""
        self._check()
        with self._changed:
            return set(self._started)

    def ended(self) -> set[str]:
        """Calls with a committed STREAM_END."""
        self._check()
        with self._changed:
            return set(self._ends)

    def wait(self, timeout_s: float) -> None:
        """Return on the next committed event, or after ``timeout_s`` to re-check other things."""
        with self._changed:
            self._changed.wait(timeout_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def committed_output(
    bootstrap: str, topic: str, timeout_s: float, record: type[Any] = TranscriptEvent
) -> list[Any]:
    """Every committed record of ``topic`` (``record``: its schema class) in partition order,
    read to the end once no transaction is open (a killed worker's open one holds
    read_committed readers back until the broker aborts it)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    partitions = sorted(admin.list_topics(topic, timeout=30).topics[topic].partitions)
    latest = admin.list_offsets(
        {TopicPartition(topic, p): OffsetSpec.latest() for p in partitions},
        isolation_level=IsolationLevel.READ_UNCOMMITTED,
    )
    ends = {tp.partition: future.result(timeout=30).offset for tp, future in latest.items()}
    consumer, assigned = _consumer(bootstrap, topic)
    codec = RecordCodec(record, WireFormat.PLAIN)
    events: list[Any] = []
    at_end = {p for p, end in ends.items() if end == 0}
    deadline = time.monotonic() + timeout_s
    try:
        while at_end != set(partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic} not read to {ends} in {timeout_s} s (at {at_end})")
            msg = consumer.poll(0.5)
            if msg is None:
                at_end |= {
                    tp.partition
                    for tp in consumer.position(assigned)
                    if tp.offset >= ends[tp.partition]
                }
            elif msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    raise RuntimeError(f"reading {topic}: {msg.error()}")
                if msg.offset() >= ends[msg.partition()]:
                    at_end.add(msg.partition())
            else:
                events.append(codec.decode(msg.value()))
    finally:
        consumer.close()
    return events
