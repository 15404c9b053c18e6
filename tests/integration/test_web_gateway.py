"""The web gateway's limits and teardown, against a running gateway and the real broker.

The gateway runs under uvicorn on a thread of this process (so a test can see its relay
threads); clients are plain websocket clients that send what a page would, or what a page
must not. Every wait is for an observed condition, with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace

import pytest
import uvicorn
from confluent_kafka import Consumer, KafkaError, Producer
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from producer_tools.web.app import uvicorn_config
from producer_tools.web.settings import GatewaySettings
from schemas import AudioChunk, EventKind, RecordCodec, TranscriptEvent

pytestmark = pytest.mark.slow

WAIT_S = 60.0  # for anything Kafka or the gateway should do in well under a second
TONE_CHUNK = b"\x10\x00\xf0\xff" * 1600  # 200 ms of 16 kHz PCM (3200 samples)


class RunningGateway:
    """``producer_tools.web`` under uvicorn on a thread, on a free port."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.server = uvicorn.Server(uvicorn_config(settings, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="gateway", daemon=True)

    def __enter__(self) -> RunningGateway:
        self.thread.start()
        wait_for(lambda: self.server.started, "the gateway to listen")
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the gateway did not stop"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connect(self, origin: str | None = "own", **query: str) -> ClientConnection:
        params = "&".join(f"{k}={v}" for k, v in query.items())
        return connect(
            f"ws://127.0.0.1:{self.port}/ws" + (f"?{params}" if params else ""),
            origin=self.origin if origin == "own" else origin,
            max_size=None,
            open_timeout=WAIT_S,
        )

    def sessions(self) -> int:
        with urllib.request.urlopen(f"{self.origin}/healthz", timeout=WAIT_S) as response:
            return json.loads(response.read())["sessions"]


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def receive(ws: ClientConnection) -> dict:
    return json.loads(ws.recv(timeout=WAIT_S))


def messages_until_closed(ws: ClientConnection) -> tuple[list[dict], int]:
    """Every message until the gateway closes the socket, and its close code."""
    messages: list[dict] = []
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            messages.append(json.loads(ws.recv(timeout=WAIT_S)))
    assert closed.value.rcvd is not None, "the connection dropped without a close frame"
    return messages, closed.value.rcvd.code


def closed_with(ws: ClientConnection) -> tuple[int, str]:
    """Read until the gateway closes the socket; its close code and reason."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=WAIT_S)
    received = closed.value.rcvd
    assert received is not None, "the connection dropped without a close frame"
    return received.code, received.reason


def relay_threads(stream_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"relay-{stream_id}"]


@pytest.fixture
def topics(new_topic) -> tuple[str, str]:
    return new_topic(partitions=2), new_topic(partitions=2)


@pytest.fixture
def settings(kafka_bootstrap, topics) -> GatewaySettings:
    audio, transcripts = topics
    return GatewaySettings(
        bootstrap_servers=kafka_bootstrap,
        audio_topic=audio,
        transcript_topic=transcripts,
        port=0,
        end_wait_sec=WAIT_S,
    )


@contextmanager
def gateway(settings: GatewaySettings, **limits) -> Iterator[RunningGateway]:
    with RunningGateway(replace(settings, **limits)) as running:
        yield running


def chunks_of(bootstrap: str, topic: str, stream_id: str) -> list[AudioChunk]:
    """The stream's chunks on ``topic``, read until its end_of_stream (which must come)."""
    codec = RecordCodec(AudioChunk)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    chunks: list[AudioChunk] = []
    deadline = time.monotonic() + WAIT_S
    try:
        while not (chunks and chunks[-1].end_of_stream):
            assert time.monotonic() < deadline, f"no end_of_stream for {stream_id}: {chunks}"
            msg = consumer.poll(0.2)
            if msg is None or (msg.error() and msg.error().code() == KafkaError._PARTITION_EOF):
                continue
            if msg.key() == stream_id.encode():
                chunks.append(codec.decode(msg.value()))
    finally:
        consumer.close()
    return chunks


def transcript_event(sid: str, kind: EventKind, index: int, text: str = "") -> bytes:
    """A TranscriptEvent record as a worker would write it."""
    value = TranscriptEvent(
        event_id=uuid.uuid4().hex,
        stream_id=sid,
        kind=kind,
        segment_index=index,
        revision=0,
        speaker=None if kind is EventKind.STREAM_END else "speaker_0",
        start_s=0.0,
        end_s=1.0,
        start_time_ms=0,
        end_time_ms=1000,
        text=text,
        words=(),
        first_sequence=0,
        last_sequence=1,
        diarizer_model="d",
        asr_model="a",
    )
    return RecordCodec(TranscriptEvent).encode(value)


