// The live demo page: capture → websocket → gateway → Kafka → worker → transcript events back.
// One call per websocket. Each audio message is one AudioChunk; its sequence number is the
// message's position, so an event's last_sequence says which chunk holds its end (end_s).
// The latency shown is what a speaker feels: from the end of the event's speech (end_s) to its
// text on screen. The moment end_s was captured is the send time of chunk last_sequence less
// the audio after end_s in that chunk (a chunk is sent as soon as its last sample is captured).
// For a final it includes the pause the worker waits for before it ends a segment.

const PALETTE = ["#4fc3f7", "#ffb74d", "#ce93d8", "#81c784", "#f06292", "#fff176"];
const SENT_KEEP = 3000; // chunks' send times kept for latency; older ones are dropped
const LATENCY_KEEP = 50; // latencies the median is taken over
const FLUSH_WAIT_MS = 1000;

const $ = (id) => document.getElementById(id);
const ui = {
  state: $("state"),
  latency: $("latency"),
  sent: $("sent"),
  startMic: $("start-mic"),
  fileInput: $("file-input"),
  startFile: $("start-file"),
  stop: $("stop"),
  streamId: $("stream-id"),
  message: $("message"),
  transcript: $("transcript"),
};
let current = null; // the call on screen

function setState(state, label = state) {
  ui.state.dataset.state = state;
  ui.state.textContent = label;
}

function showMessage(text, code) {
  ui.message.hidden = false;
  ui.message.textContent = text;
  ui.message.dataset.code = code;
}

function setIdleControls(idle) {
  ui.startMic.disabled = !idle;
  ui.fileInput.disabled = !idle;
  ui.startFile.disabled = !idle || ui.fileInput.files.length === 0;
  ui.stop.disabled = idle;
}

class Call {
  constructor(source, file) {
    this.source = source; // "microphone" | "file"
    this.file = file;
    this.nextSequence = 0;
    this.sentSamples = 0;
    this.sampleRate = 16000; // until the gateway says
    this.sentAt = new Map(); // sequence → {at: performance.now() when sent, endS: its end, s}
    this.speakers = new Map(); // speaker label → colour
    this.segments = new Map(); // segment_index → element
    this.latencies = [];
    this.capture = null;
    this.sending = false;
    this.ended = false; // STREAM_END shown
    this.failed = false; // an error message shown
    const url = new URL(`/ws?source=${source}`, location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    this.ws = new WebSocket(url);
    this.ws.binaryType = "arraybuffer";
    this.ws.onmessage = (m) => this.onMessage(JSON.parse(m.data));
    this.ws.onclose = (ev) => this.onClose(ev);
  }

  async onMessage(msg) {
    if (msg.type === "ready") {
      ui.streamId.textContent = msg.stream_id;
      ui.transcript.dataset.streamId = msg.stream_id;
      this.sampleRate = msg.sample_rate;
      try {
        this.capture = await startCapture(this, msg);
        this.sending = true;
        setState("live", this.source === "file" ? "live (file)" : "live");
      } catch (err) {
        showMessage(`cannot capture audio: ${err.message}`, "capture_failed");
        this.failed = true;
        this.ws.close(1000);
      }
    } else if (msg.type === "event") {
      this.showEvent(msg);
    } else if (msg.type === "error") {
      showMessage(msg.message, msg.code);
      this.failed = true;
      this.sending = false;
      stopCapture(this);
      // Past the session length the call is ended, and its last events still come.
      setState(msg.code === "session_too_long" ? "ending" : "error");
    }
  }

  send(buffer) {
    if (!this.sending || this.ws.readyState !== WebSocket.OPEN) return;
    this.sentSamples += buffer.byteLength / 2;
    const seconds = this.sentSamples / this.sampleRate;
    this.sentAt.set(this.nextSequence++, { at: performance.now(), endS: seconds });
    ui.sent.dataset.seconds = seconds.toFixed(2);
    ui.sent.textContent = `sent ${seconds.toFixed(1)} s`;
    if (this.sentAt.size > SENT_KEEP) {
      this.sentAt.delete(this.sentAt.keys().next().value);
    }
    this.ws.send(buffer);
  }

  async stop() {
    if (!this.sending) return;
    setState("ending");
    ui.stop.disabled = true;
    await flushCapture(this); // the last partial chunk goes out before "stop"
    this.sending = false;
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({ type: "stop" }));
    stopCapture(this);
  }

  onClose(ev) {
    this.sending = false;
    stopCapture(this);
    if (this !== current) return;
    if (this.ended) {
      setState("ended");
    } else if (!this.failed) {
      showMessage(closeText(ev), `closed_${ev.code}`);
      setState("error", "disconnected");
    } else if (ui.state.dataset.state === "ending") {
      setState("closed");
    }
    setIdleControls(true);
  }

  colour(speaker) {
    if (!this.speakers.has(speaker)) {
      this.speakers.set(speaker, PALETTE[this.speakers.size % PALETTE.length]);
    }
    return this.speakers.get(speaker);
  }

