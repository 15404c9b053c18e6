"""Shared fixtures: a real Kafka broker, started lazily, and uniquely named topics.

The broker is `deploy/kafka-local` on a temporary data dir: it starts the first time a
test asks for `kafka_bootstrap` (so unit-only runs never start a JVM) and stops when the
session ends. Set KAFKA_BOOTSTRAP_SERVERS to use an already running broker instead.

Tests that use the broker are marked `kafka` automatically; deselect them with
`-m "not kafka"`. Without Java or Maven the broker cannot start: those tests are skipped
on a developer machine and fail under CI (env CI set), where a skip would hide a gap.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_LOCAL = REPO_ROOT / "deploy" / "kafka-local"

# A cold start downloads ~45 MB of jars first; a warm one takes about 10 s.
START_TIMEOUT_S = 600
TOPIC_READY_TIMEOUT_S = 15.0
MISSING_PREREQUISITE_EXIT = 2  # deploy/kafka-local's code for "no java / mvn"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kafka: needs the real Kafka broker (started by the session fixture)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "kafka_bootstrap" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kafka)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items:
        import torch  # only when a gpu test was collected: torch is slow to import

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
            for item in gpu_items:
                item.add_marker(skip)


def _kafka_local(command: str, data_dir: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    # Tests often share a busy machine: give the broker more than the script's 60 s.
    env = {"KAFKA_START_TIMEOUT": "120", **os.environ}
    return subprocess.run(
        [str(KAFKA_LOCAL), command, "--data-dir", str(data_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The broker's bootstrap address, "host:port"."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return

    data_dir = tmp_path_factory.mktemp("kafka")
    started = _kafka_local("start", data_dir, START_TIMEOUT_S)
    try:
        if started.returncode == MISSING_PREREQUISITE_EXIT and not os.environ.get("CI"):
            pytest.skip(f"local Kafka broker unavailable: {started.stderr.strip()}")
        if started.returncode != 0:
            pytest.fail(
                f"deploy/kafka-local start failed (exit {started.returncode}):\n{started.stderr}",
                pytrace=False,
            )
        yield started.stdout.strip()
    finally:
        stopped = _kafka_local("stop", data_dir, 60)
        if stopped.returncode != 0:
            print(f"deploy/kafka-local stop failed:\n{stopped.stderr}")


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": kafka_bootstrap})


def _topic_ready(admin: AdminClient, topic: str, partitions: int) -> bool:
    metadata = admin.list_topics(topic, timeout=5).topics.get(topic)
    if metadata is None or metadata.error is not None:
        return False
    parts = metadata.partitions.values()
    return len(parts) == partitions and all(p.leader >= 0 for p in parts)


@pytest.fixture
def new_topic(
    kafka_admin: AdminClient, request: pytest.FixtureRequest
) -> Iterator[Callable[..., str]]:
    """Factory: `new_topic(partitions=1, config=None)` creates a fresh topic, returns its name.

    Names carry the test's name and a uuid, so tests (and reruns against an external
    broker) never share a topic. The topics are deleted, best effort, after the test.
    """
    created: list[str] = []
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:80]

    def create(partitions: int = 1, config: dict[str, str] | None = None) -> str:
        name = f"{stem}-{uuid.uuid4().hex[:12]}"
        spec = NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})
        kafka_admin.create_topics([spec], operation_timeout=10)[name].result(timeout=15)
        created.append(name)
        deadline = time.monotonic() + TOPIC_READY_TIMEOUT_S
        while not _topic_ready(kafka_admin, name, partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name} has no leaders after {TOPIC_READY_TIMEOUT_S} s")
            time.sleep(0.05)
        return name

    yield create

    if created:
        for future in kafka_admin.delete_topics(created, operation_timeout=5).values():
            # Cleanup must not mask the test's own outcome.
            with contextlib.suppress(Exception):
                future.result(timeout=10)


@pytest.fixture(scope="session")
def tiny_model_paths() -> tuple[Path, Path]:
    """The small random-weight models of the real classes, built once and cached on disk
    (``CALLSCRIBE_MODEL_CACHE``, default ~/.cache/callscribe/models)."""
    from worker.engine.models import build_random_models

    cache = Path(os.environ.get("CALLSCRIBE_MODEL_CACHE", Path.home() / ".cache/callscribe/models"))
    return build_random_models("tiny", cache)


@pytest.fixture(scope="module")
def fp64_models(tiny_model_paths):
    """The tiny models loaded in float64, with float64 the default dtype for the module: exact
    comparisons then cannot flip on rounding differences of batched kernels."""
    import torch

    from worker.engine.models import load_models

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        diarizer, asr = tiny_model_paths
        yield load_models(str(diarizer), str(asr), device="cpu")
    finally:
        torch.set_default_dtype(previous)
