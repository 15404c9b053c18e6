"""The live demo page in a real headless Chromium, against the gateway (``python -m producer_tools
web``, as a user starts it), the real broker and a worker with the tiny random-weight models.

Chromium is Debian's (``apt-get install chromium``), driven by Playwright through
``executable_path``; Playwright's own browser downloads are never used. Its fake microphone
plays a test WAV (``--use-file-for-fake-audio-capture``), looping. Random weights make arbitrary
words, so the assertions are about structure: which stream, which kinds, which element, which
colour. A screenshot of the page mid-call goes to ``artifacts/`` (ignored by git).

Without Chromium these tests skip on a developer machine and fail under CI (env CI set).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
from confluent_kafka import Consumer, KafkaError

from producer_tools.conversation import default_conversations
from producer_tools.stream import read_events
from schemas import AudioChunk, RecordCodec
from tests.integration.test_worker import RunningWorker, _config
from worker.service.topics import create_topics

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "artifacts"
CHROMIUM_FLAGS = [
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",  # grants the microphone without a prompt
    "--autoplay-policy=no-user-gesture-required",
]
START_S = 120.0  # the gateway process and the browser, on a busy machine
READ_S = 60.0
# The tiny models run several times slower than real time on a shared CPU: the transcript of a
# call may come minutes after its audio. Waits end as soon as their condition holds.
WORKER_S = 900.0
PROGRESS_S = 15.0
CALL_S = 8.0  # audio the page sends before the test ends the call


def wait_for(
    condition: Callable[[], object], what: str, timeout_s: float, progress: Callable[[], str]
) -> object:
    """Poll ``condition`` until truthy; print ``progress()`` every ``PROGRESS_S``."""
    started = time.monotonic()
    next_note = started + PROGRESS_S
    while not (value := condition()):
        now = time.monotonic()
        if now - started > timeout_s:
            raise AssertionError(
                f"timed out after {timeout_s:g} s waiting for {what}: {progress()}"
            )
        if now > next_note:
            print(f"  … {now - started:.0f} s waiting for {what}: {progress()}", flush=True)
            next_note = now + PROGRESS_S
        time.sleep(0.1)
    return value


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "Debian's chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def call_wav(tmp_path_factory) -> Path:
    """The fake microphone's input: the start of a canned conversation, 16 kHz mono PCM."""
    conv = default_conversations()["appointment"]
    path = tmp_path_factory.mktemp("audio") / "call.wav"
    soundfile.write(path, conv.audio[: int(10 * conv.sample_rate)], conv.sample_rate, "PCM_16")
    return path


@pytest.fixture
def browser(chromium, call_wav) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={call_wav}"],
        )
        try:
            yield browser
        finally:
            browser.close()


class GatewayProcess:
    """``python -m producer_tools web`` on a free port, its log in a file."""

    def __init__(self, log_path: Path, *flags: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "producer_tools", "web", "--port", "0", *flags],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        line = self.proc.stdout.readline()  # the first line is the URL, once it listens
        if not line.startswith("serving the live demo on "):
            self.close()
            raise RuntimeError(f"the gateway did not start: {line!r}\n{self.log()}")
        self.url = line.rsplit(" ", 1)[1].strip()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.proc.stdout.close()
        self._log.close()


