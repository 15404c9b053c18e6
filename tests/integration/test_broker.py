"""The local broker does what the worker relies on: per-key order and transactions.

Raw bytes only, so these tests hold the broker and its configuration to account
(replication factor 1 for the internal topics, transactions on one node) independently
of our codecs. Every loop is bounded by a deadline.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Callable

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)

pytestmark = pytest.mark.kafka

POLL_S = 0.5
DEADLINE_S = 30.0


def _consume(consumer: Consumer, stop: Callable[[list[Message]], bool]) -> list[Message]:
    """Polls until `stop(messages)` is true; fails the test at the deadline or on an error."""
    messages: list[Message] = []
    deadline = time.monotonic() + DEADLINE_S
    while not stop(messages):
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {DEADLINE_S} s with {len(messages)} messages")
        msg = consumer.poll(POLL_S)
        if msg is None:
            continue
        if msg.error() is not None:
            if msg.error().code() == KafkaError._PARTITION_EOF:
                messages.append(msg)  # the caller counts these to know it has read everything
                continue
            pytest.fail(f"consumer error: {msg.error()}")
        messages.append(msg)
    return messages


def _is_eof(msg: Message) -> bool:
    return msg.error() is not None and msg.error().code() == KafkaError._PARTITION_EOF


def test_keyed_messages_keep_per_key_order(kafka_bootstrap: str, new_topic) -> None:
    topic = new_topic(partitions=4)
    keys = [f"call-{k}".encode() for k in range(10)]
    sent: dict[bytes, list[bytes]] = defaultdict(list)
    delivered: dict[bytes, set[int]] = defaultdict(set)
    failures: list[str] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            failures.append(str(err))
        else:
            delivered[msg.key()].add(msg.partition())

    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "linger.ms": 5}
    )
    for i in range(200):
        key = keys[i % len(keys)]
        value = b"%s:%03d" % (key, len(sent[key]))
        sent[key].append(value)
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(10) == 0, "messages still in flight after 10 s"
    assert not failures
    assert all(len(parts) == 1 for parts in delivered.values()), "a key spans partitions"

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"order-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topic])
        messages = _consume(consumer, lambda got: len(got) >= 200)
        # The group coordinator works on one node: offsets commit and read back.
        consumer.commit(asynchronous=False)
        committed = consumer.committed([TopicPartition(topic, p) for p in range(4)], timeout=10)
    finally:
        consumer.close()

    received: dict[bytes, list[bytes]] = defaultdict(list)
    for msg in messages:
        received[msg.key()].append(msg.value())
    assert received == sent  # complete, no duplicates, and in order within each key
    assert len({p for parts in delivered.values() for p in parts}) > 1, "keys not spread"
    assert sum(tp.offset for tp in committed) == 200


def _read_to_end(bootstrap: str, topic: str, isolation: str) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"read-{uuid.uuid4().hex}",
            "isolation.level": isolation,
            "enable.partition.eof": True,
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        messages = _consume(consumer, lambda got: any(_is_eof(m) for m in got))
    finally:
        consumer.close()
    return [m.value() for m in messages if not _is_eof(m)]


def test_read_committed_skips_aborted_transaction(kafka_bootstrap: str, new_topic) -> None:
    topic = new_topic(partitions=1)
    producer = Producer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "transactional.id": f"test-tx-{uuid.uuid4().hex}",
            "transaction.timeout.ms": 10000,
        }
    )
    producer.init_transactions(15)

    def transaction(values: list[bytes], *, commit: bool) -> None:
        producer.begin_transaction()
        for value in values:
            producer.produce(topic, key=b"call", value=value)
        if commit:
            producer.commit_transaction(15)
        else:
            assert producer.flush(10) == 0  # the aborted records really reach the log
            producer.abort_transaction(15)

    first = [b"committed-1-%d" % i for i in range(5)]
    aborted = [b"aborted-%d" % i for i in range(5)]
    last = [b"committed-2-%d" % i for i in range(5)]
    transaction(first, commit=True)
    transaction(aborted, commit=False)
    transaction(last, commit=True)  # after the aborted one: a reader must skip, not stop

    assert _read_to_end(kafka_bootstrap, topic, "read_committed") == first + last
    assert _read_to_end(kafka_bootstrap, topic, "read_uncommitted") == first + aborted + last
