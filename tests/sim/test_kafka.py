"""tests/sim/kafka.py: the Kafka semantics the worker's exactly-once guarantee leans on."""

from __future__ import annotations

import random
from typing import Any

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_INVALID,
    TIMESTAMP_CREATE_TIME,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from tests.sim.kafka import (
    SimBroker,
    SimClients,
    SimClock,
    SimConsumer,
    SimMessage,
    SimProducer,
    abortable,
    fatal,
    retriable,
    transient,
)

SESSION_S = 10.0
MAX_POLL_S = 60.0
TXN_TIMEOUT_S = 30.0


@pytest.fixture
def clock() -> SimClock:
    return SimClock(1000.0)


@pytest.fixture
def broker(clock: SimClock) -> SimBroker:
    broker = SimBroker(clock, random.Random(7))
    broker.create_topic("in", 4)
    broker.create_topic("out", 2)
    return broker


def txn_producer(broker: SimBroker, txn_id: str = "t1") -> SimProducer:
    producer = SimProducer(
        broker,
        {"transactional.id": txn_id, "transaction.timeout.ms": int(TXN_TIMEOUT_S * 1000)},
    )
    producer.init_transactions(5)
    producer.begin_transaction()
    return producer


def plain_producer(broker: SimBroker) -> SimProducer:
    return SimProducer(broker, {"enable.idempotence": True})


def reader(broker: SimBroker, isolation: str = "read_committed", **conf: Any) -> SimConsumer:
    return SimConsumer(
        broker,
        {"group.id": "reader", "isolation.level": isolation, "enable.auto.commit": False, **conf},
    )


def read(consumer: SimConsumer, topic: str, partition: int) -> list[tuple[int, bytes | None]]:
    """(offset, value) of every record the consumer returns for one partition, from the start."""
    consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
    out = []
    for _ in range(100):
        batch = consumer.consume(1000, 0)
        if not batch:
            return out
        out.extend((m.offset(), m.value()) for m in batch if m.error() is None)
    raise AssertionError("consumer never ran dry")


def error_codes(messages: list[SimMessage]) -> list[int]:
    return [m.error().code() for m in messages if m.error() is not None]


class Member:
    """A group member that logs its callbacks and (un)assigns explicitly, like the worker."""

    def __init__(
        self, broker: SimBroker, name: str, log: list[tuple[str, str, list[int]]], **conf: Any
    ) -> None:
        self.name, self.log = name, log
        self.consumer = SimConsumer(
            broker,
            {
                "group.id": "g",
                "client.id": name,
                "partition.assignment.strategy": "cooperative-sticky",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": int(SESSION_S * 1000),
                "max.poll.interval.ms": int(MAX_POLL_S * 1000),
                **conf,
            },
        )
        self.consumer.subscribe(
            ["in"], on_assign=self.on_assign, on_revoke=self.on_revoke, on_lost=self.on_lost
        )

    def on_assign(self, consumer: SimConsumer, partitions: list[TopicPartition]) -> None:
        self.log.append((self.name, "assign", [tp.partition for tp in partitions]))
        consumer.incremental_assign(partitions)

    def on_revoke(self, consumer: SimConsumer, partitions: list[TopicPartition]) -> None:
        self.log.append((self.name, "revoke", [tp.partition for tp in partitions]))
        consumer.incremental_unassign(partitions)

    def on_lost(self, consumer: SimConsumer, partitions: list[TopicPartition]) -> None:
        self.log.append((self.name, "lost", [tp.partition for tp in partitions]))
        consumer.incremental_unassign(partitions)

    def poll(self) -> list[SimMessage]:
        return self.consumer.consume(1000, 0)

    def owned(self) -> list[int]:
        return sorted(tp.partition for tp in self.consumer.assignment())


# -- the log -------------------------------------------------------------------------------------


def test_markers_take_offsets_so_data_offsets_have_gaps(broker: SimBroker) -> None:
    producer = txn_producer(broker)
    producer.produce("out", b"a", partition=0)
    producer.produce("out", b"b", partition=0)
    producer.commit_transaction(5)
    producer.begin_transaction()
    producer.produce("out", b"c", partition=0)
    producer.commit_transaction(5)

    assert [(r.offset, r.value) for r in broker.committed_records("out")] == [
        (0, b"a"),
        (1, b"b"),
        (3, b"c"),
    ]
    assert broker.watermarks("out", 0) == (0, 5, 5)  # two COMMIT markers, at 2 and 4
    assert read(reader(broker), "out", 0) == [(0, b"a"), (1, b"b"), (3, b"c")]