@pytest.fixture
def start_gateway(tmp_path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(*flags: str) -> GatewayProcess:
        gateway = GatewayProcess(tmp_path / f"gateway-{len(started)}.log", *flags)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.close()


# The page's own record of each segment element's kind changes, in order, with the element's
# identity: a MutationObserver installed before the page's script runs.
OBSERVE_SEGMENTS = """
window.__segmentLog = [];
let nextElement = 0;
new MutationObserver((records) => {
  for (const r of records) {
    const el = r.target;
    if (el.dataset === undefined || el.dataset.segment === undefined) continue;
    el.__element ??= ++nextElement;
    window.__segmentLog.push([Number(el.dataset.segment), el.dataset.kind, el.__element]);
  }
}).observe(document, { subtree: true, attributes: true, attributeFilter: ["data-kind"] });
"""

READ_SEGMENTS = """
() => [...document.querySelectorAll("#transcript .segment")].map((el) => ({
  segment: Number(el.dataset.segment),
  kind: el.dataset.kind,
  speaker: el.dataset.speaker,
  text: el.querySelector(".text").textContent,
  colour: getComputedStyle(el.querySelector(".speaker")).color,
  border: getComputedStyle(el).borderLeftColor,
}))
"""


def page_state(page) -> str:
    return page.eval_on_selector("#state", "el => el.dataset.state")


def sent_seconds(page) -> float:
    return float(page.eval_on_selector("#sent", "el => el.dataset.seconds"))


def describe(page) -> Callable[[], str]:
    def progress() -> str:
        segments = page.evaluate(READ_SEGMENTS)
        kinds = [s["kind"][0] for s in segments]
        message = page.eval_on_selector("#message", "el => el.hidden ? '' : el.textContent")
        return (
            f"state {page_state(page)}, sent {sent_seconds(page):.1f} s, segments "
            f"{''.join(kinds) or '-'}, {page.text_content('#latency')}"
            + (f", message {message!r}" if message else "")
        )

    return progress


def test_the_page_shows_the_call_live_and_closing_it_ends_the_stream(
    kafka_bootstrap, fp64_models, browser, start_gateway
) -> None:
    config = _config(kafka_bootstrap, float64=True)
    create_topics(config, partitions=2)
    kafka = [
        "--bootstrap-servers",
        kafka_bootstrap,
        "--topic",
        config.input_topic,
        "--transcript-topic",
        config.output_topic,
    ]
    with RunningWorker(config, fp64_models):
        gateway = start_gateway(*kafka, "--end-wait-sec", str(WORKER_S))
        print(f"gateway on {gateway.url}; worker running; opening the page", flush=True)

        # -- a call ended with Stop: partials, then finals in their place, then the end
        page = browser.new_page()
        page.add_init_script(OBSERVE_SEGMENTS)
        page.goto(gateway.url)
        page.click("#start-mic")
        progress = describe(page)
        wait_for(lambda: page_state(page) == "live", "the page to go live", START_S, progress)
        sid = page.eval_on_selector("#transcript", "el => el.dataset.streamId")
        assert sid.startswith("web-")
        wait_for(
            lambda: page.query_selector("#transcript .segment.partial"),
            "a partial on the page",
            WORKER_S,
            progress,
        )
        wait_for(
            lambda: sent_seconds(page) >= CALL_S, f"{CALL_S} s of audio sent", WORKER_S, progress
        )
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "web-demo-mid-call.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot mid-call: {shot}", flush=True)
        page.click("#stop")
        wait_for(
            lambda: page.query_selector("#transcript .call-end"),
            "the call's end on the page",
            WORKER_S,
            progress,
        )
        assert page_state(page) == "ended"
        segments = page.evaluate(READ_SEGMENTS)
        log = page.evaluate("window.__segmentLog")
        latency_ms = page.eval_on_selector("#latency", "el => el.dataset.lastMs")
        latency_label = page.text_content("#latency")
        page.close()

        # -- a call whose page is simply closed
        page = browser.new_page()
        page.goto(gateway.url)
        page.click("#start-mic")
        progress = describe(page)
        wait_for(lambda: sent_seconds(page) >= 1.0, "1 s of audio sent", START_S, progress)
        closed_sid = page.eval_on_selector("#transcript", "el => el.dataset.streamId")
        page.close()
        print(f"closed the page of {closed_sid}; waiting for its STREAM_END", flush=True)
        closed_events = list(
            read_events(
                kafka_bootstrap,
                config.output_topic,
                until_stream_ends={closed_sid},
                timeout_s=WORKER_S,
            )
        )

    # The page showed exactly the committed events of its own stream.
    events = list(read_events(kafka_bootstrap, config.output_topic, until_stream_ends={sid}))
    mine = [e for e in events if e.stream_id == sid]
    assert mine and mine[-1].kind == "STREAM_END"
    finals = {e.segment_index: e for e in mine if e.kind == "FINAL"}
    assert finals, "the worker gave no final"
    assert [s["segment"] for s in segments] == sorted(finals), "one element per segment"
    for shown in segments:
        final = finals[shown["segment"]]
        assert shown["kind"] == "FINAL", shown
        assert (shown["speaker"], shown["text"]) == (final.speaker, final.text or "…")

    # Partials were replaced by their finals in the same element, and a final never changed.
    replaced = 0
    for index in finals:
        history = [(kind, element) for seg, kind, element in log if seg == index]
        assert len({element for _, element in history}) == 1, (index, history)
        kinds = [kind for kind, _ in history]
        assert kinds[-1] == "FINAL" and kinds.count("FINAL") == 1, (index, kinds)
        replaced += "PARTIAL" in kinds
    assert replaced, f"no segment went from partial to final on the page: {log}"

    # One colour per speaker: the same for each of a speaker's segments, different between
    # speakers, and given in order of first appearance from the page's palette.
    colour_of: dict[str, str] = {}
    for shown in segments:
        assert shown["colour"] == shown["border"], shown
        assert colour_of.setdefault(shown["speaker"], shown["colour"]) == shown["colour"], shown
    assert len(set(colour_of.values())) == len(colour_of), colour_of
    print(f"speakers on the page: {colour_of}; last latency {latency_ms} ms", flush=True)
    assert latency_ms is not None and int(latency_ms) > 0
    assert latency_label.startswith("end of speech → text "), latency_label

    # Closing the page ended its stream: end-of-stream published, STREAM_END committed.
    assert closed_events and closed_events[-1].stream_id == closed_sid
    assert closed_events[-1].kind == "STREAM_END"
    chunks = _chunks(kafka_bootstrap, config.input_topic, closed_sid)
    assert chunks[-1].end_of_stream and [c.sequence for c in chunks] == list(range(len(chunks)))