  showEvent(ev) {
    if (ev.kind === "STREAM_END") {
      const end = document.createElement("p");
      end.className = "call-end";
      end.dataset.kind = "STREAM_END";
      end.textContent = `call ended · ${ev.end_s.toFixed(1)} s · ${ev.segment_index} segment(s)`;
      ui.transcript.append(end);
      this.ended = true;
      this.sending = false;
      stopCapture(this);
      setState("ended");
    } else {
      let el = this.segments.get(ev.segment_index);
      if (!el) {
        el = document.createElement("p");
        el.dataset.segment = ev.segment_index;
        for (const part of ["speaker", "time", "text"]) {
          const span = document.createElement("span");
          span.className = part;
          el.append(span);
        }
        ui.transcript.append(el);
        this.segments.set(ev.segment_index, el);
      } else if (el.dataset.kind === "FINAL") {
        return; // a final is never revised
      }
      const speaker = ev.speaker || "?";
      el.className = `segment ${ev.kind === "FINAL" ? "final" : "partial"}`;
      el.dataset.kind = ev.kind;
      el.dataset.revision = ev.revision;
      el.dataset.speaker = speaker;
      el.style.setProperty("--speaker", this.colour(speaker));
      el.querySelector(".speaker").textContent = speaker;
      el.querySelector(".time").textContent = `${ev.start_s.toFixed(1)}–${ev.end_s.toFixed(1)} s`;
      el.querySelector(".text").textContent = ev.text || "…";
    }
    const chunk = this.sentAt.get(ev.last_sequence);
    if (chunk !== undefined) {
      const after = Math.max(0, chunk.endS - ev.end_s) * 1000; // audio after the speech ended
      this.noteLatency(performance.now() - (chunk.at - after), ev.kind.toLowerCase());
    }
  }

  noteLatency(ms, kind) {
    this.latencies.push(ms);
    if (this.latencies.length > LATENCY_KEEP) this.latencies.shift();
    const sorted = [...this.latencies].sort((a, b) => a - b);
    const median = sorted[Math.floor(sorted.length / 2)];
    ui.latency.textContent =
      `end of speech → text ${Math.round(ms)} ms (${kind}) · median ${Math.round(median)} ms`;
    ui.latency.dataset.lastMs = Math.round(ms);
  }
}

function closeText(ev) {
  if (ev.code === 1009) return "a message was too large for the gateway; the call was ended";
  if (ev.code === 1006) return "the connection to the gateway was lost";
  return ev.reason || `the gateway closed the connection (code ${ev.code})`;
}

async function startCapture(call, ready) {
  const ctx = new AudioContext({ sampleRate: ready.sample_rate });
  const capture = { ctx, node: null, source: null, media: null, flushed: null };
  try {
    await ctx.audioWorklet.addModule("/static/capture-worklet.js");
    const node = new AudioWorkletNode(ctx, "pcm-capture", {
      processorOptions: { chunkFrames: ready.chunk_frames },
      channelCount: 1,
      channelCountMode: "explicit", // stereo input is mixed down to mono
      outputChannelCount: [1],
    });
    node.port.onmessage = (m) => {
      if (m.data === "flushed") capture.flushed?.();
      else call.send(m.data);
    };
    capture.node = node;
    if (call.source === "microphone") {
      capture.media = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
      });
      capture.source = ctx.createMediaStreamSource(capture.media);
    } else {
      // Decoded at the context's rate and played: the audio clock paces it in real time.
      const buffer = await ctx.decodeAudioData(await call.file.arrayBuffer());
      capture.source = ctx.createBufferSource();
      capture.source.buffer = buffer;
      capture.source.connect(ctx.destination);
      capture.source.onended = () => call.stop();
    }
    capture.source.connect(node);
    node.connect(ctx.destination); // silent output: keeps the node in the rendering graph
    capture.source.start?.();
    await ctx.resume();
    return capture;
  } catch (err) {
    ctx.close();
    throw err;
  }
}

function flushCapture(call) {
  const capture = call.capture;
  if (!capture || !capture.node) return Promise.resolve();
  capture.source?.disconnect();
  return new Promise((resolve) => {
    capture.flushed = resolve;
    capture.node.port.postMessage("flush");
    setTimeout(resolve, FLUSH_WAIT_MS); // a closed context never answers
  });
}

function stopCapture(call) {
  const capture = call.capture;
  if (!capture) return;
  call.capture = null;
  capture.source?.disconnect();
  capture.media?.getTracks().forEach((t) => t.stop());
  capture.ctx.close();
}

function start(source, file) {
  ui.transcript.replaceChildren();
  ui.message.hidden = true;
  ui.streamId.textContent = "";
  ui.latency.textContent = "end of speech → text –";
  ui.sent.textContent = "sent 0.0 s";
  ui.sent.dataset.seconds = "0";
  setIdleControls(false);
  setState("connecting");
  current = new Call(source, file);
}

ui.startMic.addEventListener("click", () => start("microphone"));
ui.startFile.addEventListener("click", () => start("file", ui.fileInput.files[0]));
ui.fileInput.addEventListener("change", () =>
  setIdleControls(current === null || current.ws.readyState === WebSocket.CLOSED),
);
ui.stop.addEventListener("click", () => current?.stop());
setIdleControls(true);
