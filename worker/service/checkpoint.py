"""The output side of a worker: one producer, its transaction, and the commit of a checkpoint.

A checkpoint is one ordered procedure (as quixstreams' ``Checkpoint``): the loop produces the
checkpoint's records (progress, partition markers), then ``commit`` sends the input offsets
and commits. In ``exactly_once`` mode all of it is one Kafka transaction; in
``at_least_once`` mode the producer is flushed, fails if anything is unsent, and only then are
the offsets committed.

Errors follow librdkafka's transactional rules:

* retriable → the same call again, until ``retry_sec`` has passed (then: abortable); but
  a retriable failure to send the offsets or commit replaces the producer (see ``commit``);
* abortable (``txn_requires_abort``) → abort (by replacing the producer, see ``abort``),
  raise ``TransactionAborted``: the loop drops everything since the last checkpoint and
  rebuilds from it, committing nothing in that turn;
* fatal (e.g. fenced by a newer producer with our transactional id) → ``FatalProducerError``:
  this producer is unusable; the loop may replace it (``restart``) and rebuild, or stop.

In ``at_least_once`` mode a failed flush or offset commit (a rebalance under way, a broker
gone) is likewise ``TransactionAborted``: the loop rebuilds from the committed offsets, and the
replay may repeat outputs, which that mode allows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from worker.metrics import Health, Metrics
from worker.service.clients import ConsumerLike, KafkaClients, ProducerLike

log = logging.getLogger(__name__)

_CALL_TIMEOUT_SEC = 10.0
_RETIRED_KEPT = 4  # replaced producers kept alive (see ``_replace``)


class FatalWorkerError(RuntimeError):
    """The worker cannot go on; it stops without committing."""


class FatalProducerError(FatalWorkerError):
    """The producer hit a fatal error (fenced, or its epoch is gone); a new one may go on."""


class FatalConsumerError(FatalWorkerError):
    """The consumer hit a fatal error (a static member fenced); a new one may go on."""


class TransactionAborted(Exception):
    """Outputs since the last checkpoint are void: rebuild from it, commit nothing now."""


def consumer_fatal(error: KafkaError) -> bool:
    """Whether a consumer error means the consumer is dead. confluent-kafka builds the error
    of librdkafka's ``_FATAL`` event and of a fenced commit without the ``fatal()`` flag."""
    return error.fatal() or error.code() in (KafkaError._FATAL, KafkaError.FENCED_INSTANCE_ID)


