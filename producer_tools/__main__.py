"""``python -m producer_tools stream | load | tail | synth | score | conversation``.

Publish calls, read transcript events, make synthetic calls with references, score transcripts.

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

from confluent_kafka import KafkaException

from producer_tools.producer import (
    DEFAULT_CHUNK_MS,
    DEFAULT_TOPIC,
    MAX_CHUNK_MS,
    MIN_CHUNK_MS,
    ProducerError,
)
from schemas import CodecError, RegistryUnavailable, WireFormat
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


def _probability(text: str) -> float:
    value = _non_negative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be 0..1, got {value}")
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


def cmd_synth(args: argparse.Namespace) -> int:
    """Make a synthetic call and its references."""
    from producer_tools.synth import SynthError, SynthPaths, SynthSpec, make_call, write_call

    try:
        spec = SynthSpec(
            speakers=args.speakers,
            turns=args.turns,
            seed=args.seed,
            overlap_probability=args.overlap_prob,
            overlap_s=args.overlap_sec,
            gap_s=args.gap_sec,
            stereo=args.stereo,
            telephone=args.telephone,
            speed_wpm=args.speed_wpm,
        )
        paths = SynthPaths.beside(args.out, args.transcript, args.rttm)
        paths.check(spec)  # before any synthesis
    except SynthError as exc:
        raise UsageError(str(exc)) from None

    def progress(done: int, total: int, voice: str) -> None:
        _note(args, f"synthesising turn {done + 1}/{total} ({voice})…")

    call = make_call(spec, args.recording or paths.audio.stem, progress=progress)
    write_call(call, paths)
    for path in (paths.audio, paths.transcript, paths.rttm):
        print(path, flush=True)
    overlaps = _overlaps(call.reference.turns)
    _note(
        args,
        f"{paths.audio}: {call.duration_s:.1f} s, {spec.speakers} speaker(s), "
        f"{len(call.reference.turns)} turns ({overlaps} overlapping), "
        f"{spec.channels} channel(s) at {spec.sample_rate} Hz"
        f"{' μ-law' if spec.telephone else ''}, seed {spec.seed}",
    )
    return 0


def _overlaps(turns) -> int:
    """Turns that start before an earlier turn has ended."""
    latest_end, count = 0.0, 0
    for turn in turns:
        count += turn.start_s < latest_end
        latest_end = max(latest_end, turn.end_s)
    return count


def cmd_score(args: argparse.Namespace) -> int:
    """Score one call's finals against its references."""
    from producer_tools.reference import read_rttm, read_transcript
    from producer_tools.score import (
        hypothesis_from_events,
        read_dump,
        read_topic,
        score,
        write_report,
    )

    if args.reference is None and args.rttm is None:
        raise UsageError("give --reference (WER, cpWER, DER) and/or --rttm (DER)")
    if args.events is None and args.stream is None:
        raise UsageError("give --events FILE (a tail --json dump) or --stream ID to read the topic")
    transcript = read_transcript(args.reference) if args.reference else None
    rttm = read_rttm(args.rttm, args.recording) if args.rttm else None
    if args.events is not None:
        events = read_dump(sys.stdin if str(args.events) == "-" else args.events)
    else:
        _note(args, f"reading {args.topic} for stream {args.stream} (read_committed)…")
        events = read_topic(
            args.bootstrap_servers,
            args.topic,
            args.stream,
            timeout_s=args.timeout_sec,
            schema_registry_url=args.schema_registry_url,
            wire_format=WireFormat(args.wire_format),
            progress=None if args.quiet else sys.stderr,
        )
    hypothesis = hypothesis_from_events(events, args.stream)
    if not hypothesis.ended:
        _note(
            args, f"warning: no STREAM_END for {hypothesis.stream_id}: scoring the finals there are"
        )
    report = score(
        hypothesis, transcript, rttm, collar_s=args.collar, normalize=not args.no_normalize
    )
    write_report(report, sys.stdout, as_json=args.json)
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
        description="Publish call audio to Kafka as AudioChunk records, read the "
        "TranscriptEvent records the worker writes, make synthetic calls with reference "
        "transcripts and score transcripts against them.",
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

    from producer_tools.synth import MAX_SPEAKERS, SynthSpec

    d = SynthSpec()
    p = sub.add_parser(
        "synth",
        help="make a synthetic multi-speaker call with its reference transcript and RTTM",
        description="Synthesise a call with espeak-ng voices taking turns (speakers A, B, … "
        "introduced in order, then the floor passes at random), some turns overlapping, and "
        "write the audio, a reference transcript (JSON: per turn speaker, start, end, text) "
        "and the speaker turns (RTTM). The same options and --seed give the same bytes. "
        "Prints the three paths on stdout. Needs espeak-ng (apt-get install espeak-ng).",
    )
    p.add_argument("out", type=Path, help="audio file to write: .wav or .flac")
    p.add_argument(
        "--speakers",
        type=_positive_int,
        default=d.speakers,
        help=f"number of voices, 1..{MAX_SPEAKERS}; the worker's diarizer tells up to 4 apart "
        f"(default: {d.speakers})",
    )
    p.add_argument(
        "--turns", type=_positive_int, default=d.turns, help=f"turns in all (default: {d.turns})"
    )
    p.add_argument(
        "--seed",
        type=_int,
        default=d.seed,
        help=f"picks sentences, speakers, overlaps (default: {d.seed})",
    )
    p.add_argument(
        "--overlap-prob",
        type=_probability,
        default=d.overlap_probability,
        metavar="P",
        help="chance that a change of speaker talks over the end of the previous turn "
        f"(default: {d.overlap_probability})",
    )
    p.add_argument(
        "--overlap-sec",
        type=_non_negative,
        default=d.overlap_s,
        metavar="S",
        help=f"length of such an overlap (default: {d.overlap_s})",
    )
    p.add_argument(
        "--gap-sec",
        type=_non_negative,
        default=d.gap_s,
        metavar="S",
        help=f"silence between turns that do not overlap (default: {d.gap_s})",
    )
    p.add_argument(
        "--stereo",
        action="store_true",
        help="one party per channel: A, C, E left; B, D, F right (default: mono mix)",
    )
    p.add_argument(
        "--telephone",
        action="store_true",
        help="telephone band: 300-3400 Hz, 8 kHz, G.711 μ-law WAV (default: 16 kHz 16-bit PCM)",
    )
    p.add_argument(
        "--speed-wpm",
        type=_positive_int,
        default=d.speed_wpm,
        metavar="WPM",
        help=f"speaking rate, words per minute, 80..450 (default: {d.speed_wpm})",
    )
    p.add_argument(
        "--transcript",
        type=Path,
        metavar="PATH",
        help="reference transcript to write (default: OUT with suffix .json)",
    )
    p.add_argument(
        "--rttm", type=Path, metavar="PATH", help="RTTM to write (default: OUT with suffix .rttm)"
    )
    p.add_argument(
        "--recording",
        metavar="NAME",
        help="recording name in the references (default: the stem of OUT)",
    )
    p.add_argument("--quiet", action="store_true", help="no notes or progress on stderr")
    p.set_defaults(handler=cmd_synth)

    p = sub.add_parser(
        "score",
        help="WER, cpWER and DER of a call's transcript against its references",
        description="Score one call's FINAL segments, read from the transcript topic "
        "(--stream, read_committed, waits for the call's STREAM_END) or from a JSON dump such "
        "as 'tail --json' writes (--events), against a reference transcript (--reference, as "
        "synth writes: WER, cpWER, and DER from its turns) and/or an RTTM (--rttm: DER). WER "
        "ignores speakers; cpWER (meeteval) pairs speakers to minimise word errors; DER "
        "(pyannote.metrics) is missed + false alarm + confusion over reference speech. Words "
        "are compared lowercased without punctuation. Prints a table, or JSON with --json.",
    )
    _kafka_flags(p, DEFAULT_TRANSCRIPT_TOPIC, "topic of TranscriptEvent records")
    p.add_argument("--reference", type=Path, metavar="JSON", help="reference transcript")
    p.add_argument("--rttm", type=Path, metavar="RTTM", help="reference speaker turns")
    p.add_argument(
        "--recording",
        metavar="NAME",
        help="which recording of a multi-recording RTTM (default: its only one)",
    )
    p.add_argument(
        "--events",
        metavar="FILE",
        help="transcript events as JSON lines or a JSON array; - reads stdin",
    )
    p.add_argument(
        "--stream",
        metavar="STREAM_ID",
        help="the call to score: read from the topic, or picked from a dump of several calls",
    )
    p.add_argument(
        "--timeout-sec",
        type=_non_negative,
        default=60.0,
        metavar="S",
        help="topic: give up when no event of the call comes for S seconds before its end "
        "(default: 60)",
    )
    p.add_argument(
        "--collar",
        type=_non_negative,
        default=0.0,
        metavar="S",
        help="DER: S seconds centred on each reference boundary are not scored "
        "(pyannote's convention; md-eval's -c 0.25 is --collar 0.5) (default: 0)",
    )
    p.add_argument(
        "--no-normalize",
        action="store_true",
        help="compare words as written (case and punctuation count)",
    )
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no notes or progress on stderr")
    p.set_defaults(handler=cmd_score)

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
    from producer_tools.conversation import EspeakError
    from producer_tools.reference import ReferenceError
    from producer_tools.score import ScoreError
    from producer_tools.synth import SynthError
    from producer_tools.tail import TailError

    try:
        return args.handler(args)
    except UsageError as exc:
        parser.error(str(exc))
    except (
        AudioFileError,
        EspeakError,
        ProducerError,
        ReferenceError,
        ScoreError,
        SynthError,
        TailError,
        CodecError,
        RegistryUnavailable,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KafkaException as exc:  # one line, not a traceback
        error = exc.args[0] if exc.args else exc
        print(f"error: Kafka: {getattr(error, 'str', lambda: error)()}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_USAGE  # not reached: parser.error exits


if __name__ == "__main__":
    sys.exit(main())