def test_read_committed_hides_open_and_aborted_records_and_stops_at_the_lso(
    broker: SimBroker,
) -> None:
    aborted = txn_producer(broker, "aborted")
    aborted.produce("out", b"x", partition=0)
    aborted.abort_transaction(5)
    plain = plain_producer(broker)
    plain.produce("out", b"p1", partition=0)
    open_txn = txn_producer(broker, "open")
    open_txn.produce("out", b"o", partition=0)
    plain.produce("out", b"p2", partition=0)

    low, lso, end = broker.watermarks("out", 0)
    assert (low, lso, end) == (0, 3, 5)  # x, ABORT marker, p1 | o (open), p2
    assert read(reader(broker), "out", 0) == [(2, b"p1")]
    assert read(reader(broker, "read_uncommitted"), "out", 0) == [
        (0, b"x"),
        (2, b"p1"),
        (3, b"o"),
        (4, b"p2"),
    ]
    assert [(r.offset, r.state) for r in broker.all_records("out")] == [
        (0, "aborted"),
        (2, "plain"),
        (3, "open"),
        (4, "plain"),
    ]

    open_txn.commit_transaction(5)
    assert read(reader(broker), "out", 0) == [(2, b"p1"), (3, b"o"), (4, b"p2")]


def test_watermark_end_is_the_lso_for_read_committed(broker: SimBroker) -> None:
    plain_producer(broker).produce("out", b"p", partition=1)
    txn_producer(broker).produce("out", b"o", partition=1)
    tp = TopicPartition("out", 1)
    assert reader(broker).get_watermark_offsets(tp, timeout=1) == (0, 1)
    assert reader(broker, "read_uncommitted").get_watermark_offsets(tp, timeout=1) == (0, 2)


def test_partition_eof_is_emitted_once_per_end_and_at_the_lso(broker: SimBroker) -> None:
    plain = plain_producer(broker)
    plain.produce("out", b"a", partition=0)
    consumer = reader(broker, **{"enable.partition.eof": True})
    consumer.assign([TopicPartition("out", 0, OFFSET_BEGINNING), TopicPartition("out", 1, 0)])

    first = consumer.consume(10, 0)
    assert sorted((m.partition(), m.offset(), m.error() is not None) for m in first) == [
        (0, 0, False),
        (0, 1, True),  # EOF at the end
        (1, 0, True),  # an empty partition is at its end at once
    ]
    assert error_codes(first) == [KafkaError._PARTITION_EOF] * 2
    assert consumer.consume(10, 0) == []  # no second EOF at the same end

    producer = txn_producer(broker)
    producer.produce("out", b"open", partition=0)
    plain.produce("out", b"b", partition=0)  # behind the open transaction
    assert consumer.consume(10, 0) == []  # the LSO has not moved: no new end, no EOF

    producer.commit_transaction(5)
    again = consumer.consume(10, 0)
    assert [(m.offset(), m.value()) for m in again if m.error() is None] == [
        (1, b"open"),
        (2, b"b"),
    ]
    assert [(m.offset(), m.error().code()) for m in again if m.error()] == [
        (4, KafkaError._PARTITION_EOF)
    ]