class Checkpoint:
    """Owns the producer and its transaction. One thread (the loop's) uses it."""

    def __init__(
        self,
        clients: KafkaClients,
        conf: dict[str, Any],
        exactly_once: bool,
        metrics: Metrics,
        health: Health,
        retry_sec: float,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clients = clients
        self.conf = conf
        self.eos = exactly_once
        self.metrics = metrics
        self.health = health
        self.retry_sec = retry_sec
        self.sleep = sleep
        self.clock = clock
        self.produced = 0  # records produced since the last commit
        self._delivery_errors: list[str] = []
        self.producer: ProducerLike = clients.producer(conf)
        self._retired: list[ProducerLike] = []  # replaced producers, not yet destroyed

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Fence older producers with our transactional id and open the first transaction."""
        if self.eos:
            self._retrying(
                "init_transactions", lambda: self.producer.init_transactions(30), abortable=False
            )
            self._begin()

    def restart(self) -> None:
        """Replace a producer that hit a fatal error; outputs since the last commit are void."""
        self.metrics.on_producer_restart()
        self._replace("after a fatal error")

    def _replace(self, why: str) -> None:
        log.warning("replacing the producer %s", why)
        # The old one is kept a while rather than destroyed here: destroying a producer
        # waits for its outstanding requests, which a dead broker may never answer.
        self._retired = [*self._retired[-(_RETIRED_KEPT - 1) :], self.producer]
        self.producer = self.clients.producer(self.conf)
        self.produced = 0
        self._delivery_errors.clear()
        self.start()

    def close(self) -> None:
        try:
            self.producer.flush(5)
        except KafkaException as exc:
            log.warning("producer flush at close: %s", exc)

    # -- records -----------------------------------------------------------------------------

    def produce(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int = -1
    ) -> None:
        """Add a record to the current transaction (or the unflushed batch); ``partition``
        -1: by key."""
        while True:
            try:
                self.producer.produce(
                    topic, value=value, key=key, partition=partition, on_delivery=self._on_delivery
                )
                self.produced += 1
                return
            except BufferError:
                self.producer.poll(0.05)  # local queue full: let deliveries drain
            except KafkaException as exc:
                self._fail(exc.args[0], f"produce to {topic}")

    def _on_delivery(self, err: KafkaError | None, message: Any) -> None:
        if err is not None:
            self._delivery_errors.append(f"{message.topic()}: {err}")

    # -- commit ------------------------------------------------------------------------------

    def barrier(self) -> None:
        """At least once: everything produced so far is delivered (else ``TransactionAborted``),
        so what is produced next may describe it. Exactly once: nothing to do, the
        transaction makes it all visible at once."""
        if self.eos:
            return
        remaining = self.producer.flush(self.retry_sec)
        if remaining or self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors[:3], []
            log.warning("outputs not delivered (%d left; %s)", remaining, errors)
            self.metrics.on_transaction("abort")
            raise TransactionAborted("outputs were not delivered")

    def commit(self, offsets: list[TopicPartition], consumer: ConsumerLike) -> None:
        """Commit everything produced since the last commit together with ``offsets``."""
        if self.eos:
            if offsets:
                metadata = consumer.consumer_group_metadata()
                # librdkafka can hang for good in a retried send_offsets_to_transaction once
                # the coordinator comes back (confluent-kafka-python/librdkafka #5456, #5511):
                # after a retriable failure the producer is replaced instead (init_transactions
                # finishes or aborts what it left), and the loop rebuilds from what committed.
                self._retrying(
                    "send_offsets_to_transaction",
                    lambda: self.producer.send_offsets_to_transaction(
                        offsets, metadata, _CALL_TIMEOUT_SEC
                    ),
                    retry=False,
                )
            self._retrying(
                "commit_transaction",
                lambda: self.producer.commit_transaction(_CALL_TIMEOUT_SEC),
                retry=False,
            )
            self._begin()
        else:
            self.barrier()
            if offsets:
                try:
                    consumer.commit(offsets=offsets, asynchronous=False)
                except KafkaException as exc:
                    if consumer_fatal(exc.args[0]):
                        raise FatalConsumerError(f"offset commit: {exc.args[0]}") from exc
                    log.warning("offset commit failed (%s): rebuilding from the last one", exc)
                    self.metrics.on_transaction("abort")
                    raise TransactionAborted(str(exc)) from exc
        self.produced = 0
        self.metrics.on_transaction("commit")

    def abort(self) -> None:
        """Void the open transaction and begin the next (exactly once; else nothing to do)."""
        self.produced = 0
        self._delivery_errors.clear()
        self.metrics.on_transaction("abort")
        if not self.eos:
            return
        # A new producer, not abort_transaction: its init_transactions aborts the open
        # transaction all the same (fencing this one), and a producer that came through an
        # outage and an abort can hang for good in its next send_offsets_to_transaction
        # (librdkafka 2.16, seen here: a condition wait with no deadline).
        self._replace("after an aborted transaction")

    # -- error rules -------------------------------------------------------------------------

    def _begin(self) -> None:
        try:
            self.producer.begin_transaction()
        except KafkaException as exc:
            error = exc.args[0]
            raise FatalProducerError(f"begin_transaction: {error}") from exc

    def _retrying(
        self, what: str, call: Callable[[], None], abortable: bool = True, retry: bool = True
    ) -> None:
        """``call`` until it succeeds; retriable errors are retried for ``retry_sec``. Past
        that, or on another error: the rules above, or (not ``abortable``: starting or
        aborting) the producer is unusable. ``retry`` False: a retriable error, too, makes
        the producer unusable (see ``commit``)."""
        deadline = self.clock() + self.retry_sec
        while True:
            try:
                call()
                return
            except KafkaException as exc:
                error = exc.args[0]
                if error.retriable() and not error.fatal() and not retry:
                    raise FatalProducerError(f"{what}: {error} (not retried)") from exc
                if error.retriable() and not error.fatal() and self.clock() < deadline:
                    log.info("%s: %s; retrying", what, error)
                    self.health.beat()  # still turning: liveness reflects a hung call only
                    self.sleep(0.5)
                    continue
                if not abortable:
                    raise FatalProducerError(f"{what}: {error}") from exc
                self._fail(error, what)

    def _fail(self, error: KafkaError, what: str) -> None:
        """Translate a non-retriable error per the rules in the module docstring."""
        if error.fatal():
            raise FatalProducerError(f"{what}: {error}")
        if self.eos:
            log.warning("%s failed (%s): aborting the transaction", what, error)
            self.abort()
        else:
            log.warning("%s failed (%s)", what, error)
            self.metrics.on_transaction("abort")
        raise TransactionAborted(f"{what}: {error}")