def publish_events(settings: GatewaySettings, *events: tuple) -> None:
    """Publish ``(stream_id, kind, index, text)`` events to the transcript topic, flushed."""
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for sid, kind, index, text in events:
        producer.produce(
            settings.transcript_topic,
            key=sid.encode(),
            value=transcript_event(sid, kind, index, text),
        )
    assert producer.flush(WAIT_S) == 0


def assert_torn_down(running: RunningGateway, stream_id: str) -> list[AudioChunk]:
    """End-of-stream published, the relay's consumer closed, the slot free; the chunks."""
    chunks = chunks_of(running.settings.bootstrap_servers, running.settings.audio_topic, stream_id)
    assert [c.sequence for c in chunks] == list(range(len(chunks)))
    assert [c.end_of_stream for c in chunks].count(True) == 1
    wait_for(lambda: not relay_threads(stream_id), f"{stream_id}'s relay thread to end")
    wait_for(lambda: running.sessions() == 0, "the session slot to be released")
    return chunks


# -- origin -----------------------------------------------------------------------------------


def test_a_page_from_another_origin_is_refused_with_a_message(settings) -> None:
    with gateway(settings, allowed_origins=("http://demo.example",)) as running:
        with running.connect(origin="http://evil.example") as ws:
            error = receive(ws)
            code, reason = closed_with(ws)
        assert error["type"] == "error" and error["code"] == "origin_not_allowed"
        assert "http://evil.example" in error["message"]
        assert code == 1008 and "may not use this gateway" in reason
        assert running.sessions() == 0
        # The gateway's own origin, and one allowed by name, get a session.
        for origin in ("own", "http://demo.example"):
            with running.connect(origin=origin) as ws:
                ready = receive(ws)
                assert ready["type"] == "ready", ready
            assert_torn_down(running, ready["stream_id"])


def test_dns_rebinding_and_a_missing_origin_are_refused(settings) -> None:
    """A page on rebind.example (resolving to 127.0.0.1) sends a Host and an Origin that
    agree; the gateway, bound to 127.0.0.1, does not take that name for its own."""
    with gateway(settings) as running:
        name = f"rebind.example:{running.port}"
        sock = socket.create_connection(("127.0.0.1", running.port), timeout=WAIT_S)
        with connect(
            f"ws://{name}/ws", sock=sock, origin=f"http://{name}", open_timeout=WAIT_S
        ) as ws:
            error = receive(ws)
            code, _reason = closed_with(ws)
        assert error["code"] == "origin_not_allowed" and code == 1008
        with running.connect(origin=None) as ws:
            error = receive(ws)
            code, _reason = closed_with(ws)
        assert error["code"] == "origin_missing" and "--allow-no-origin" in error["message"]
        assert code == 1008 and running.sessions() == 0
        # localhost is the same loopback gateway.
        with running.connect(origin=f"http://localhost:{running.port}") as ws:
            ready = receive(ws)
            assert ready["type"] == "ready", ready
        assert_torn_down(running, ready["stream_id"])
    with gateway(settings, allow_no_origin=True) as running:
        with running.connect(origin=None) as ws:
            ready = receive(ws)
            assert ready["type"] == "ready", ready
        assert_torn_down(running, ready["stream_id"])


# -- sessions -------------------------------------------------------------------------------


def test_one_session_too_many_is_refused_until_one_ends(settings) -> None:
    with gateway(settings, max_sessions=2) as running, ExitStack() as open_sockets:
        first = open_sockets.enter_context(running.connect())
        second = open_sockets.enter_context(running.connect())
        ids = [receive(first)["stream_id"], receive(second)["stream_id"]]
        assert ids[0] != ids[1]
        with running.connect() as third:
            error = receive(third)
            code, _reason = closed_with(third)
        assert error["code"] == "too_many_sessions" and "all 2 session(s)" in error["message"]
        assert code == 1013
        first.close()
        wait_for(lambda: running.sessions() == 1, "the first session's slot to be released")
        with running.connect() as again:
            assert receive(again)["type"] == "ready"
        second.close()
        for sid in ids:
            chunks = chunks_of(settings.bootstrap_servers, settings.audio_topic, sid)
            assert [c.end_of_stream for c in chunks] == [True]  # no audio: only the end
        wait_for(lambda: running.sessions() == 0, "every slot to be released")


# -- messages -------------------------------------------------------------------------------


