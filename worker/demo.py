"""The main job, end to end on one machine: ``python -m worker demo`` (``make demo``).

Starts the local Kafka broker (deploy/kafka-local), creates fresh topics, starts a worker
process, streams synthetic multi-speaker conversations into the input topic at real-time pace,
prints the speaker-attributed transcript as it arrives, and shuts everything down.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from confluent_kafka import Producer

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_LOCAL = REPO_ROOT / "deploy" / "kafka-local"
READY_TIMEOUT_S = 600


def _say(text: str) -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_models_available(cache_dir: Path) -> bool:
    from worker.config import DEFAULT_ASR, DEFAULT_DIARIZER
    from worker.engine.models import ModelLoadError, load_models

    try:
        load_models(DEFAULT_DIARIZER, DEFAULT_ASR, cache_dir=cache_dir)
    except ModelLoadError as exc:
        _say(f"The NVIDIA models are not available here ({str(exc).splitlines()[0]}).")
        return False
    return True


def run_demo(keep_broker: bool = False, calls: int = 1) -> int:
    from producer_tools.conversation import default_conversations
    from producer_tools.stream import (
        CallAudio,
        format_event,
        interleave,
        publish,
        read_events,
        to_chunks,
    )
    from worker.config import WorkerConfig, to_flags
    from worker.service.topics import create_topics

    if not KAFKA_LOCAL.exists():
        _say(f"the demo needs {KAFKA_LOCAL.relative_to(REPO_ROOT)}: run it from a checkout")
        return 2
    data_dir = Path.home() / ".cache" / "callscribe" / "kafka" / "demo"
    _say("1/5 starting the local Kafka broker (the first run downloads Kafka from Maven Central)…")
    started = subprocess.run(
        [str(KAFKA_LOCAL), "start", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if started.returncode != 0:
        _say(f"could not start the broker:\n{started.stderr}")
        return 1
    bootstrap = started.stdout.strip()
    worker = None
    try:
        run_id = time.strftime("%Y%m%d-%H%M%S")
        config = WorkerConfig(
            bootstrap_servers=bootstrap,
            input_topic=f"demo-{run_id}-audio",
            output_topic=f"demo-{run_id}-transcripts",
            dead_letter_topic=f"demo-{run_id}-dead-letters",
            progress_topic=f"demo-{run_id}-progress",
            group_id=f"demo-{run_id}",
        )
        create_topics(config, partitions=2)
        _say(f"2/5 broker at {bootstrap}; topics {config.input_topic} → {config.output_topic}")

        _say("3/5 choosing models…")
        model_args: list[str] = []
        if _real_models_available(config.model_cache_dir):
            _say(
                "    using nvidia/diar_streaming_sortformer_4spk-v2.1 + "
                "nvidia/multitalker-parakeet-streaming-0.6b-v1"
            )
        else:
            _say(
                "    Using small RANDOM-WEIGHT models of the same NeMo classes instead: "
                "the pipeline is "
                "real, the words will be nonsense."
            )
            model_args = ["--random-models", "tiny"]
        port = free_port()
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker",
                "run",
                *to_flags(config),
                "--metrics-port",
                str(port),
                "--metrics-host",
                "127.0.0.1",
                "--log-level",
                "WARNING",
                "--idle-timeout-sec",
                "15",
                *model_args,
            ],
        )
        _say(
            f"4/5 starting the worker (pid {worker.pid}; metrics on http://127.0.0.1:{port}/metrics)…"
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if worker.poll() is not None:
                _say(f"the worker exited with {worker.returncode} before it was ready")
                return 1
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                _say("the worker did not become ready in time")
                return 1
            time.sleep(1)

        convs = list(default_conversations().items())[: max(1, calls)]
        streams = [
            to_chunks(CallAudio(f"call-{i + 1}-{name}", c.audio), chunk_ms=200)
            for i, (name, c) in enumerate(convs)
        ]
        ids = {chunks[0].stream_id for chunks in streams}
        seconds = max(len(c.audio) for _, c in convs) / 16000
        _say(f"5/5 streaming {len(ids)} call(s) of up to {seconds:.0f} s in real time; transcript:")
        producer = Producer({"bootstrap.servers": bootstrap})
        sender = threading.Thread(
            target=publish,
            args=(producer, config.input_topic, interleave(streams)),
            kwargs={"realtime": True},
            daemon=True,
        )
        sender.start()
        for event in read_events(
            bootstrap, config.output_topic, until_stream_ends=ids, timeout_s=120
        ):
            if event.kind != "PARTIAL":
                _say("    " + format_event(event, max_text=100))
        sender.join(5)
        del producer  # before the broker stops, so it does not log reconnection attempts
        _say("done: every call ended. Shutting down.")
        return 0
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
        if not keep_broker:
            subprocess.run(
                [str(KAFKA_LOCAL), "stop", "--data-dir", str(data_dir)],
                capture_output=True,
                check=False,
            )
