"""One browser session: a websocket in, one call published, its transcript relayed back.

The procedure, in order:

1. admit (origin, a free session slot) — a refusal is sent to the page, then the socket closes;
2. open: an idempotent producer with a new stream id, and a ``TranscriptRelay`` positioned at
   the transcript topic's end; then tell the page ``ready`` (stream id, chunk size, limits);
3. live: each binary message is one ``AudioChunk`` (sequence = message number, so the page can
   time "chunk sent → event shown" by an event's ``last_sequence``), each transcript event is
   sent to the page as it is read; until the page says stop, leaves, breaks a limit, or the
   session's time runs out;
4. ending: end-of-stream sent; events still relayed until the call's STREAM_END (at most
   ``end_wait_sec``), then the socket closes;
5. teardown, whatever happened: end-of-stream sent if it was not, the producer flushed, the
   relay's consumer closed, the slot released.

Thread rule: everything here runs on the event loop thread, except the blocking Kafka calls
(topic check, flush, joining the relay thread), which go to worker threads with timeouts.
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
    refusal = check_origin(
        ws.headers.get("origin"), ws.headers.get("host"), ws.url.scheme, settings
    )
    source = ws.query_params.get("source", "microphone")
    if refusal is None and source not in SOURCES:
        refusal = Refusal("bad_message", f"source must be one of {SOURCES}, got {source!r}", 1003)
    if refusal is None:
        refusal = slots.acquire()
        if refusal is not None:
            log.info("refused a session: %s", refusal.message)
    await ws.accept()
    if refusal is not None:
        await _refuse(ws, refusal)
        return
    try:
        await BrowserCall(ws, settings, source, slots).run()
    finally:
        slots.release()


async def _refuse(ws: WebSocket, refusal: Refusal) -> None:
    with contextlib.suppress(Exception):  # the page may already be gone
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
        self.stop_requested = asyncio.Event()
        self._send_lock = asyncio.Lock()
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
            self.outcome = "page left"
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
        await self._send(
            {
                "type": "ready",
                "stream_id": self.stream_id,
                "sample_rate": SAMPLE_RATE_HZ,
                "chunk_frames": settings.chunk_frames,
                "max_message_bytes": settings.max_message_bytes,
                "max_session_sec": settings.max_session_sec,
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
            limit = session_too_long(settings)
            self.outcome = "over the session length limit"
            with contextlib.suppress(_Left):  # the page stops capturing and shows why
                await self._send(limit.to_json())
        self._end_stream()
        done, _ = await asyncio.wait(
            {receiver, relay}, timeout=settings.end_wait_sec, return_when=asyncio.FIRST_COMPLETED
        )
        if receiver in done:
            receiver.result()  # raises _Left; a refusal after the end is moot
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
        """Audio in until a refusal (returned) or the page leaves (``_Left``)."""
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                raise _Left()
            data, text = message.get("bytes"), message.get("text")
            if data is not None:
                refusal = check_audio(len(data), self.settings)
                if refusal is not None:
                    return refusal
                if self.stop_requested.is_set():
                    continue  # a chunk that crossed the stop in flight: the call is over
                try:
                    self.stream.write_encoded(data)
                except ProducerError as exc:
                    return Refusal("kafka_unavailable", f"Kafka is not taking audio: {exc}", 1011)
            elif text is not None:
                _command, refusal = parse_control(text, self.settings)
                if refusal is not None:
                    return refusal
                self.stop_requested.set()

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

    def _end_stream(self) -> None:
        if self.stream is not None and not self.stream.ended:
            self.stream.end()

    # -- teardown ---------------------------------------------------------------------------

    async def _teardown(self) -> None:
        settings = self.settings
        notes = []
        try:
            if self.stream is not None and not self.stream.ended:
                self._end_stream()
            if self.stream is not None:
                notes.append(f"{self.stream.sequence} chunk(s), end-of-stream sent")
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
                await self.ws.close(CLOSE_NORMAL)
        log.info("session %s closed (%s): %s", self.stream_id, self.outcome, ", ".join(notes))

    # -- the socket -------------------------------------------------------------------------

    async def _send(self, message: dict[str, Any]) -> None:
        try:
            async with self._send_lock:
                await self.ws.send_json(message)
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
            if refusal is None:
                await self.ws.close(CLOSE_NORMAL, "the call has ended")
            else:
                await self.ws.close(refusal.close_code, close_reason(refusal.message))

    async def _fail(self, code: str, message: str) -> bool:
        self.outcome = f"failed: {code}"
        log.warning("session %s: %s", self.stream_id, message)
        await self._close(Refusal(code, message, CLOSE_SERVER_ERROR))
        return False