def test_an_oversize_message_ends_the_session_with_a_message(settings) -> None:
    limit = len(TONE_CHUNK)  # exactly one 200 ms chunk
    with gateway(settings, max_message_bytes=limit) as running:
        with running.connect() as ws:
            sid = receive(ws)["stream_id"]
            ws.send(TONE_CHUNK)  # at the limit: taken
            ws.send(TONE_CHUNK + b"\x00\x00")  # over it
            error = receive(ws)
            code, reason = closed_with(ws)
        assert error["code"] == "message_too_large"
        assert f"{limit + 2} bytes is over the limit of {limit} bytes" in error["message"]
        assert code == 1009 and "over the limit" in reason
        chunks = assert_torn_down(running, sid)
        assert [len(c.payload) for c in chunks] == [limit, 0]
        assert chunks[0].payload == TONE_CHUNK and chunks[-1].end_of_stream

        # Far over it, the transport itself closes the socket before buffering the message.
        with running.connect() as ws:
            sid = receive(ws)["stream_id"]
            ws.send(b"\x00" * (limit * 10))
            code, _reason = closed_with(ws)
        assert code == 1009
        assert_torn_down(running, sid)


def test_a_message_that_is_not_audio_or_stop_ends_the_session(settings) -> None:
    with gateway(settings) as running:
        with running.connect() as ws:
            sid = receive(ws)["stream_id"]
            ws.send(b"\x00\x00\x00")  # not whole 16-bit samples
            error = receive(ws)
            closed_with(ws)
        assert error["code"] == "bad_message" and "whole 16-bit samples" in error["message"]
        assert_torn_down(running, sid)
        with running.connect() as ws:
            sid = receive(ws)["stream_id"]
            ws.send('{"type": "louder"}')
            assert receive(ws)["code"] == "bad_message"
        assert_torn_down(running, sid)


def test_audio_faster_than_real_time_ends_the_session(settings) -> None:
    two_seconds = b"\x00\x00" * 32_000
    with gateway(settings, max_audio_ahead_sec=1.0) as running:
        with running.connect() as ws:
            sid = receive(ws)["stream_id"]
            # 60 s of audio at once, 1 s of slack: refused on any machine that sends it in
            # under 59 s. Sends after the refusal may find the socket closed.
            with contextlib.suppress(ConnectionClosed):
                for _ in range(30):
                    ws.send(two_seconds)
            messages, code = messages_until_closed(ws)
        assert messages[0]["code"] == "audio_too_fast", messages
        assert "ahead of real time" in messages[0]["message"] and code == 1008
        chunks = assert_torn_down(running, sid)
        assert len(chunks) < 30 and chunks[-1].end_of_stream


def test_a_short_audio_message_must_be_the_last_one(settings) -> None:
    with gateway(settings) as running:
        with running.connect() as ws:
            sid = receive(ws)["stream_id"]
            ws.send(b"\x01\x00")  # one sample: allowed as a call's last message
            ws.send(TONE_CHUNK)  # but it was not the last
            messages, code = messages_until_closed(ws)
        assert messages[0]["code"] == "frame_too_short" and code == 1008
        chunks = assert_torn_down(running, sid)
        assert [c.payload for c in chunks] == [b"\x01\x00", b""]


# -- time and teardown --------------------------------------------------------------------------


def test_a_session_over_its_length_limit_is_ended_with_a_message(settings) -> None:
    with gateway(settings, max_session_sec=0.5, end_wait_sec=0.5) as running:
        with running.connect() as ws:
            sid = receive(ws)["stream_id"]
            ws.send(TONE_CHUNK)  # before the limit (published) or after it (ignored)
            # No worker here: its STREAM_END never comes, and the gateway says so.
            messages, code = messages_until_closed(ws)
        limit, waited = messages[0], messages[-1]
        assert limit["code"] == "session_too_long" and "limit of 0.5 s" in limit["message"]
        assert waited["code"] == "no_stream_end" and code == 1011
        ignored = [m["code"] for m in messages[1:-1]]
        assert ignored in ([], ["call_ended"]), messages
        chunks = assert_torn_down(running, sid)
        assert [c.end_of_stream for c in chunks] == ([True] if ignored else [False, True])


