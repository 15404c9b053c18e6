"""``python -m producer_tools stream | load | tail | conversation``: publish calls, read events.

Exit codes: 0 done, 1 failed at run time (unreadable file, Kafka error), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from producer_tools.producer import (
    DEFAULT_CHUNK_MS,
    DEFAULT_TOPIC,
    MAX_CHUNK_MS,
    MIN_CHUNK_MS,
    ProducerError,
)
from schemas import WireFormat
from worker.audio import SUPPORTED_SAMPLE_RATES, Encoding

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_TRANSCRIPT_TOPIC = "call-transcripts"
EXIT_FAILED = 1
EXIT_USAGE = 2
_ENCODING_ALIASES = {
    "pcm": Encoding.PCM_S16LE,
    "s16le": Encoding.PCM_S16LE,
    "pcm_s16le": Encoding.PCM_S16LE,
    "mulaw": Encoding.PCM_MULAW,
    "ulaw": Encoding.PCM_MULAW,
    "pcm_mulaw": Encoding.PCM_MULAW,
    "alaw": Encoding.PCM_ALAW,
    "pcm_alaw": Encoding.PCM_ALAW,
}
_RATES = ", ".join(str(r) for r in sorted(SUPPORTED_SAMPLE_RATES))


class UsageError(Exception):
    """Arguments that parse but do not make sense together."""


# -- argument types -------------------------------------------------------------------------------


def _encoding(text: str) -> Encoding:
    try:
        return _ENCODING_ALIASES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown encoding {text!r}: use pcm (16-bit linear), mulaw or alaw"
        ) from None


def _chunk_ms(text: str) -> int:
    value = _int(text)
    if not MIN_CHUNK_MS <= value <= MAX_CHUNK_MS:
        raise argparse.ArgumentTypeError(f"must be {MIN_CHUNK_MS}..{MAX_CHUNK_MS} ms, got {value}")
    return value


def _sample_rate(text: str) -> int:
    value = _int(text)
    if value not in SUPPORTED_SAMPLE_RATES:
        raise argparse.ArgumentTypeError(f"{value} Hz is not one the worker takes: {_RATES}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _metadata(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


# -- commands -------------------------------------------------------------------------------------


def _producer(args: argparse.Namespace):
    from producer_tools.producer import AudioChunkProducer

    producer = AudioChunkProducer(
        args.bootstrap_servers,
        args.topic,
        schema_registry_url=args.schema_registry_url,
        wire_format=WireFormat(args.wire_format),
        chunk_ms=args.chunk_ms,
    )
    producer.check_topic()
    return producer


def cmd_stream(args: argparse.Namespace) -> int:
    """Publish each file as one call."""
    from producer_tools.audio_files import publish_rate, read_audio, resample
    from producer_tools.pacing import PacedCall, run_paced

    if args.stream_id and len(args.files) != 1:
        raise UsageError("--stream-id names one call: give exactly one file with it")
    files = [read_audio(path) for path in args.files]  # every file checked before any is sent
    producer = _producer(args)
    calls = []
    for audio in files:
        rate = publish_rate(audio.sample_rate, args.sample_rate)
        stream_id = args.stream_id or f"{audio.path.stem}-{uuid.uuid4().hex[:8]}"
        stream = producer.open_stream(
            stream_id,
            sample_rate=rate,
            encoding=args.encoding.value,
            channels=audio.channels,
            metadata=dict(args.metadata or []) | {"source_file": audio.path.name},
        )
        calls.append(PacedCall(stream, resample(audio.frames, audio.sample_rate, rate)))
        print(f"{stream_id}\t{audio.path}", flush=True)
        _note(
            args,
            f"{audio.path}: {audio.duration_s:.1f} s, {audio.channels} channel(s), "
            f"{audio.sample_rate} Hz → {stream_id} ({args.encoding.value} at {rate} Hz, "
            f"{args.chunk_ms} ms chunks)",
        )
    pace = "as fast as possible" if args.speed == 0 else f"at {args.speed:g}x real time"
    _note(args, f"publishing {len(calls)} call(s) to {args.topic} {pace}…")
    report = run_paced(
        calls,
        speed=args.speed,
        progress=None if args.quiet else sys.stderr,
        progress_sec=args.progress_sec,
    )
    _note(args, f"published {report.summary()}")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    """N concurrent calls with staggered starts; prints the achieved rate."""
    from producer_tools.audio_files import publish_rate, read_audio, resample
    from producer_tools.pacing import PacedCall, run_paced

    if args.files:
        pool = [(a.path.stem, a.frames, a.sample_rate) for a in map(read_audio, args.files)]
    else:
        from producer_tools.conversation import default_conversations

        pool = [(n, c.audio[:, None], c.sample_rate) for n, c in default_conversations().items()]
    producer = _producer(args)
    calls = []
    for i, (name, frames, file_rate) in zip(range(args.calls), itertools.cycle(pool)):
        rate = publish_rate(file_rate, args.sample_rate)
        stream = producer.open_stream(
            f"{args.prefix}-{i}",
            sample_rate=rate,
            encoding=args.encoding.value,
            channels=frames.shape[1],
            metadata={"load_source": name},
        )
        calls.append(PacedCall(stream, resample(frames, file_rate, rate), i * args.stagger_sec))
    _note(
        args,
        f"publishing {len(calls)} call(s) to {args.topic}, starts {args.stagger_sec:g} s apart, "
        f"{'as fast as possible' if args.speed == 0 else f'at {args.speed:g}x real time'}…",
    )
    report = run_paced(
        calls,
        speed=args.speed,
        progress=None if args.quiet else sys.stderr,
        progress_sec=args.progress_sec,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "calls": report.calls,
                    "chunks": report.chunks,
                    "audio_s": report.audio_s,
                    "wall_s": report.wall_s,
                    "chunks_per_s": report.chunks_per_s,
                    "audio_s_per_wall_s": report.audio_per_wall,
                    "max_concurrent": report.max_concurrent,
                    "stream_ids": [c.stream.stream_id for c in calls],
                }
            )
        )
    else:
        print(report.summary())
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    """Print committed transcript events as they arrive."""
    from producer_tools.tail import JsonLines, LiveView, PlainLines, follow

    from_beginning = args.start == "earliest" or (args.start is None and args.stream is not None)
    tty = sys.stdout.isatty()
    if args.json:
        view = JsonLines(sys.stdout)
    elif tty and not args.plain:
        view = LiveView(sys.stdout, colour=args.colour != "never")
    else:
        view = PlainLines(sys.stdout, partials=args.partials)
    try:
        for event in follow(
            args.bootstrap_servers,
            args.topic,
            stream_id=args.stream,
            from_beginning=from_beginning,
            stop_at_stream_end=args.stream is not None and not args.follow,
            idle_timeout_sec=args.idle_timeout_sec or None,
            schema_registry_url=args.schema_registry_url,
            wire_format=WireFormat(args.wire_format),
        ):
            view.show(event)
    except KeyboardInterrupt:
        pass
    finally:
        view.close()
    return 0


def cmd_conversation(args: argparse.Namespace) -> int:
    """Write a canned synthetic conversation to a WAV file."""
    from producer_tools.conversation import default_conversations, write_wav

    conv = default_conversations()[args.conversation]
    write_wav(args.out, conv.audio, conv.sample_rate)
    for turn in conv.turns:
        print(f"[{turn.start_s:6.2f}–{turn.end_s:6.2f}] speaker {turn.speaker}: {turn.text}")
    return 0


def _note(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


# -- parser ---------------------------------------------------------------------------------------


def _kafka_flags(p: argparse.ArgumentParser, topic: str, what: str) -> None:
    p.add_argument(
        "--bootstrap-servers",
        default=DEFAULT_BOOTSTRAP,
        help=f"Kafka bootstrap servers, host:port[,host:port] (default: {DEFAULT_BOOTSTRAP})",
    )
    p.add_argument("--topic", default=topic, help=f"{what} (default: {topic})")
    p.add_argument(
        "--schema-registry-url",
        default="",
        metavar="URL",
        help="Confluent Schema Registry (http(s)://host:port): records framed with registered "
        "schema ids, as a worker run with the same option expects. Default: plain Avro",
    )
    p.add_argument(
        "--wire-format",
        default=WireFormat.PLAIN.value,
        choices=[w.value for w in WireFormat],
        help="without a registry: plain Avro (the worker's default) or confluent framing with "
        "the worker's fixed schema ids (default: plain)",
    )


def _audio_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--chunk-ms",
        type=_chunk_ms,
        default=DEFAULT_CHUNK_MS,
        metavar="MS",
        help=f"audio per record, {MIN_CHUNK_MS}..{MAX_CHUNK_MS} ms (default: {DEFAULT_CHUNK_MS})",
    )
    p.add_argument(
        "--encoding",
        type=_encoding,
        default=Encoding.PCM_S16LE,
        metavar="{pcm,mulaw,alaw}",
        help="payload encoding: pcm (16-bit linear), mulaw or alaw (G.711) (default: pcm)",
    )
    p.add_argument(
        "--sample-rate",
        type=_sample_rate,
        default=None,
        metavar="HZ",
        help=f"resample to this rate before sending, e.g. 8000 for telephony; one of {_RATES} "
        "(default: the file's rate if the worker takes it, else 16000)",
    )
    p.add_argument(
        "--speed",
        type=_non_negative,
        default=1.0,
        metavar="X",
        help="pace: 1 sends like a live call (real time), 2 twice as fast, 0 as fast as Kafka "
        "takes them (default: 1)",
    )
    p.add_argument(
        "--progress-sec",
        type=_non_negative,
        default=5.0,
        metavar="S",
        help="print progress to stderr every S seconds (default: 5)",
    )
    p.add_argument("--quiet", action="store_true", help="no notes or progress on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m producer_tools",
        description="Publish call audio to Kafka as AudioChunk records and read the "
        "TranscriptEvent records the worker writes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "stream",
        help="publish audio files, one call per file",
        description="Publish each audio file as one call (one stream id per file), at live "
        "pace by default. WAV, FLAC and OGG are read with soundfile; other formats (MP3, M4A, "
        "…) through ffmpeg when it is installed. Stereo files stay two channels. Prints "
        "'STREAM_ID<TAB>FILE' per file on stdout.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="audio file(s) to publish")
    _kafka_flags(p, DEFAULT_TOPIC, "topic of AudioChunk records")
    _audio_flags(p)
    p.add_argument(
        "--stream-id",
        default=None,
        help="stream id of the call (one file only; default: <file stem>-<8 random hex>)",
    )
    p.add_argument(
        "--metadata",
        type=_metadata,
        action="append",
        metavar="KEY=VALUE",
        help="call attribute sent on the first chunk, e.g. tenant=acme (repeatable)",
    )
    p.set_defaults(handler=cmd_stream)

    p = sub.add_parser(
        "load",
        help="many concurrent calls with staggered starts; reports the achieved rate",
        description="Generate load: --calls concurrent calls drawn in turn from --files (or "
        "the four canned synthetic conversations), each starting --stagger-sec after the "
        "previous, paced by --speed. Prints the achieved rate (JSON with --json).",
    )
    _kafka_flags(p, DEFAULT_TOPIC, "topic of AudioChunk records")
    _audio_flags(p)
    p.add_argument(
        "--calls", type=_positive_int, default=8, help="number of calls to send (default: 8)"
    )
    p.add_argument(
        "--stagger-sec",
        type=_non_negative,
        default=0.5,
        metavar="S",
        help="audio time between call starts (default: 0.5)",
    )
    p.add_argument(
        "--files", nargs="+", metavar="FILE", help="audio files to draw calls from, in turn"
    )
    p.add_argument(
        "--prefix",
        default=f"load-{uuid.uuid4().hex[:8]}",
        help="stream ids are PREFIX-0, PREFIX-1, … (default: load-<8 random hex>)",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(handler=cmd_load)

    p = sub.add_parser(
        "tail",
        help="follow committed transcript events",
        description="Follow the transcript topic with a read_committed consumer. On a "
        "terminal: a live view, each speaker in a colour, partials rewritten in place until "
        "their final arrives. Piped: one line per final. --json: one JSON object per event.",
    )
    _kafka_flags(p, DEFAULT_TRANSCRIPT_TOPIC, "topic of TranscriptEvent records")
    p.add_argument("--stream", metavar="STREAM_ID", help="only this call; exit at its end")
    p.add_argument("--json", action="store_true", help="one JSON object per event (all kinds)")
    p.add_argument(
        "--start",
        choices=["earliest", "latest"],
        default=None,
        help="where to start reading (default: earliest with --stream, else latest)",
    )
    p.add_argument(
        "--follow",
        action="store_true",
        help="with --stream: keep following after the call's end (a reused stream id)",
    )
    p.add_argument(
        "--idle-timeout-sec",
        type=_non_negative,
        default=0.0,
        metavar="S",
        help="exit after S seconds without an event (default: 0, never)",
    )
    p.add_argument("--partials", action="store_true", help="piped output: print partials too")
    p.add_argument("--plain", action="store_true", help="plain lines even on a terminal")
    p.add_argument(
        "--colour",
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="colour the live view per speaker (default: auto)",
    )
    p.set_defaults(handler=cmd_tail)

    from producer_tools.conversation import DEFAULT_SCRIPTS

    p = sub.add_parser(
        "conversation",
        help="write a canned synthetic conversation to a WAV file",
        description="Write one of the canned espeak-ng conversations to a 16 kHz WAV file and "
        "print its reference turns.",
    )
    p.add_argument("conversation", choices=sorted(DEFAULT_SCRIPTS), help="which conversation")
    p.add_argument("out", type=Path, help="WAV file to write")
    p.set_defaults(handler=cmd_conversation)

    from producer_tools.web.cli import add_parser as add_web_parser

    add_web_parser(sub, lambda p: _kafka_flags(p, DEFAULT_TOPIC, "topic of AudioChunk records"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from producer_tools.audio_files import AudioFileError
    from producer_tools.tail import TailError

    try:
        return args.handler(args)
    except UsageError as exc:
        parser.error(str(exc))
    except (AudioFileError, ProducerError, TailError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_USAGE  # not reached: parser.error exits


if __name__ == "__main__":
    sys.exit(main())
