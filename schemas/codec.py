"""Avro codecs for the records on our topics: schemas parsed once, bytes in, typed records out.

Two wire formats, chosen by configuration:

* ``plain``: the bare Avro binary encoding of one record. Readers assume the writer used the
  current schema (or the writer schema the codec was built with).
* ``confluent``: the Confluent Schema Registry framing — magic byte 0, a 4-byte big-endian
  schema id, then the Avro binary. The id selects the writer schema among those the codec
  knows, so records written with an older schema version resolve against the current one.

Evolution rule (BACKWARD): a new schema version may add fields only with a default and may
add enum symbols (readers map unknown symbols to ``UNKNOWN``); it never removes or renames a
field without a default or changes a field's type. A reader on the newest schema therefore
decodes everything older writers produced.

Every failure to decode becomes a :class:`CodecError` with a machine-readable reason; the
worker dead-letters the record with that reason.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping
from enum import StrEnum
from functools import cache
from importlib import resources
from typing import Any, Generic, Protocol, Self, TypeVar

import fastavro

CONFLUENT_MAGIC = 0
_CONFLUENT_HEADER = struct.Struct(">bI")


class WireFormat(StrEnum):
    """How a record's Avro bytes are framed on the topic."""

    PLAIN = "plain"
    CONFLUENT = "confluent"


class CodecError(Exception):
    """A record could not be encoded or decoded; ``reason`` is a stable code for dead letters."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class RegistryUnavailable(Exception):
    """The Schema Registry could not be reached: not a fault of the record, never dead-lettered."""


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The parsed current version of ``schemas/<name>.avsc`` (parsed once per process)."""
    text = resources.files(__package__).joinpath(f"{name}.avsc").read_text(encoding="utf-8")
    return parse_schema(json.loads(text))


def parse_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Parse a schema given as JSON data, with fastavro's own named-type registry per call."""
    return fastavro.parse_schema(dict(schema), named_schemas={})


class AvroRecord(Protocol):
    """A typed record that knows its schema file and converts to and from Avro data."""

    SCHEMA: str

    def to_avro(self) -> dict[str, Any]: ...

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Self: ...


R = TypeVar("R", bound=AvroRecord)


class RecordCodec(Generic[R]):
    """Encode and decode one record type in one wire format.

    ``schema_id`` is the registry id written into confluent frames. ``writer_schemas`` maps the
    ids a reader accepts to the schemas they were written with; by default only ``schema_id``
    with the current schema. In plain format, ``writer_schema`` (default: current) is the schema
    the bytes were written with.
    """

    def __init__(
        self,
        record_type: type[R],
        wire_format: WireFormat = WireFormat.PLAIN,
        *,
        schema_id: int = 1,
        writer_schemas: Mapping[int, Mapping[str, Any]] | None = None,
        writer_schema: Mapping[str, Any] | None = None,
    ) -> None:
        if not 0 <= schema_id < 2**32:
            raise ValueError(f"schema_id must fit in 4 unsigned bytes, got {schema_id}")
        self.record_type = record_type
        self.wire_format = WireFormat(wire_format)
        self.schema = load_schema(record_type.SCHEMA)
        self.schema_id = schema_id
        self._header = _CONFLUENT_HEADER.pack(CONFLUENT_MAGIC, schema_id)
        known = {schema_id: self.schema}
        known.update({sid: parse_schema(s) for sid, s in (writer_schemas or {}).items()})
        self._writer_schemas = known
        self._plain_writer = parse_schema(writer_schema) if writer_schema else self.schema

    def encode(self, record: R) -> bytes:
        """The record's bytes in this codec's wire format."""
        buf = io.BytesIO()
        if self.wire_format is WireFormat.CONFLUENT:
            buf.write(self._header)
        try:
            fastavro.schemaless_writer(buf, self.schema, record.to_avro())
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
            raise CodecError(
                "invalid_record", f"cannot encode {self.record_type.__name__}: {exc}"
            ) from exc
        return buf.getvalue()

    def decode(self, data: bytes | None) -> R:
        """The typed record in ``data``; raises :class:`CodecError` on anything malformed."""
        name = self.record_type.__name__
        if not data:
            raise CodecError("empty_record", f"expected an Avro {name}, got an empty value")
        writer = self._plain_writer
        start = 0
        if self.wire_format is WireFormat.CONFLUENT:
            if len(data) < _CONFLUENT_HEADER.size:
                raise CodecError(
                    "truncated_header",
                    f"confluent framing needs {_CONFLUENT_HEADER.size} header bytes, "
                    f"got {len(data)}",
                )
            magic, schema_id = _CONFLUENT_HEADER.unpack_from(data)
            if magic != CONFLUENT_MAGIC:
                raise CodecError(
                    "bad_magic_byte", f"confluent framing starts with byte 0, got {magic & 0xFF}"
                )
            found = self._writer_schemas.get(schema_id)
            if found is None:
                raise CodecError(
                    "unknown_schema_id",
                    f"schema id {schema_id} is not a known {name} schema "
                    f"(known: {sorted(self._writer_schemas)})",
                )
            writer = found
            start = _CONFLUENT_HEADER.size
        buf = io.BytesIO(data)
        buf.seek(start)
        try:
            reader = None if writer is self.schema else self.schema
            raw = fastavro.schemaless_reader(buf, writer, reader)
        except Exception as exc:  # fastavro raises many types on malformed bytes
            raise CodecError(
                "undecodable_record", f"not a valid Avro {name}: {type(exc).__name__}: {exc}"
            ) from exc
        if buf.tell() != len(data):
            raise CodecError(
                "trailing_bytes",
                f"Avro {name} ended at byte {buf.tell()} of {len(data)}: "
                "the value holds extra bytes",
            )
        try:
            return self.record_type.from_avro(raw)
        except (TypeError, ValueError, KeyError) as exc:
            raise CodecError("invalid_record", f"invalid {name}: {exc}") from exc


class Codec(Protocol[R]):
    """What the worker and the tools need of a codec, with or without a registry."""

    def encode(self, record: R) -> bytes: ...

    def decode(self, data: bytes | None) -> R: ...


def make_codec(
    record_type: type[R],
    *,
    topic: str,
    wire_format: WireFormat = WireFormat.PLAIN,
    registry_url: str = "",
    schema_id: int = 1,
) -> Codec[R]:
    """The codec for ``record_type`` values on ``topic``.

    With ``registry_url`` (``http(s)://…`` or ``mock://…``): confluent framing through the
    Schema Registry client (``registry.py``), ids registered and looked up by subject. Without:
    ``RecordCodec`` in ``wire_format``, with the fixed ``schema_id`` for hand framing.
    """
    if registry_url:
        from schemas.registry import RegistryCodec, registry_client

        return RegistryCodec(record_type, registry_client(registry_url), topic)
    return RecordCodec(record_type, wire_format, schema_id=schema_id)