def test_after_the_time_limit_audio_is_ignored_and_the_last_events_still_arrive(settings) -> None:
    """Chunks in flight when the limit fires (and any stray message) must not cut off the
    call: the page still gets its last final and the STREAM_END, and a normal close."""
    with gateway(settings, max_session_sec=0.5) as running:  # end_wait_sec: WAIT_S
        with running.connect() as ws:
            sid = receive(ws)["stream_id"]
            limit = receive(ws)
            ws.send(TONE_CHUNK)
            ws.send('{"type": "louder"}')
            ws.send(TONE_CHUNK)
            notice = receive(ws)
            chunks = chunks_of(settings.bootstrap_servers, settings.audio_topic, sid)
            publish_events(
                settings,
                (sid, EventKind.FINAL, 0, "the last words"),
                (sid, EventKind.STREAM_END, 1, ""),
            )
            messages, code = messages_until_closed(ws)
        assert limit["code"] == "session_too_long"
        assert notice["type"] == "notice" and notice["code"] == "call_ended", notice
        assert [(m["type"], m.get("kind"), m.get("text")) for m in messages] == [
            ("event", "FINAL", "the last words"),
            ("event", "STREAM_END", ""),
        ]
        assert code == 1008  # after the whole call: closed with the limit's code, not cut off
        assert [c.end_of_stream for c in chunks] == [True]  # nothing after the end published
        assert_torn_down(running, sid)


def test_a_page_that_leaves_mid_call_ends_its_stream(settings) -> None:
    with gateway(settings) as running:
        with running.connect(source="file") as ws:
            sid = receive(ws)["stream_id"]
            for _ in range(3):
                ws.send(TONE_CHUNK)
            wait_for(lambda: relay_threads(sid), "the relay thread")
        # The page was closed: no stop message.
        chunks = assert_torn_down(running, sid)
    assert [len(c.payload) for c in chunks] == [len(TONE_CHUNK)] * 3 + [0]
    assert chunks[0].metadata == {"gateway": "web", "input": "file"}


def test_events_of_the_session_stream_are_relayed_until_its_stream_end(settings) -> None:
    """The relay alone, with events a worker would write: only this stream's, in order, and
    the socket closes normally after STREAM_END."""

    def event(sid: str, kind: EventKind, index: int, text: str = "") -> None:
        publish_events(settings, (sid, kind, index, text))

    with gateway(settings) as running:
        event("before-the-session", EventKind.FINAL, 0, "old")
        with running.connect() as ws:
            sid = receive(ws)["stream_id"]
            ws.send(TONE_CHUNK)
            event("someone-else", EventKind.FINAL, 0, "not ours")
            event(sid, EventKind.PARTIAL, 0, "hel")
            event(sid, EventKind.FINAL, 0, "hello")
            ws.send('{"type": "stop"}')
            event(sid, EventKind.STREAM_END, 1)
            got = [receive(ws) for _ in range(3)]
            code, _reason = closed_with(ws)
        assert [(e["type"], e["kind"], e["text"]) for e in got] == [
            ("event", "PARTIAL", "hel"),
            ("event", "FINAL", "hello"),
            ("event", "STREAM_END", ""),
        ]
        assert {e["stream_id"] for e in got} == {sid} and code == 1000
        chunks = assert_torn_down(running, sid)
        assert [c.end_of_stream for c in chunks] == [False, True]


def test_only_committed_events_reach_the_page(settings) -> None:
    """The relay reads read_committed: an event of an aborted transaction (a worker that
    failed mid-step and was fenced) never reaches the page; the committed retry does."""
    producer = Producer(
        {"bootstrap.servers": settings.bootstrap_servers, "transactional.id": uuid.uuid4().hex}
    )
    producer.init_transactions(WAIT_S)

    def in_transaction(sid: str, commit: bool, *events: tuple[EventKind, int, str]) -> None:
        producer.begin_transaction()
        for kind, index, text in events:
            producer.produce(
                settings.transcript_topic,
                key=sid.encode(),
                value=transcript_event(sid, kind, index, text),
            )
        producer.flush(WAIT_S)
        if commit:
            producer.commit_transaction(WAIT_S)
        else:
            producer.abort_transaction(WAIT_S)

    with gateway(settings) as running:
        with running.connect() as ws:
            sid = receive(ws)["stream_id"]
            ws.send(TONE_CHUNK)
            ws.send('{"type": "stop"}')
            ws.send('{"type": "louder"}')  # after the stop: ignored, not the end of the call
            notice = receive(ws)
            in_transaction(sid, False, (EventKind.FINAL, 0, "aborted"))
            in_transaction(
                sid, True, (EventKind.FINAL, 0, "committed"), (EventKind.STREAM_END, 1, "")
            )
            messages, code = messages_until_closed(ws)
        assert notice["code"] == "call_ended"
        assert [(m["kind"], m["text"]) for m in messages] == [
            ("FINAL", "committed"),
            ("STREAM_END", ""),
        ]
        assert code == 1000
        assert_torn_down(running, sid)
