"""One browser session: a websocket in, one call published, its transcript relayed back.

The procedure, in order:

1. admit (origin, a free session slot) — a refusal is sent to the page, then the socket closes;
2. open: an idempotent producer with a new stream id, and a ``TranscriptRelay`` positioned at
   the transcript topic's end; then tell the page ``ready`` (stream id, chunk size, limits);
3. live: each binary message is one ``AudioChunk`` (sequence = message number, so the page can
   time "chunk sent → event shown" by an event's ``last_sequence``), each transcript event is
   sent to the page as it is read; until the page says stop, leaves, breaks a limit, or the
   session's time runs out; audio is held to real time (``AudioPace``);
4. ending: end-of-stream sent (once: never again after a failed attempt, which would repeat its
   sequence); from the stop or the time limit on, whatever the page still sends is ignored (one
   ``notice`` says so), and events are relayed until the call's STREAM_END (at most
   ``end_wait_sec``), then the socket closes;
5. teardown, whatever happened: end-of-stream sent if it was not, the producer flushed, the
   relay's consumer closed, the slot released.

Thread rule: everything here runs on the event loop thread, except the blocking Kafka calls
(topic check, flush, joining the relay thread), which go to worker threads with timeouts. Every
send to the page, and its close, is bounded by ``send_timeout_sec``: a page that stops reading
is treated as gone, so it cannot hold the send lock, the relay or the session slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from producer_tools.producer import AudioChunkProducer, AudioStream, ProducerError
from producer_tools.web.admission import (
    CLOSE_NORMAL,
    CLOSE_SERVER_ERROR,
    AudioPace,
    Refusal,
    SessionSlots,
    check_audio,
    check_origin,
    close_reason,
    parse_control,
    session_too_long,
)
from producer_tools.web.relay import RelayItem, TranscriptRelay
from producer_tools.web.settings import SAMPLE_RATE_HZ, GatewaySettings
from schemas import AudioEncoding, EventKind

log = logging.getLogger(__name__)
SOURCES = ("microphone", "file")


class _Left(Exception):
    """The page went away."""


async def serve_session(ws: WebSocket, settings: GatewaySettings, slots: SessionSlots) -> None:
    """Admit, run and tear down one session on ``ws``."""
    # The socket is accepted even to refuse, so the page can show why: a refused handshake
    # reaches a page only as an anonymous "connection failed".
    refusal = check_origin(ws.headers.get("origin"), _listening_port(ws, settings), settings)
    source = ws.query_params.get("source", "microphone")
    if refusal is None and source not in SOURCES:
        refusal = Refusal("bad_message", f"source must be one of {SOURCES}, got {source!r}", 1003)
    holds_slot = False
    try:
        if refusal is None:
            refusal = slots.acquire()
            holds_slot = refusal is None
            if refusal is not None:
                log.info("refused a session: %s", refusal.message)
        await ws.accept()
        if refusal is not None:
            await _refuse(ws, refusal, settings)
            return
        await BrowserCall(ws, settings, source, slots).run()
    finally:
        if holds_slot:
            slots.release()


def _listening_port(ws: WebSocket, settings: GatewaySettings) -> int:
    """The port of the socket the connection came in on (``settings.port`` may be 0)."""
    server = ws.scope.get("server")
    return server[1] if server and server[1] else settings.port


async def _refuse(ws: WebSocket, refusal: Refusal, settings: GatewaySettings) -> None:
    with contextlib.suppress(Exception):  # the page may already be gone, or not reading
        async with asyncio.timeout(settings.send_timeout_sec):
            await ws.send_json(refusal.to_json())
            await ws.close(refusal.close_code, close_reason(refusal.message))


class BrowserCall:
    """The call of one admitted session, from ``ready`` to teardown."""

    def __init__(
        self, ws: WebSocket, settings: GatewaySettings, source: str, slots: SessionSlots
    ) -> None:
        self.ws = ws
        self.settings = settings
        self.source = source
        self.slots = slots
        self.stream_id = f"{settings.stream_prefix}-{uuid.uuid4().hex[:12]}"
        self.queue: asyncio.Queue[RelayItem] = asyncio.Queue(maxsize=settings.event_queue)
        self.producer: AudioChunkProducer | None = None
        self.stream: AudioStream | None = None
        self.relay: TranscriptRelay | None = None
        self.pace: AudioPace | None = None
        # Set by the page's stop or the time limit: from then on no message is acted upon.
        self.stop_requested = asyncio.Event()
        self.ignored_after_end = 0
        self._end_attempted = False
        self._send_lock = asyncio.Lock()
        self.page_stalled = False
        self.outcome = "opening"

    async def run(self) -> None:
        tasks: list[asyncio.Task[Any]] = []
        try:
            if not await self._open():
                return
            receiver = asyncio.create_task(self._receive(), name=f"receive-{self.stream_id}")
            relay = asyncio.create_task(self._relay(), name=f"relay-{self.stream_id}")
            stop = asyncio.create_task(self.stop_requested.wait())
            tasks = [receiver, relay, stop]
            await self._live(receiver, relay, stop)
        except _Left:
            self.outcome = "page stopped reading" if self.page_stalled else "page left"
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            await self._teardown()

    # -- open ------------------------------------------------------------------------------

    async def _open(self) -> bool:
        settings = self.settings
        try:
            self.producer = AudioChunkProducer(
                settings.bootstrap_servers,
                settings.audio_topic,
                schema_registry_url=settings.schema_registry_url,
                wire_format=settings.wire_format,
                chunk_ms=settings.chunk_ms,
                producer_config=settings.producer_config,
                queue_full_timeout_sec=0,  # never block the event loop: a full queue is an error
            )
            await asyncio.to_thread(self.producer.check_topic, settings.kafka_timeout_sec)
        except ProducerError as exc:
            return await self._fail("kafka_unavailable", f"cannot publish audio: {exc}")
        self.relay = TranscriptRelay(
            settings, self.stream_id, asyncio.get_running_loop(), self.queue
        )
        self.relay.start()
        try:
            first = await asyncio.wait_for(self.queue.get(), settings.kafka_timeout_sec * 3)
        except TimeoutError:
            return await self._fail(
                "kafka_unavailable",
                f"the transcript topic did not open within {settings.kafka_timeout_sec * 3:g} s",
            )
        if first.kind == "failed":
            return await self._fail("kafka_unavailable", f"cannot read transcripts: {first.reason}")
        self.stream = self.producer.open_stream(
            self.stream_id,
            sample_rate=SAMPLE_RATE_HZ,
            encoding=AudioEncoding.PCM_S16LE,
            channels=1,
            metadata={"gateway": "web", "input": self.source},
        )
        log.info(
            "session %s opened (%s, %d/%d sessions)",
            self.stream_id,
            self.source,
            self.slots.in_use,
            self.slots.limit,
        )
        self.pace = AudioPace(settings, asyncio.get_running_loop().time())
        await self._send(
            {
                "type": "ready",
                "stream_id": self.stream_id,
                "sample_rate": SAMPLE_RATE_HZ,
                "chunk_frames": settings.chunk_frames,
                "max_message_bytes": settings.max_message_bytes,
                "max_session_sec": settings.max_session_sec,
                "max_audio_ahead_sec": settings.max_audio_ahead_sec,
            }
        )
        self.outcome = "live"
        return True

    # -- live and ending --------------------------------------------------------------------

    async def _live(self, receiver: asyncio.Task, relay: asyncio.Task, stop: asyncio.Task) -> None:
        settings = self.settings
        done, _ = await asyncio.wait(
            {receiver, relay, stop},
            timeout=settings.max_session_sec,
            return_when=asyncio.FIRST_COMPLETED,
        )
        limit: Refusal | None = None
        if receiver in done:
            refusal = receiver.result()  # raises _Left when the page went away
            self.outcome = f"refused: {refusal.code}"
            await self._close(refusal)
            return
        if relay in done:  # the call ended before we ended it (the worker's own limits)
            self.outcome = "ended by the worker"
            await self._close(self._relay_failure(relay))
            return
        if stop in done:
            self.outcome = "stopped by the page"
        else:
            self.stop_requested.set()  # audio still in flight is ignored, not published
            limit = session_too_long(settings)
            self.outcome = "over the session length limit"
            with contextlib.suppress(_Left):  # the page stops capturing and shows why
                await self._send(limit.to_json())
        failure = self._end_stream()
        if failure is not None:
            self.outcome = "failed: kafka_unavailable"
            await self._close(failure)
            return
        done, _ = await asyncio.wait(
            {receiver, relay}, timeout=settings.end_wait_sec, return_when=asyncio.FIRST_COMPLETED
        )
        if receiver in done:
            receiver.result()  # raises _Left: after the end, the receiver ends no other way
        if relay in done:
            failure = self._relay_failure(relay)
            await self._close(failure or limit, announce=failure is not None)
            return
        await self._close(
            Refusal(
                "no_stream_end",
                f"the call was ended but no STREAM_END came within {settings.end_wait_sec:g} s: "
                "is a worker running on this topic?",
                CLOSE_SERVER_ERROR,
            )
        )

    async def _receive(self) -> Refusal:
        """Audio in until a refusal (returned) or the page leaves (``_Left``).

        After the stop or the time limit, every message is ignored: audio that crossed the end
        in flight, or anything else, must not cut off the call's last events.
        """
        clock = asyncio.get_running_loop()
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                raise _Left()
            if self.stop_requested.is_set():
                await self._ignore_after_end()
                continue
            data, text = message.get("bytes"), message.get("text")
            if data is not None:
                refusal = check_audio(len(data), self.settings) or self.pace.admit(
                    len(data), clock.time()
                )
                if refusal is not None:
                    return refusal
                try:
                    self.stream.write_encoded(data)
                except ProducerError as exc:
                    return Refusal("kafka_unavailable", f"Kafka is not taking audio: {exc}", 1011)
            elif text is not None:
                _command, refusal = parse_control(text, self.settings)
                if refusal is not None:
                    return refusal
                self.stop_requested.set()

    async def _ignore_after_end(self) -> None:
        self.ignored_after_end += 1
        if self.ignored_after_end == 1:  # once: a page still sending would get a flood
            await self._send(
                {
                    "type": "notice",
                    "code": "call_ended",
                    "message": "the call has ended: what the page sends now is ignored; its "
                    "last transcript events follow",
                }
            )

    async def _relay(self) -> None:
        """Events to the page until STREAM_END; raises ``RuntimeError`` if the relay failed."""
        while True:
            item = await self.queue.get()
            if item.kind == "failed":
                raise RuntimeError(item.reason)
            event = item.event
            await self._send({"type": "event", **event.to_avro()})
            if event.kind is EventKind.STREAM_END:
                return

    def _end_stream(self) -> Refusal | None:
        """Send end-of-stream if it was not tried yet; the refusal if it failed.

        Tried once only: after a delivery error the end record may be queued already, and a
        second one would repeat its sequence number.
        """
        if self.stream is None or self._end_attempted:
            return None
        self._end_attempted = True
        try:
            self.stream.end()
        except ProducerError as exc:
            log.warning("session %s: end-of-stream failed: %s", self.stream_id, exc)
            return Refusal("kafka_unavailable", f"cannot end the call: {exc}", CLOSE_SERVER_ERROR)
        return None

    # -- teardown ---------------------------------------------------------------------------

    async def _teardown(self) -> None:
        settings = self.settings
        notes = []
        failure = self._end_stream()
        if self.stream is not None:
            ended = "end-of-stream sent" if self.stream.ended else "end-of-stream failed"
            notes.append(f"{self.stream.sequence} chunk(s), {ended}")
        if failure is not None:
            notes.append(failure.message)
        if self.ignored_after_end:
            notes.append(f"{self.ignored_after_end} message(s) after the end ignored")
        try:
            if self.producer is not None:
                await asyncio.to_thread(self.producer.flush, settings.kafka_timeout_sec)
        except ProducerError as exc:
            notes.append(f"publishing failed: {exc}")
        if self.relay is not None:
            self.relay.stop()
            closed = await asyncio.to_thread(self.relay.join, settings.kafka_timeout_sec)
            notes.append("consumer closed" if closed else "consumer still closing")
        if self.ws.client_state is WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(settings.send_timeout_sec):
                    await self.ws.close(CLOSE_NORMAL)
        log.info("session %s closed (%s): %s", self.stream_id, self.outcome, ", ".join(notes))

    # -- the socket -------------------------------------------------------------------------

    async def _send(self, message: dict[str, Any]) -> None:
        """Send ``message``, or raise ``_Left`` if the page is gone or took over
        ``send_timeout_sec`` to take it (the whole wait, the send lock's included)."""
        try:
            async with asyncio.timeout(self.settings.send_timeout_sec), self._send_lock:
                await self.ws.send_json(message)
        except TimeoutError as exc:
            self.page_stalled = True
            log.warning(
                "session %s: the page took no message for %g s",
                self.stream_id,
                self.settings.send_timeout_sec,
            )
            raise _Left() from exc
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            raise _Left() from exc

    def _relay_failure(self, relay: asyncio.Task) -> Refusal | None:
        """None if the relay ended at STREAM_END, else why it stopped (``_Left`` propagates)."""
        try:
            relay.result()
        except RuntimeError as exc:
            self.outcome = "transcript relay failed"
            return Refusal("kafka_unavailable", f"cannot read transcripts: {exc}", 1011)
        return None

    async def _close(self, refusal: Refusal | None, announce: bool = True) -> None:
        """Close the socket: normally, or with ``refusal`` (sent to the page if ``announce``)."""
        if refusal is not None and announce:
            with contextlib.suppress(_Left):
                await self._send(refusal.to_json())
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.settings.send_timeout_sec):
                if refusal is None:
                    await self.ws.close(CLOSE_NORMAL, "the call has ended")
                else:
                    await self.ws.close(refusal.close_code, close_reason(refusal.message))

    async def _fail(self, code: str, message: str) -> bool:
        self.outcome = f"failed: {code}"
        log.warning("session %s: %s", self.stream_id, message)
        await self._close(Refusal(code, message, CLOSE_SERVER_ERROR))
        return False