def test_deleted_records_reset_the_position_to_the_low_watermark(broker: SimBroker) -> None:
    plain = plain_producer(broker)
    for value in (b"a", b"b", b"c", b"d"):
        plain.produce("in", value, partition=2)
    consumer = reader(broker, **{"auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition("in", 2, 1)])
    broker.delete_records_before("in", 2, 3)
    assert [m.value() for m in consumer.consume(10, 0)] == [b"d"]
    assert consumer.get_watermark_offsets(TopicPartition("in", 2)) == (3, 4)


def test_keys_pick_a_stable_partition_and_timestamps_are_create_time(
    broker: SimBroker, clock: SimClock
) -> None:
    plain = plain_producer(broker)
    delivered: list[SimMessage] = []
    for value in (b"1", b"2", b"3"):
        plain.produce(
            "in", value, key=b"call-42", on_delivery=lambda err, msg: delivered.append(msg)
        )
    assert plain.flush(1) == 0
    assert len({m.partition() for m in delivered}) == 1
    assert [m.offset() for m in delivered] == [0, 1, 2]
    assert delivered[0].timestamp() == (TIMESTAMP_CREATE_TIME, int(clock.now() * 1000))


# -- transactions --------------------------------------------------------------------------------


def test_a_dropped_producer_stalls_the_lso_until_its_transaction_times_out(
    broker: SimBroker, clock: SimClock
) -> None:
    dead = txn_producer(broker, "dead")
    dead.produce("out", b"never", partition=0)
    del dead  # the process is killed: nobody commits or aborts
    plain_producer(broker).produce("out", b"after", partition=0)

    clock.advance(TXN_TIMEOUT_S - 1)
    assert broker.watermarks("out", 0)[1] == 0
    assert read(reader(broker), "out", 0) == []
    assert broker.open_transactions() == {"dead": 1000.0}

    clock.advance(1)
    assert broker.open_transactions() == {}
    assert broker.watermarks("out", 0) == (0, 3, 3)  # never, after, ABORT marker
    assert read(reader(broker), "out", 0) == [(1, b"after")]


def test_a_new_instance_aborts_the_open_transaction_and_fences_the_old_one(
    broker: SimBroker,
) -> None:
    old = txn_producer(broker, "w")
    old.produce("out", b"old-1", partition=0)
    new = txn_producer(broker, "w")  # init_transactions: aborts old's transaction
    assert broker.watermarks("out", 0) == (0, 2, 2)
    assert broker.committed_records("out") == []

    reports: list[KafkaError | None] = []
    old.produce("out", b"old-2", partition=0, on_delivery=lambda err, msg: reports.append(err))
    old.poll(0)
    assert [(e.code(), e.fatal()) for e in reports if e] == [(KafkaError._FENCED, True)]
    for call in (lambda: old.commit_transaction(5), lambda: old.abort_transaction(5)):
        with pytest.raises(KafkaException) as exc:
            call()
        assert exc.value.args[0].code() == KafkaError._FENCED
        assert exc.value.args[0].fatal()
    with pytest.raises(KafkaException) as exc:
        old.produce("out", b"old-3", partition=0)
    assert exc.value.args[0].code() == KafkaError._FATAL  # what confluent-kafka raises here

    new.produce("out", b"new", partition=0)
    new.commit_transaction(5)
    assert [r.value for r in broker.committed_records("out")] == [b"new"]


def test_transactional_offsets_are_committed_only_with_the_transaction(
    broker: SimBroker,
) -> None:
    log: list[tuple[str, str, list[int]]] = []
    member = Member(broker, "A", log)
    member.poll()
    meta = member.consumer.consumer_group_metadata()
    tp = TopicPartition("in", 1)

    producer = txn_producer(broker)
    producer.send_offsets_to_transaction([TopicPartition("in", 1, 7)], meta, 5)
    assert broker.committed_offset("g", "in", 1) is None
    with pytest.raises(KafkaException) as exc:
        member.consumer.committed([tp], timeout=1)  # read_committed: require_stable
    assert exc.value.args[0].code() == KafkaError._TIMED_OUT
    uncommitted = SimConsumer(broker, {"group.id": "g", "isolation.level": "read_uncommitted"})
    assert uncommitted.committed([tp])[0].offset == OFFSET_INVALID

    producer.abort_transaction(5)
    assert member.consumer.committed([tp])[0].offset == OFFSET_INVALID

    producer.begin_transaction()
    producer.send_offsets_to_transaction([TopicPartition("in", 1, 9)], meta, 5)
    producer.commit_transaction(5)
    assert member.consumer.committed([tp])[0].offset == 9
    assert broker.committed_offset("g", "in", 1) == 9


def test_a_partition_with_pending_offsets_is_not_fetched_from_its_committed_offset(
    broker: SimBroker,
) -> None:
    plain = plain_producer(broker)
    for value in (b"a", b"b", b"c"):
        plain.produce("in", value, partition=0)
    producer = txn_producer(broker)
    meta = SimConsumer(broker, {"group.id": "g"}).consumer_group_metadata()
    producer.send_offsets_to_transaction([TopicPartition("in", 0, 2)], meta, 5)

    consumer = SimConsumer(broker, {"group.id": "g", "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition("in", 0)])  # OFFSET_INVALID: start at the committed offset
    assert consumer.consume(10, 0) == []  # waits for the transaction to end
    producer.commit_transaction(5)
    assert [m.value() for m in consumer.consume(10, 0)] == [b"c"]


def test_a_timed_out_transaction_is_abortable_and_the_producer_goes_on(
    broker: SimBroker, clock: SimClock
) -> None:
    producer = txn_producer(broker)
    producer.produce("out", b"late", partition=0)
    clock.advance(TXN_TIMEOUT_S)
    assert broker.open_transactions() == {}  # the broker aborted it

    reports: list[KafkaError | None] = []
    producer.produce("out", b"rejected", partition=0, on_delivery=lambda e, m: reports.append(e))
    with pytest.raises(KafkaException) as exc:
        producer.commit_transaction(5)
    assert exc.value.args[0].txn_requires_abort()
    producer.poll(0)
    assert [e.code() for e in reports if e] == [KafkaError.INVALID_PRODUCER_EPOCH]
    with pytest.raises(KafkaException) as exc:
        producer.produce("out", b"refused", partition=0)
    assert exc.value.args[0].code() == KafkaError._STATE
    with pytest.raises(KafkaException) as exc:
        producer.send_offsets_to_transaction(
            [], SimConsumer(broker, {"group.id": "g"}).consumer_group_metadata(), 5
        )
    assert exc.value.args[0].txn_requires_abort()

    producer.abort_transaction(5)
    producer.begin_transaction()
    producer.produce("out", b"fresh", partition=0)
    producer.commit_transaction(5)
    assert [r.value for r in broker.committed_records("out")] == [b"fresh"]


def test_transactional_calls_in_the_wrong_state_raise_state_errors(broker: SimBroker) -> None:
    producer = SimProducer(broker, {"transactional.id": "t"})
    with pytest.raises(KafkaException) as exc:
        producer.begin_transaction()  # before init_transactions
    assert exc.value.args[0].code() == KafkaError._STATE
    producer.init_transactions(5)
    with pytest.raises(KafkaException) as exc:
        producer.produce("out", b"outside", partition=0)  # not in a transaction
    assert exc.value.args[0].code() == KafkaError._STATE
    with pytest.raises(KafkaException) as exc:
        plain_producer(broker).commit_transaction(5)
    assert exc.value.args[0].code() == KafkaError._NOT_CONFIGURED


# -- consumer groups ------------------------------------------------------------------------------


def test_cooperative_rebalance_revokes_before_it_assigns(broker: SimBroker) -> None:
    log: list[tuple[str, str, list[int]]] = []
    a = Member(broker, "A", log)
    a.poll()
    assert log == [("A", "assign", [0, 1, 2, 3])]
    generation = a.consumer.consumer_group_metadata().generation

    b = Member(broker, "B", log)
    b.poll()  # A still holds everything: nothing for B yet
    assert b.owned() == []
    a.poll()
    assert log[-1] == ("A", "revoke", [2, 3])
    assert a.owned() == [0, 1]
    b.poll()
    assert log[-1] == ("B", "assign", [2, 3])
    assert b.owned() == [2, 3]
    assert a.consumer.consumer_group_metadata().generation > generation
    assert (
        a.consumer.consumer_group_metadata().generation
        == b.consumer.consumer_group_metadata().generation
    )

    a.poll()
    b.poll()
    assert len(log) == 3  # stable: no more callbacks


def test_callbacks_that_do_not_assign_get_it_done_and_their_errors_propagate(
    broker: SimBroker,
) -> None:
    calls: list[list[int]] = []

    def on_assign(consumer: SimConsumer, partitions: list[TopicPartition]) -> None:
        calls.append([tp.partition for tp in partitions])
        raise RuntimeError("boom")

    consumer = SimConsumer(
        broker, {"group.id": "g", "partition.assignment.strategy": "cooperative-sticky"}
    )
    consumer.subscribe(["in"], on_assign=on_assign)
    with pytest.raises(RuntimeError, match="boom"):
        consumer.consume(10, 0)
    assert calls == [[0, 1, 2, 3]]
    assert sorted(tp.partition for tp in consumer.assignment()) == [0, 1, 2, 3]


def test_only_cooperative_sticky_is_modelled(broker: SimBroker) -> None:
    with pytest.raises(ValueError, match="cooperative-sticky"):
        SimConsumer(broker, {"group.id": "g"}).subscribe(["in"])


def test_session_timeout_evicts_a_dead_member_and_its_partitions_move_without_revoke(
    broker: SimBroker, clock: SimClock
) -> None:
    log: list[tuple[str, str, list[int]]] = []
    a, b = Member(broker, "A", log), Member(broker, "B", log)
    for _ in range(2):
        a.poll()
        b.poll()
    assert (a.owned(), b.owned()) == ([0, 1], [2, 3])
    old_id = a.consumer.memberid()

    broker.kill(a.consumer)
    clock.advance(SESSION_S - 1)
    b.poll()
    assert b.owned() == [2, 3]
    clock.advance(1)
    log.clear()
    b.poll()
    assert log == [("B", "assign", [0, 1])]
    assert b.owned() == [0, 1, 2, 3]

    a.poll()  # it was only frozen: it learns it lost them, and rejoins
    assert log[1] == ("A", "lost", [0, 1])
    assert a.owned() == []
    assert a.consumer.memberid() not in (None, old_id)
    b.poll()
    a.poll()
    assert (a.owned(), b.owned()) == ([2, 3], [0, 1])  # B keeps what it has, up to its share


def test_a_live_member_that_stops_polling_is_evicted_after_max_poll_interval(
    broker: SimBroker, clock: SimClock
) -> None:
    log: list[tuple[str, str, list[int]]] = []
    a, b = Member(broker, "A", log), Member(broker, "B", log)
    for _ in range(2):
        a.poll()
        b.poll()
    clock.advance(SESSION_S * 2)  # A is busy: heartbeats go on in the background
    b.poll()
    assert a.consumer.memberid() in broker.assignments("g")
    clock.advance(MAX_POLL_S - SESSION_S * 2)
    b.poll()
    assert b.owned() == [0, 1, 2, 3]

    messages = a.poll()
    assert KafkaError._MAX_POLL_EXCEEDED in error_codes(messages)
    assert ("A", "lost", [0, 1]) in log


def test_without_background_heartbeats_any_silence_past_the_session_evicts(
    clock: SimClock,
) -> None:
    broker = SimBroker(clock, random.Random(1), background_heartbeats=False)
    broker.create_topic("in", 2)
    log: list[tuple[str, str, list[int]]] = []
    a, b = Member(broker, "A", log), Member(broker, "B", log)
    for _ in range(2):
        a.poll()
        b.poll()
    clock.advance(SESSION_S)
    b.poll()
    assert b.owned() == [0, 1]


def test_a_lost_member_is_fenced_from_committing_offsets(broker: SimBroker) -> None:
    log: list[tuple[str, str, list[int]]] = []
    a = Member(broker, "A", log)
    a.poll()
    stale = a.consumer.consumer_group_metadata()
    producer = txn_producer(broker)
    producer.produce("out", b"from-a-zombie", partition=0)

    broker.lose(a.consumer)
    assert a.consumer.consumer_group_metadata() == stale  # it does not know yet
    with pytest.raises(KafkaException) as exc:
        producer.send_offsets_to_transaction([TopicPartition("in", 0, 5)], stale, 5)
    assert exc.value.args[0].code() == KafkaError.UNKNOWN_MEMBER_ID
    assert exc.value.args[0].txn_requires_abort()
    with pytest.raises(KafkaException) as exc:
        a.consumer.commit(offsets=[TopicPartition("in", 0, 5)], asynchronous=False)
    assert exc.value.args[0].code() == KafkaError.UNKNOWN_MEMBER_ID
    producer.abort_transaction(5)
    assert broker.committed_records("out") == []
    assert broker.committed_offset("g", "in", 0) is None

    a.poll()
    assert log[-2:] == [("A", "lost", [0, 1, 2, 3]), ("A", "assign", [0, 1, 2, 3])]
    assert a.consumer.consumer_group_metadata().generation > stale.generation


@pytest.mark.parametrize("lost_first", [False, True])
def test_a_fenced_static_member_gets_one_fatal_event_and_is_dead_from_then_on(
    broker: SimBroker, lost_first: bool
) -> None:
    log: list[tuple[str, str, list[int]]] = []
    a, b = Member(broker, "A", log), Member(broker, "B", log)
    for _ in range(2):
        a.poll()
        b.poll()
    log.clear()
    broker.fence(a.consumer, lost_first=lost_first)
    b.poll()
    assert b.owned() == [0, 1, 2, 3]
    plain_producer(broker).produce("in", b"after-the-fence", partition=0)

    errors = [m.error() for m in a.consumer.consume(10, 0)]
    assert [e.code() for e in errors] == [KafkaError._FATAL]
    assert not errors[0].fatal()  # confluent-kafka builds the event's error without the flag
    of_a = [entry for entry in log if entry[0] == "A"]
    assert of_a == ([("A", "lost", [0, 1])] if lost_first else [])
    assert a.consumer.consume(10, 0) == []  # once only; no rejoin, nothing fetched
    assert a.consumer.assignment() == []
    with pytest.raises(KafkaException) as exc:
        a.consumer.commit(offsets=[TopicPartition("in", 0, 1)], asynchronous=False)
    assert exc.value.args[0].code() == KafkaError._FATAL
    assert a.consumer.committed([TopicPartition("in", 0)], 1)[0].offset == OFFSET_INVALID
    a.consumer.close()
    assert [entry for entry in log if entry[0] == "A"] == of_a  # close serves no callbacks
    assert broker.assignments("g") == {b.consumer.memberid(): [("in", p) for p in range(4)]}


def test_a_zombie_fetches_until_it_notices_it_was_lost(broker: SimBroker, clock: SimClock) -> None:
    log: list[tuple[str, str, list[int]]] = []
    a, b = Member(broker, "A", log), Member(broker, "B", log)
    for _ in range(2):
        a.poll()
        b.poll()
    broker.lose(a.consumer, notice_after=5)
    b.poll()
    assert b.owned() == [0, 1, 2, 3]
    plain_producer(broker).produce("in", b"both-see-it", partition=0)
    assert [m.value() for m in a.poll()] == [b"both-see-it"]
    assert [m.value() for m in b.poll()] == [b"both-see-it"]
    clock.advance(5)
    a.poll()
    assert ("A", "lost", [0, 1]) in log


def test_a_forced_rebalance_moves_partitions_through_revoke_then_assign(
    broker: SimBroker,
) -> None:
    log: list[tuple[str, str, list[int]]] = []
    members = [Member(broker, name, log) for name in "ABC"]
    for _ in range(3):
        for m in members:
            m.poll()
    before = {m.name: m.owned() for m in members}
    log.clear()
    generation = broker.generation("g")

    broker.rebalance("g")
    for _ in range(3):
        for m in members:
            m.poll()
    after = {m.name: m.owned() for m in members}
    assert sorted(p for owned in after.values() for p in owned) == [0, 1, 2, 3]
    assert after != before  # seed 7 moves something
    assert broker.generation("g") > generation
    for i, (name, kind, partitions) in enumerate(log):
        if kind == "assign":  # whatever moved in was revoked from its old owner first
            revoked = {p for _, k, ps in log[:i] if k == "revoke" for p in ps}
            assert {p for p in partitions if p not in before[name]} <= revoked


def test_pause_survives_revocation_and_reassignment(broker: SimBroker) -> None:
    log: list[tuple[str, str, list[int]]] = []
    a = Member(broker, "A", log)
    a.poll()
    a.consumer.pause([TopicPartition("in", 3)])
    b = Member(broker, "B", log)
    a.poll()
    b.poll()  # partition 3 went to B
    b.consumer.close()  # and comes back to A
    a.poll()
    assert 3 in a.owned()
    plain_producer(broker).produce("in", b"stuck", partition=3)
    assert a.poll() == []  # still paused, as in librdkafka
    a.consumer.resume([TopicPartition("in", 3)])
    assert [m.value() for m in a.poll()] == [b"stuck"]


def test_close_revokes_then_leaves(broker: SimBroker) -> None:
    log: list[tuple[str, str, list[int]]] = []
    a, b = Member(broker, "A", log), Member(broker, "B", log)
    for _ in range(2):
        a.poll()
        b.poll()
    a.consumer.close()
    assert log[-1] == ("A", "revoke", [0, 1])
    b.poll()
    assert b.owned() == [0, 1, 2, 3]
    with pytest.raises(RuntimeError):
        a.consumer.consume(1, 0)


def test_incremental_assign_starts_at_the_given_or_committed_offset(broker: SimBroker) -> None:
    plain = plain_producer(broker)
    for value in (b"a", b"b", b"c"):
        plain.produce("in", value, partition=0)
        plain.produce("in", value, partition=1)
        plain.produce("in", value, partition=2)
    setter = SimConsumer(broker, {"group.id": "g"})
    setter.commit(offsets=[TopicPartition("in", 1, 2)], asynchronous=False)
    consumer = SimConsumer(broker, {"group.id": "g", "auto.offset.reset": "earliest"})
    consumer.incremental_assign(
        [TopicPartition("in", 0, 1), TopicPartition("in", 1), TopicPartition("in", 2)]
    )
    got = sorted((m.partition(), m.value()) for m in consumer.consume(100, 0))
    assert got == [(0, b"b"), (0, b"c"), (1, b"c"), (2, b"a"), (2, b"b"), (2, b"c")]
    with pytest.raises(KafkaException) as exc:
        consumer.incremental_assign([TopicPartition("in", 0)])
    assert exc.value.args[0].code() == KafkaError._CONFLICT
    consumer.seek(TopicPartition("in", 0, 0))
    assert [m.value() for m in consumer.consume(100, 0)] == [b"a", b"b", b"c"]


def test_list_topics_reports_a_missing_topic_with_an_error(broker: SimBroker) -> None:
    consumer = reader(broker)
    assert sorted(consumer.list_topics("in", timeout=1).topics["in"].partitions) == [0, 1, 2, 3]
    missing = consumer.list_topics("nope", timeout=1).topics["nope"]
    assert missing.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
    assert missing.partitions == {}


# -- faults --------------------------------------------------------------------------------------


def test_an_abortable_commit_failure_fires_once(broker: SimBroker) -> None:
    producer = txn_producer(broker)
    broker.inject("commit_transaction", producer)
    producer.produce("out", b"aborted", partition=0)
    with pytest.raises(KafkaException) as exc:
        producer.commit_transaction(5)
    assert exc.value.args[0].txn_requires_abort()
    with pytest.raises(KafkaException) as exc:
        producer.commit_transaction(5)  # still abortable: it must abort
    assert exc.value.args[0].txn_requires_abort()
    producer.abort_transaction(5)
    producer.begin_transaction()
    producer.produce("out", b"kept", partition=0)
    producer.commit_transaction(5)
    assert [r.value for r in broker.committed_records("out")] == [b"kept"]
    assert broker.pending_faults() == []


@pytest.mark.parametrize("applied", [False, True])
def test_a_retriable_commit_failure_succeeds_on_retry(broker: SimBroker, applied: bool) -> None:
    producer = txn_producer(broker)
    producer.produce("out", b"once", partition=0)
    broker.inject("commit_transaction", producer, retriable(), applied=applied)
    with pytest.raises(KafkaException) as exc:
        producer.commit_transaction(5)
    assert exc.value.args[0].retriable()
    assert len(broker.committed_records("out")) == (1 if applied else 0)
    with pytest.raises(KafkaException) as exc:
        producer.abort_transaction(5)  # the commit is in progress
    assert exc.value.args[0].code() == KafkaError._STATE
    producer.commit_transaction(5)
    assert [r.value for r in broker.committed_records("out")] == [b"once"]
    producer.begin_transaction()  # and it goes on


def test_a_fatal_commit_failure_leaves_the_transaction_open(broker: SimBroker) -> None:
    producer = txn_producer(broker)
    producer.produce("out", b"stalled", partition=0)
    broker.inject("commit_transaction", error=fatal())
    with pytest.raises(KafkaException) as exc:
        producer.commit_transaction(5)
    assert exc.value.args[0].fatal()
    with pytest.raises(KafkaException) as exc:
        producer.abort_transaction(5)
    assert exc.value.args[0].fatal()
    assert broker.watermarks("out", 0)[1] == 0  # the LSO waits for a new instance or a timeout
    txn_producer(broker)
    assert broker.watermarks("out", 0) == (0, 2, 2)


def test_send_offsets_faults_abortable_and_retriable(broker: SimBroker) -> None:
    meta = SimConsumer(broker, {"group.id": "g"}).consumer_group_metadata()
    offsets = [TopicPartition("in", 0, 3)]
    producer = txn_producer(broker)
    broker.inject("send_offsets_to_transaction", producer, retriable())
    with pytest.raises(KafkaException) as exc:
        producer.send_offsets_to_transaction(offsets, meta, 5)
    assert exc.value.args[0].retriable()
    producer.send_offsets_to_transaction(offsets, meta, 5)
    producer.commit_transaction(5)
    assert broker.committed_offset("g", "in", 0) == 3

    producer.begin_transaction()
    broker.inject("send_offsets_to_transaction", producer, abortable())
    with pytest.raises(KafkaException) as exc:
        producer.send_offsets_to_transaction([TopicPartition("in", 0, 4)], meta, 5)
    assert exc.value.args[0].txn_requires_abort()
    producer.abort_transaction(5)
    assert broker.committed_offset("g", "in", 0) == 3


def test_produce_faults(broker: SimBroker) -> None:
    producer = txn_producer(broker)
    broker.inject("produce_queue_full", producer)
    with pytest.raises(BufferError):
        producer.produce("out", b"full", partition=0)
    reports: list[KafkaError | None] = []
    broker.inject("produce", producer)
    producer.produce("out", b"lost", partition=0, on_delivery=lambda e, m: reports.append(e))
    producer.flush(1)
    assert [e.code() if e else None for e in reports] == [KafkaError._MSG_TIMED_OUT]
    with pytest.raises(KafkaException) as exc:
        producer.produce("out", b"refused", partition=0)  # the transaction is abortable now
    assert exc.value.args[0].code() == KafkaError._STATE
    with pytest.raises(KafkaException) as exc:
        producer.commit_transaction(5)
    assert exc.value.args[0].txn_requires_abort()
    producer.abort_transaction(5)
    assert broker.all_records("out") == []


def test_an_injected_consume_error_is_returned_once(broker: SimBroker) -> None:
    plain_producer(broker).produce("in", b"a", partition=0)
    consumer = reader(broker)
    consumer.assign([TopicPartition("in", 0, 0)])
    broker.inject("consume", consumer, transient())
    first = consumer.consume(10, 0)
    assert error_codes(first) == [KafkaError._TRANSPORT]
    assert not first[0].error().fatal()
    assert [m.value() for m in first if m.error() is None] == [b"a"]
    assert consumer.consume(10, 0) == []


def test_while_the_broker_is_down(broker: SimBroker, clock: SimClock) -> None:
    log: list[tuple[str, str, list[int]]] = []
    member = Member(broker, "A", log)
    member.poll()
    plain_producer(broker).produce("in", b"waiting", partition=0)
    dropped = txn_producer(broker, "dropped")
    dropped.produce("out", b"doomed", partition=1)
    producer = txn_producer(broker)

    broker.set_down(True)
    assert member.poll() == []
    reports: list[KafkaError | None] = []
    producer.produce("out", b"queued", partition=0, on_delivery=lambda e, m: reports.append(e))
    assert producer.flush(1) == 1
    for call in (
        lambda: producer.commit_transaction(5),
        lambda: member.consumer.committed([TopicPartition("in", 0)]),
        lambda: member.consumer.get_watermark_offsets(TopicPartition("in", 0)),
    ):
        with pytest.raises(KafkaException) as exc:
            call()
        assert exc.value.args[0].retriable()
        assert exc.value.args[0].code() == KafkaError._TRANSPORT
    broker.kill(member.consumer)  # a session can't be renewed, nor can it expire
    clock.advance(TXN_TIMEOUT_S)
    assert broker.open_transactions() == {}  # the timeout still fired

    broker.set_down(False)
    assert member.consumer.memberid() in broker.assignments("g")  # sessions restart
    producer.commit_transaction(5)  # the retry of the commit in progress
    assert reports == [None]
    assert [r.value for r in broker.committed_records("out")] == [b"queued"]
    assert [m.value() for m in member.poll()] == [b"waiting"]


def test_the_same_seed_gives_the_same_run(clock: SimClock) -> None:
    def run(seed: int) -> list[tuple[int | None, bytes | None]]:
        broker = SimBroker(SimClock(), random.Random(seed))
        broker.create_topic("in", 8)
        plain = plain_producer(broker)
        for i in range(40):
            plain.produce("in", str(i).encode())  # keyless: an rng-chosen partition
        consumer = reader(broker)
        consumer.assign([TopicPartition("in", p, 0) for p in range(8)])
        return [(m.partition(), m.value()) for m in consumer.consume(1000, 0)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_sim_clients_build_and_remember_clients(broker: SimBroker) -> None:
    clients = SimClients(broker)
    consumer = clients.consumer({"group.id": "g"})
    producer = clients.producer({"transactional.id": "x"})
    assert clients.consumers == [consumer]
    assert clients.producers == [producer]
    with pytest.raises(ValueError, match=r"group\.id"):
        clients.consumer({})