def test_an_uploaded_file_is_streamed_at_real_time_pace(
    kafka_bootstrap, new_topic, browser, start_gateway, tmp_path
) -> None:
    """No worker: the gateway's audio topic shows what the page sent, and when."""
    audio, transcripts = new_topic(partitions=1), new_topic(partitions=1)
    seconds = 3.0
    t = np.arange(int(seconds * 44_100)) / 44_100
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    upload = tmp_path / "tone.wav"
    soundfile.write(upload, np.stack([tone, tone], axis=1), 44_100, "PCM_16")  # stereo, 44.1 kHz
    gateway = start_gateway(
        "--bootstrap-servers",
        kafka_bootstrap,
        "--topic",
        audio,
        "--transcript-topic",
        transcripts,
        "--end-wait-sec",
        "1",
    )
    page = browser.new_page()
    page.goto(gateway.url)
    page.set_input_files("#file-input", str(upload))
    clicked_ms = time.time() * 1000  # playback cannot start before this
    page.click("#start-file")
    progress = describe(page)
    wait_for(lambda: page_state(page) == "live", "the page to go live", START_S, progress)
    sid = page.eval_on_selector("#transcript", "el => el.dataset.streamId")
    chunks, timestamps = _chunks(kafka_bootstrap, audio, sid, with_timestamps=True)
    # No worker, so no STREAM_END: the page says so once the gateway stops waiting.
    wait_for(
        lambda: page.eval_on_selector("#message", "el => el.dataset.code") == "no_stream_end",
        "the page to show that no STREAM_END came",
        START_S,
        progress,
    )
    page.close()
    assert chunks[0].metadata == {"gateway": "web", "input": "file"}
    assert {(c.sample_rate_hz, c.channels) for c in chunks} == {(16_000, 1)}
    samples = sum(len(c.payload) // 2 for c in chunks)
    assert abs(samples - seconds * 16_000) <= 3200, samples  # the file, give or take a chunk
    # Real-time pace: a chunk leaves once its audio has played, and playing began at the click,
    # so chunk k (the gateway's produce time) is no earlier than the audio up to its end.
    played_s = np.cumsum([len(c.payload) / 2 / 16_000 for c in chunks])
    for k, (stamp, audio_end_s) in enumerate(zip(timestamps, played_s, strict=True)):
        assert stamp - clicked_ms >= audio_end_s * 1000 - 50, (k, stamp - clicked_ms, audio_end_s)


def _chunks(bootstrap: str, topic: str, stream_id: str, with_timestamps: bool = False):
    """The stream's chunks (and their Kafka timestamps, ms), read until its end_of_stream."""
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
    stamps: list[int] = []
    deadline = time.monotonic() + READ_S
    try:
        while not (chunks and chunks[-1].end_of_stream):
            assert time.monotonic() < deadline, f"no end_of_stream for {stream_id}"
            msg = consumer.poll(0.2)
            if msg is None or (msg.error() and msg.error().code() == KafkaError._PARTITION_EOF):
                continue
            if msg.key() == stream_id.encode():
                chunks.append(codec.decode(msg.value()))
                stamps.append(msg.timestamp()[1])
                deadline = time.monotonic() + READ_S
    finally:
        consumer.close()
    return (chunks, stamps) if with_timestamps else chunks
