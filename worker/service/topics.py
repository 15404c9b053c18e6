"""Create the worker's four topics with the settings the design needs."""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from worker.config import WorkerConfig

log = logging.getLogger(__name__)


def topic_specs(config: WorkerConfig, partitions: int, replication: int) -> list[NewTopic]:
    """Input and output share the partition count; progress is compacted (one record per
    open stream); the input keeps records long enough to replay the longest open stream. Its
    timestamps stay the producers' (CreateTime): audio a producer held back during a broker
    outage keeps the time it was captured, so the outage does not look like silence."""
    retention_ms = int((config.max_stream_sec + config.idle_timeout_sec) * 1000 * 2)
    return [
        NewTopic(
            config.input_topic,
            partitions,
            replication,
            config={"retention.ms": str(max(retention_ms, 24 * 3600 * 1000))},
        ),
        NewTopic(config.output_topic, partitions, replication),
        NewTopic(config.dead_letter_topic, 1, replication),
        NewTopic(
            config.progress_topic,
            partitions,
            replication,
            config={"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1"},
        ),
    ]


def create_topics(
    config: WorkerConfig, partitions: int = 4, replication: int = 1, timeout_s: float = 30.0
) -> list[str]:
    """Create the missing topics; returns the names created. Existing topics are left alone."""
    admin = AdminClient({"bootstrap.servers": config.bootstrap_servers})
    created = []
    for name, future in admin.create_topics(topic_specs(config, partitions, replication)).items():
        try:
            future.result(timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    deadline = time.monotonic() + timeout_s
    wanted = {
        config.input_topic,
        config.output_topic,
        config.dead_letter_topic,
        config.progress_topic,
    }
    while time.monotonic() < deadline:
        if wanted <= set(admin.list_topics(timeout=timeout_s).topics):
            return created
        time.sleep(0.1)
    raise TimeoutError(f"topics {sorted(wanted)} not visible after {timeout_s} s")
