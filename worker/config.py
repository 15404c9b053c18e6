"""One typed configuration for the worker, loaded once at start and passed down.

Sources, later ones winning: defaults → a TOML file (``--config``) → ``CALLSCRIBE_*``
environment variables → command-line flags. Every field below is a flag (``--input-topic``),
an environment variable (``CALLSCRIBE_INPUT_TOPIC``) and a file key (``input_topic``); the
engine's fields (``worker.engine.engine.EngineConfig``) are flat alongside them. No other
module reads the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from schemas import WireFormat
from worker.engine.config import EngineConfig
from worker.service.channels import parse_mode

ENV_PREFIX = "CALLSCRIBE_"
DEFAULT_DIARIZER = "nvidia/diar_streaming_sortformer_4spk-v2.1"
DEFAULT_ASR = "nvidia/multitalker-parakeet-streaming-0.6b-v1"


class ConfigError(ValueError):
    """The configuration is invalid; the message says which setting and why."""


class DeliveryMode(StrEnum):
    EXACTLY_ONCE = "exactly_once"
    AT_LEAST_ONCE = "at_least_once"


class GapPolicy(StrEnum):
    FILL_SILENCE = "fill_silence"
    END_STREAM = "end_stream"
    DEAD_LETTER = "dead_letter"


class RandomModels(StrEnum):
    NONE = "none"
    TINY = "tiny"
    REAL = "real"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class WorkerConfig:
    """Everything the worker needs to know. See README.md § Configuration."""

    bootstrap_servers: str = field(
        default="127.0.0.1:9092", metadata=_help("Kafka bootstrap servers")
    )
    input_topic: str = field(default="call-audio", metadata=_help("topic of AudioChunk records"))
    output_topic: str = field(
        default="call-transcripts", metadata=_help("topic for TranscriptEvent records")
    )
    dead_letter_topic: str = field(
        default="call-audio-dead-letter", metadata=_help("topic for DeadLetter records")
    )
    progress_topic: str = field(
        default="call-transcripts-progress",
        metadata=_help("compacted topic of open streams' recovery bookkeeping"),
    )
    group_id: str = field(default="callscribe", metadata=_help("consumer group id of the workers"))
    instance_id: str = field(
        default="",
        metadata=_help(
            "static member id (group.instance.id); also names the transactional id. "
            "Empty: a random id per process"
        ),
    )
    delivery: DeliveryMode = field(
        default=DeliveryMode.EXACTLY_ONCE,
        metadata=_help("exactly_once (transactions) or at_least_once"),
    )
    wire_format: WireFormat = field(
        default=WireFormat.PLAIN, metadata=_help("plain Avro or confluent framing")
    )
    schema_id_audio_chunk: int = field(
        default=1, metadata=_help("registry id of AudioChunk (confluent framing)")
    )
    schema_id_transcript_event: int = field(
        default=2, metadata=_help("registry id of TranscriptEvent")
    )
    schema_id_dead_letter: int = field(default=3, metadata=_help("registry id of DeadLetter"))
    schema_registry_url: str = field(
        default="",
        metadata=_help(
            "Confluent Schema Registry (http(s)://host:port, or mock://name for tests): "
            "schemas registered and looked up by subject <topic>-value, records in confluent "
            "framing, readers resolve writer schemas by id; wire_format and schema_id_* are "
            "then unused. Empty: no registry"
        ),
    )
    diarizer_model: str = field(
        default=DEFAULT_DIARIZER, metadata=_help("pretrained name or .nemo path")
    )
    asr_model: str = field(default=DEFAULT_ASR, metadata=_help("pretrained name or .nemo path"))
    random_models: RandomModels = field(
        default=RandomModels.NONE,
        metadata=_help(
            "build and use random-weight models of the real classes instead: tiny or real"
        ),
    )
    model_cache_dir: Path = field(
        default=Path.home() / ".cache" / "callscribe" / "models",
        metadata=_help("where downloaded and built models are cached"),
    )
    device: str = field(
        default="", metadata=_help("torch device; empty: cuda when present, else cpu")
    )
    torch_threads: int = field(
        default=1,
        metadata=_help(
            "CPU threads for torch ops; 0: torch's default (one per core), which "
            "contends with the Kafka loop: steps measured 20x slower on 2 cores"
        ),
    )
    float64: bool = field(
        default=False,
        metadata=_help("run the models in float64 (CPU tests); the same as dtype fp64"),
    )
    channel_mode: str = field(
        default="mix",
        metadata=_help(
            "a call's channels when its first chunk's metadata has no channel_mode: mix "
            "(averaged), split (each channel its own diarized stream: twice the model work) "
            "or channel:N (one channel)"
        ),
    )
    channel_roles: str = field(
        default="",
        metadata=_help(
            "party names by channel for split and channel:N events, e.g. agent,customer, "
            "when a call's metadata has no channel_roles"
        ),
    )
    gap_policy: GapPolicy = field(
        default=GapPolicy.FILL_SILENCE,
        metadata=_help("missing chunks in a stream: fill_silence, end_stream or dead_letter"),
    )
    idle_timeout_sec: float = field(
        default=30.0,
        metadata=_help(
            "end a call whose newest record is this much older than its partition's newest "
            "(record timestamps), or whose partition got no record at all for this long"
        ),
    )
    max_streams: int = field(
        default=256,
        metadata=_help(
            "open calls per worker; a new call past it waits (its partition pauses) for a slot"
        ),
    )
    max_streams_hard: int = field(
        default=384,
        metadata=_help(
            "past max_streams, a new call on a partition with open calls is still admitted up "
            "to this, so that it never stalls them"
        ),
    )
    max_payload_bytes: int = field(
        default=1_048_576, metadata=_help("largest AudioChunk payload accepted")
    )
    max_chunk_sec: float = field(
        default=10.0, metadata=_help("longest audio in one chunk accepted")
    )
    max_stream_id_length: int = field(default=256, metadata=_help("longest stream id accepted"))
    max_stream_sec: float = field(
        default=4 * 3600.0,
        metadata=_help("a stream longer than this is ended; bounds recovery replay"),
    )
    max_stream_buffered_sec: float = field(
        default=8.0,
        metadata=_help(
            "unprocessed audio per call before its partition pauses until the engine catches "
            "up (a backlog is read at engine speed, never failed)"
        ),
    )
    max_clock_skew_sec: float = field(
        default=300.0,
        metadata=_help(
            "a record stamped further than this ahead of the worker's clock does not move its "
            "partition's event-time clock (a producer whose clock is wrong)"
        ),
    )
    stall_exit_sec: float = field(
        default=180.0,
        metadata=_help(
            "exit (code 1) when the loop has not turned for this long, e.g. hung inside a Kafka "
            "call; the orchestrator restarts the worker, which fences its predecessor"
        ),
    )
    max_gap_fill_sec: float = field(
        default=10.0,
        metadata=_help("longest run of missing chunks filled with silence; past it, dead letter"),
    )
    duplicate_window: int = field(
        default=64,
        metadata=_help("recent chunks per call whose digest tells a repeat from a conflict"),
    )
    max_dead_letter_original_bytes: int = field(
        default=65_536,
        metadata=_help("a dead letter keeps at most this much of the original record"),
    )
    transaction_interval_ms: int = field(
        default=200, metadata=_help("how often outputs and offsets commit")
    )
    transaction_timeout_ms: int = field(
        default=30_000,
        metadata=_help(
            "Kafka transaction.timeout.ms: how long a dead worker's open transaction "
            "holds back read_committed readers"
        ),
    )
    poll_timeout_ms: int = field(default=50, metadata=_help("longest wait in one consumer poll"))
    max_poll_interval_ms: int = field(default=300_000, metadata=_help("Kafka max.poll.interval.ms"))
    session_timeout_ms: int = field(default=10_000, metadata=_help("Kafka session.timeout.ms"))
    kafka_retry_sec: float = field(
        default=120.0,
        metadata=_help(
            "how long a retriable Kafka error (broker down) is retried before the transaction "
            "is aborted and rebuilt"
        ),
    )
    max_producer_restarts: int = field(
        default=5,
        metadata=_help("producers replaced after fatal errors without a commit between: then exit"),
    )
    max_consumer_restarts: int = field(
        default=5,
        metadata=_help(
            "consumers replaced after fatal errors (a static member fenced, e.g. by its own "
            "rejoin after a broker restart) within consumer_restart_window_sec: then exit, as "
            "another worker is probably running with the same instance_id"
        ),
    )
    consumer_restart_window_sec: float = field(
        default=600.0,
        metadata=_help("the window max_consumer_restarts counts in"),
    )
    recovery_timeout_sec: float = field(
        default=120.0,
        metadata=_help(
            "longest wait for the progress topic to catch up with the committed offsets "
            "(a dead worker's open transaction); must exceed transaction_timeout_ms"
        ),
    )
    shutdown_grace_sec: float = field(
        default=20.0, metadata=_help("time to drain on SIGTERM before exiting")
    )
    metrics_port: int = field(
        default=9400, metadata=_help("HTTP port for /metrics, /healthz, /readyz; 0: off")
    )
    metrics_host: str = field(
        default="0.0.0.0", metadata=_help("HTTP address for metrics and health")
    )
    log_level: str = field(default="INFO", metadata=_help("DEBUG, INFO, WARNING or ERROR"))
    engine: EngineConfig = field(default_factory=EngineConfig, metadata=_help("engine settings"))

    def __post_init__(self) -> None:
        # float64 predates the engine's dtype setting; either one selects the other.
        if self.float64 and self.engine.dtype != "fp64":
            if self.engine.dtype != "fp32":
                raise ConfigError(
                    f"float64 contradicts dtype {self.engine.dtype}: set one of them, or dtype fp64"
                )
            object.__setattr__(self, "engine", dataclasses.replace(self.engine, dtype="fp64"))
        object.__setattr__(self, "float64", self.engine.dtype == "fp64")
        positive = {
            "idle_timeout_sec": self.idle_timeout_sec,
            "max_streams": self.max_streams,
            "max_payload_bytes": self.max_payload_bytes,
            "max_chunk_sec": self.max_chunk_sec,
            "max_stream_id_length": self.max_stream_id_length,
            "max_stream_sec": self.max_stream_sec,
            "max_stream_buffered_sec": self.max_stream_buffered_sec,
            "max_gap_fill_sec": self.max_gap_fill_sec,
            "duplicate_window": self.duplicate_window,
            "max_dead_letter_original_bytes": self.max_dead_letter_original_bytes,
            "kafka_retry_sec": self.kafka_retry_sec,
            "max_clock_skew_sec": self.max_clock_skew_sec,
            "stall_exit_sec": self.stall_exit_sec,
            "recovery_timeout_sec": self.recovery_timeout_sec,
            "transaction_interval_ms": self.transaction_interval_ms,
            "transaction_timeout_ms": self.transaction_timeout_ms,
            "poll_timeout_ms": self.poll_timeout_ms,
            "shutdown_grace_sec": self.shutdown_grace_sec,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.poll_timeout_ms * 10 > self.max_poll_interval_ms:
            raise ConfigError("poll_timeout_ms must be far below max_poll_interval_ms")
        if self.max_streams_hard < self.max_streams:
            raise ConfigError(
                f"max_streams_hard ({self.max_streams_hard}) must be at least max_streams "
                f"({self.max_streams})"
            )
        if self.max_producer_restarts < 0:
            raise ConfigError(
                f"max_producer_restarts must be 0 or more, got {self.max_producer_restarts}"
            )
        if self.max_consumer_restarts < 0:
            raise ConfigError(
                f"max_consumer_restarts must be 0 or more, got {self.max_consumer_restarts}"
            )
        if self.consumer_restart_window_sec <= 0:
            raise ConfigError(
                "consumer_restart_window_sec must be positive, got "
                f"{self.consumer_restart_window_sec}"
            )
        per_call = self.max_stream_buffered_sec + self.max_gap_fill_sec + self.max_chunk_sec
        if per_call > self.engine.max_buffered_audio_sec:
            raise ConfigError(
                "max_stream_buffered_sec + max_gap_fill_sec + max_chunk_sec "
                f"({per_call:g} s) must not exceed the engine's max_buffered_audio_sec "
                f"({self.engine.max_buffered_audio_sec:g} s): a call could then fail for "
                "audio it was waiting to process"
            )
        if self.recovery_timeout_sec * 1000 <= self.transaction_timeout_ms:
            raise ConfigError(
                "recovery_timeout_sec must exceed transaction_timeout_ms: a new owner waits "
                "that long for a dead worker's transaction to end"
            )
        if self.torch_threads < 0:
            raise ConfigError(f"torch_threads must be 0 or more, got {self.torch_threads}")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"metrics_port must be 0..65535, got {self.metrics_port}")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(
                f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level}"
            )
        if self.schema_registry_url and not self.schema_registry_url.startswith(
            ("http://", "https://", "mock://")
        ):
            raise ConfigError(
                "schema_registry_url must start with http://, https:// or mock://, got "
                f"{self.schema_registry_url!r}"
            )
        try:
            parse_mode(self.channel_mode)
        except ValueError as exc:
            raise ConfigError(f"channel_mode: {exc}") from None
        topics = [self.input_topic, self.output_topic, self.dead_letter_topic, self.progress_topic]
        if len(set(topics)) != len(topics) or not all(topics):
            raise ConfigError(f"the four topics must be distinct and non-empty, got {topics}")


# -- loading ----------------------------------------------------------------------------------


def _fields() -> list[tuple[str, dataclasses.Field, bool]]:
    """(name, field, is_engine_field) for every setting."""
    out = [(f.name, f, False) for f in dataclasses.fields(WorkerConfig) if f.name != "engine"]
    out += [(f.name, f, True) for f in dataclasses.fields(EngineConfig)]
    return out


def _field_type(f: dataclasses.Field, owner: type) -> Any:
    hints = typing.get_type_hints(owner)
    return hints[f.name]


def _convert(name: str, kind: Any, raw: Any) -> Any:
    """A raw value (string from a flag or env var, or TOML data) as the field's type."""
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            lowered = str(raw).strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        origin = typing.get_origin(kind)
        if origin is tuple:
            items = raw if isinstance(raw, list | tuple) else str(raw).replace(" ", "").split(",")
            return tuple(int(x) for x in items)
        if isinstance(kind, type) and issubclass(kind, StrEnum):
            return kind(str(raw))
        if kind is Path:
            return Path(str(raw)).expanduser()
        if isinstance(kind, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        return kind(raw)
    except (ValueError, TypeError) as exc:
        allowed = ""
        if isinstance(kind, type) and issubclass(kind, StrEnum):
            allowed = f" (one of: {', '.join(m.value for m in kind)})"
        raise ConfigError(f"{name}: {exc}{allowed}") from exc


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """The ``run`` flags: one per setting, with its default and environment variable."""
    parser = argparse.ArgumentParser(description=description, add_help=True)
    parser.add_argument("--config", type=Path, help="TOML file with settings (flags and env win)")
    for name, f, is_engine in _fields():
        owner = EngineConfig if is_engine else WorkerConfig
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, tuple):
            default = ",".join(str(x) for x in default)
        text = f.metadata.get("help", "engine setting (see worker/engine/engine.py)")
        kind = _field_type(f, owner)
        choices = (
            f" {{{','.join(m.value for m in kind)}}}"
            if isinstance(kind, type) and issubclass(kind, StrEnum)
            else ""
        )
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            metavar=name.upper(),
            help=f"{text}{choices} [default: {default}; env {ENV_PREFIX}{name.upper()}]",
        )
    return parser


