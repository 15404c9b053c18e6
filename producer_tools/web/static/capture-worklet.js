// Runs on the audio rendering thread: turns the input (the AudioContext's rate, 16 kHz) into
// 16-bit PCM chunks of `chunkFrames` samples and posts each one to the page. Mono: channel 0.
class PcmCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.chunkFrames = options.processorOptions.chunkFrames;
    this.chunk = new Int16Array(this.chunkFrames);
    this.filled = 0;
    this.port.onmessage = (event) => {
      if (event.data === "flush") {
        // The rest of the audio, then a marker, so the page sends "stop" after the last chunk.
        if (this.filled > 0) this.post(this.chunk.slice(0, this.filled));
        this.filled = 0;
        this.port.postMessage("flushed");
      }
    };
  }

  post(samples) {
    this.port.postMessage(samples.buffer, [samples.buffer]);
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      for (let i = 0; i < channel.length; i++) {
        const s = Math.max(-1, Math.min(1, channel[i]));
        this.chunk[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
        if (this.filled === this.chunkFrames) {
          this.post(this.chunk);
          this.chunk = new Int16Array(this.chunkFrames);
          this.filled = 0;
        }
      }
    }
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
