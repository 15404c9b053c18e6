"""Confluent Schema Registry codecs, through confluent-kafka's own client and Avro serdes.

Without a registry the codecs in ``codec.py`` write plain Avro (the default). With one,
``RegistryCodec`` uses ``confluent_kafka.schema_registry``: the writer registers (or looks up)
the current ``schemas/*.avsc`` under the subject ``<topic>-value`` (TopicNameStrategy) and frames
each record with the id it got; the reader fetches the writer schema by the id in each record
and resolves it against the current schema, so records written by older producers decode with
defaults filled in (the evolution rule in ``codec.py``).

Clients are shared per URL within a process (``registry_client``): the registry client caches
ids and schemas, so one client per process saves a lookup per codec. It also makes ``mock://``
URLs usable across the worker and the tools of one process: confluent-kafka's
``MockSchemaRegistryClient`` keeps its schemas in the client instance, so two instances, even
with the same URL, do not see each other's schemas, and a mock registry is never shared between
processes.

Errors: bytes that do not decode (trailing bytes included, as ``RecordCodec`` rules), a record
that does not fit its schema, or a schema id the registry says it does not know (error code
40403; any other 404 may be a proxy or a follower not yet replicated) raise ``CodecError`` (the
worker dead-letters the record). A registry that cannot be reached, or answers with any other
error, raises ``RegistryUnavailable``, which is not a property of the record: the worker must
not dead-letter on it, so it stops instead, without committing, and its restart retries. Every
request gives up after ``DEFAULT_REQUEST_TIMEOUT_SEC``, so a registry that never answers cannot
block decoding forever.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from importlib import resources
from typing import Any, Final, Generic, TypeVar

from confluent_kafka.error import SerializationError
from confluent_kafka.schema_registry import (
    SchemaRegistryClient,
    SchemaRegistryError,
    prefix_schema_id_deserializer,
)
from confluent_kafka.schema_registry._sync.mock_schema_registry_client import (
    MockSchemaRegistryClient,
)
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from schemas.codec import AvroRecord, CodecError, RegistryUnavailable

R = TypeVar("R", bound=AvroRecord)

REGISTRY_SCHEMES = ("http://", "https://", "mock://")
DEFAULT_REQUEST_TIMEOUT_SEC: Final = 10.0
SCHEMA_NOT_FOUND: Final = 40403  # the registry's error code for an unknown schema id

_clients: dict[tuple[str, float], SchemaRegistryClient] = {}
_clients_lock = threading.Lock()


def check_registry_url(url: str) -> str:
    """``url`` if it names a registry we can talk to; a clear ``ValueError`` otherwise."""
    if not url.startswith(REGISTRY_SCHEMES):
        raise ValueError(
            f"schema registry URL must start with {', '.join(REGISTRY_SCHEMES)}, got {url!r}"
        )
    return url.rstrip("/")


def registry_client(
    url: str, timeout_sec: float = DEFAULT_REQUEST_TIMEOUT_SEC
) -> SchemaRegistryClient:
    """The process's one client for ``url`` (``mock://…`` gives an in-memory registry).

    ``timeout_sec`` bounds each HTTP request (confluent-kafka's default is no limit at all).
    """
    url = check_registry_url(url)
    with _clients_lock:
        client = _clients.get((url, timeout_sec))
        if client is None:
            conf = {"url": url, "timeout": timeout_sec}
            mock = url.startswith("mock://")
            client = _MockRegistry(conf) if mock else SchemaRegistryClient(conf)
            _clients[(url, timeout_sec)] = client
        return client


class _MockRegistry(MockSchemaRegistryClient):
    """confluent-kafka's in-memory registry, answering an unknown id as a real registry does.

    The real ``GET /schemas/ids/{id}`` answers error code 40403; the mock says 40400.
    """

    def get_schema(self, schema_id: int, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().get_schema(schema_id, *args, **kwargs)
        except SchemaRegistryError as exc:
            raise SchemaRegistryError(404, SCHEMA_NOT_FOUND, exc.error_message) from None


def schema_text(record_type: type[AvroRecord]) -> str:
    """The current ``.avsc`` of ``record_type``, as the registry stores it."""
    path = resources.files("schemas").joinpath(f"{record_type.SCHEMA}.avsc")
    return json.dumps(json.loads(path.read_text(encoding="utf-8")), separators=(",", ":"))


def subject_for(topic: str) -> str:
    """The subject TopicNameStrategy gives a record value on ``topic``."""
    return f"{topic}-value"


class RegistryCodec(Generic[R]):
    """Encode and decode one record type on one topic through a Schema Registry.

    Same interface as ``RecordCodec``: ``encode(record) -> bytes``, ``decode(bytes) -> record``.
    ``writer_schema`` (JSON data, default: the current ``.avsc``) is the schema records are
    written with; tests use it to play an older producer.
    """

    def __init__(
        self,
        record_type: type[R],
        client: SchemaRegistryClient,
        topic: str,
        *,
        writer_schema: Mapping[str, Any] | None = None,
        auto_register: bool = True,
    ) -> None:
        if not topic:
            raise ValueError("a registry codec needs the topic its subject is named after")
        self.record_type = record_type
        self.topic = topic
        self.subject = subject_for(topic)
        self._ctx = SerializationContext(topic, MessageField.VALUE)
        current = schema_text(record_type)
        writer = json.dumps(dict(writer_schema)) if writer_schema is not None else current
        self._serializer = AvroSerializer(
            client,
            writer,
            to_dict=lambda record, _ctx: record.to_avro(),
            conf={"auto.register.schemas": auto_register},
        )
        self._deserializer = AvroDeserializer(
            client,
            current,
            from_dict=lambda data, _ctx: record_type.from_avro(data),
            conf={"schema.id.deserializer": self._payload_of},
        )
        self._reading = threading.local()  # the payload being decoded, to find trailing bytes

    def _payload_of(self, data: bytes, ctx: Any, schema_id: Any) -> Any:
        """The framed record's Avro body, kept so that ``decode`` sees where reading stopped."""
        payload = prefix_schema_id_deserializer(data, ctx, schema_id)
        self._reading.payload = payload
        return payload

    def encode(self, record: R) -> bytes:
        """The record framed with its writer schema's registry id (registered on first use)."""
        try:
            data = self._serializer(record, self._ctx)
        except SchemaRegistryError as exc:
            raise RegistryUnavailable(f"registering {self.subject}: {exc}") from exc
        except (SerializationError, TypeError, ValueError, AttributeError, KeyError) as exc:
            if _is_connection_error(exc):
                raise RegistryUnavailable(f"registering {self.subject}: {exc}") from exc
            raise CodecError(
                "invalid_record", f"cannot encode {self.record_type.__name__}: {exc}"
            ) from exc
        except Exception as exc:  # httpx's transport errors, without importing httpx
            if _is_connection_error(exc):
                raise RegistryUnavailable(f"registering {self.subject}: {exc}") from exc
            raise CodecError(  # e.g. fastavro's error for a value out of a long's range
                "invalid_record",
                f"cannot encode {self.record_type.__name__}: {type(exc).__name__}: {exc}",
            ) from exc
        if data is None:  # the serializer returns None for None only
            raise CodecError("invalid_record", f"cannot encode {record!r}")
        return data

    def decode(self, data: bytes | None) -> R:
        """The typed record in ``data``, resolved from its writer schema (looked up by id)."""
        name = self.record_type.__name__
        if not data:
            raise CodecError("empty_record", f"expected a framed Avro {name}, got an empty value")
        if data[0] != 0:
            raise CodecError(
                "bad_magic_byte", f"registry framing starts with byte 0, got {data[0]}"
            )
        self._reading.payload = None
        try:
            record = self._deserializer(data, self._ctx)
        except SchemaRegistryError as exc:
            if exc.error_code == SCHEMA_NOT_FOUND:
                raise CodecError(
                    "unknown_schema_id", f"the registry has no schema for this {name}: {exc}"
                ) from exc
            raise RegistryUnavailable(f"looking up a {name} schema: {exc}") from exc
        except (SerializationError, TypeError, ValueError, KeyError, EOFError) as exc:
            raise CodecError(
                "undecodable_record", f"not a valid framed Avro {name}: {type(exc).__name__}: {exc}"
            ) from exc
        except Exception as exc:
            if _is_connection_error(exc):
                raise RegistryUnavailable(f"looking up a {name} schema: {exc}") from exc
            raise CodecError(
                "undecodable_record", f"not a valid framed Avro {name}: {type(exc).__name__}: {exc}"
            ) from exc
        payload = self._reading.payload
        if payload is not None and payload.tell() != len(payload.getbuffer()):
            raise CodecError(
                "trailing_bytes",
                f"framed Avro {name} ended at byte {5 + payload.tell()} of {len(data)}: "
                "the value holds extra bytes",
            )
        return record


def _is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) is a transport failure rather than bad data."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionError | TimeoutError | OSError):
            return True
        module = type(seen).__module__
        if module.startswith(("httpx", "httpcore")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
