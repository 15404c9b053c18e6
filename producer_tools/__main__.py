"""``python -m producer_tools stream | load | tail | conversation``."""

from __future__ import annotations

import argparse
import sys
import time

from schemas import AudioEncoding, WireFormat


def _producer(bootstrap: str):
    from confluent_kafka import Producer

    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})


def cmd_stream(args: argparse.Namespace) -> int:
    """Publish a WAV file (or a synthetic conversation) as one live call."""
    from producer_tools.conversation import default_conversations, read_wav
    from producer_tools.stream import CallAudio, publish, to_chunks

    if args.wav:
        audio, rate = read_wav(args.wav)
        if audio.ndim > 1:
            audio = audio.mean(axis=1)
    else:
        conv = default_conversations()[args.conversation]
        audio, rate = conv.audio, conv.sample_rate
    chunks = to_chunks(
        CallAudio(args.stream_id, audio, rate),
        chunk_ms=args.chunk_ms,
        encoding=AudioEncoding(args.encoding),
        sample_rate=args.sample_rate,
    )
    print(
        f"publishing {len(chunks)} chunks of {args.chunk_ms} ms as {args.stream_id!r} "
        f"to {args.topic}{' in real time' if args.realtime else ''}…",
        file=sys.stderr,
    )
    sent = publish(
        _producer(args.bootstrap_servers),
        args.topic,
        chunks,
        realtime=args.realtime,
        wire_format=WireFormat(args.wire_format),
    )
    print(f"published {sent} chunks", file=sys.stderr)
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    """Many concurrent synthetic calls, in real time, starting ``--stagger-sec`` apart."""
    from producer_tools.conversation import default_conversations
    from producer_tools.stream import CallAudio, interleave, publish, to_chunks

    convs = list(default_conversations().values())
    now = int(time.time() * 1000)
    streams = [
        to_chunks(
            CallAudio(f"{args.prefix}-{i}", convs[i % len(convs)].audio),
            chunk_ms=args.chunk_ms,
            start_ms=now + int(i * args.stagger_sec * 1000),
        )
        for i in range(args.calls)
    ]
    total = sum(len(s) for s in streams)
    print(
        f"publishing {args.calls} calls ({total} chunks) to {args.topic} in real time…",
        file=sys.stderr,
    )
    publish(_producer(args.bootstrap_servers), args.topic, interleave(streams), realtime=True)
    print("done", file=sys.stderr)
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    """Print transcript events as they are committed."""
    from producer_tools.stream import format_event, read_events

    for event in read_events(
        args.bootstrap_servers,
        args.topic,
        timeout_s=args.timeout_sec,
        wire_format=WireFormat(args.wire_format),
    ):
        if args.partials or event.kind != "PARTIAL":
            print(format_event(event, max_text=args.max_text), flush=True)
    return 0


def cmd_conversation(args: argparse.Namespace) -> int:
    """Write a synthetic conversation to a WAV file."""
    from producer_tools.conversation import default_conversations, write_wav

    conv = default_conversations()[args.conversation]
    write_wav(args.out, conv.audio, conv.sample_rate)
    for turn in conv.turns:
        print(f"[{turn.start_s:6.2f}–{turn.end_s:6.2f}] speaker {turn.speaker}: {turn.text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m producer_tools", description="Publish call audio and read transcripts."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, topic: str) -> None:
        p.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
        p.add_argument("--topic", default=topic)
        p.add_argument("--wire-format", default="plain", choices=[w.value for w in WireFormat])

    names = ["billing", "appointment", "delivery", "transfer"]
    p = sub.add_parser("stream", help="publish one call (WAV file or synthetic conversation)")
    common(p, "call-audio")
    p.add_argument("--wav", help="16-bit PCM WAV file; default: a synthetic conversation")
    p.add_argument("--conversation", default="billing", choices=names)
    p.add_argument("--stream-id", default=f"call-{int(time.time())}")
    p.add_argument("--chunk-ms", type=int, default=200)
    p.add_argument(
        "--encoding",
        default="PCM_S16LE",
        choices=[e.value for e in AudioEncoding if e.value != "UNKNOWN"],
    )
    p.add_argument("--sample-rate", type=int, default=None, help="resample before sending")
    p.add_argument("--realtime", action="store_true", help="pace chunks like a live call")
    p = sub.add_parser("load", help="many concurrent synthetic calls in real time")
    common(p, "call-audio")
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--stagger-sec", type=float, default=0.5)
    p.add_argument("--chunk-ms", type=int, default=200)
    p.add_argument("--prefix", default=f"load-{int(time.time())}")
    p = sub.add_parser("tail", help="print transcript events as they are committed")
    common(p, "call-transcripts")
    p.add_argument("--partials", action="store_true", help="also print PARTIAL revisions")
    p.add_argument("--timeout-sec", type=float, default=3600, help="stop after this long idle")
    p.add_argument("--max-text", type=int, default=0, help="shorten texts to this many characters")
    p = sub.add_parser("conversation", help="write a synthetic conversation to a WAV file")
    p.add_argument("conversation", choices=names)
    p.add_argument("out")
    args = parser.parse_args(argv)
    handlers = {
        "stream": cmd_stream,
        "load": cmd_load,
        "tail": cmd_tail,
        "conversation": cmd_conversation,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