def load_config(
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> WorkerConfig:
    """Defaults ← file ← environment ← flags ← ``overrides`` (for tests), validated."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = getattr(args, "config", None) or environ.get(f"{ENV_PREFIX}CONFIG")
    if config_file:
        try:
            values.update(tomllib.loads(Path(config_file).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
    known = {name for name, _, _ in _fields()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown settings in {config_file}: {', '.join(unknown)}")
    for name in known:
        env = environ.get(f"{ENV_PREFIX}{name.upper()}")
        if env is not None:
            values[name] = env
        flag = getattr(args, name, None) if args is not None else None
        if flag is not None:
            values[name] = flag
    values.update(overrides or {})
    worker_kw: dict[str, Any] = {}
    engine_kw: dict[str, Any] = {}
    for name, f, is_engine in _fields():
        if name not in values:
            continue
        owner = EngineConfig if is_engine else WorkerConfig
        value = _convert(name, _field_type(f, owner), values[name])
        (engine_kw if is_engine else worker_kw)[name] = value
    try:
        engine = EngineConfig(**engine_kw)
        return WorkerConfig(engine=engine, **worker_kw)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


# The settings that put a worker into a deployment: where Kafka is, which topics, which group.
CONNECTION_SETTINGS = (
    "bootstrap_servers",
    "input_topic",
    "output_topic",
    "dead_letter_topic",
    "progress_topic",
    "group_id",
)


def to_flags(config: WorkerConfig, names: Sequence[str] = CONNECTION_SETTINGS) -> list[str]:
    """``python -m worker run`` flags that reproduce the settings ``names`` of ``config``."""
    return [
        arg for name in names for arg in (f"--{name.replace('_', '-')}", str(getattr(config, name)))
    ]


def describe(config: WorkerConfig) -> Sequence[str]:
    """One line per setting, for the start-up log."""
    lines = [
        f"{f.name}={getattr(config, f.name)}"
        for f in dataclasses.fields(config)
        if f.name != "engine"
    ]
    lines += [
        f"engine.{f.name}={getattr(config.engine, f.name)}"
        for f in dataclasses.fields(config.engine)
    ]
    return lines
