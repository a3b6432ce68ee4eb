// The VM display player: a WebSocket stream of JPEG rectangles drawn onto a canvas, with the
// keyboard and mouse sent back. Wire protocol (service/stream/PROTOCOL.md):
//
//   server -> client, binary: byte 0 = kind
//     kind 1, a JPEG rectangle: bytes 1..12 = big-endian u16 x, y, w, h, screen_w, screen_h; bytes 13.. = JPEG
//     kind 2, end of frame:     bytes 1..8  = big-endian u64 server time, µs since the epoch
//     kind 3, an H.264 picture: bytes 1..4 = u16 screen_w, screen_h; byte 5 = flags (1: keyframe);
//                               bytes 6..13 = u64 server time; bytes 14.. = the access unit (Annex B)
//   client -> server, text JSON:
//     {"type":"key","code":"KeyA","key":"a","down":true}
//     {"type":"pointer","x":10,"y":20,"buttons":1}
//     {"type":"wheel","x":10,"y":20,"dx":0,"dy":1,"buttons":0}   (one notch; sign = direction)
//     {"type":"refresh"}
//
// Rectangles are decoded as they arrive (createImageBitmap, off the main thread) and a frame is drawn
// all at once, in order, when its end marker comes, so a half-updated frame never shows.
// Where the browser has WebCodecs with H.264 (a secure context: https, or http on localhost), the
// player asks for H.264 (?codec=h264) and draws each decoded picture as it comes out of VideoDecoder.

const KIND_RECT = 1;
const KIND_FRAME_END = 2;
const KIND_H264 = 3;
const RECT_HEADER = 13;
const H264_HEADER = 14;
const RETRY_MIN_MS = 500;
const RETRY_MAX_MS = 5000;
const WHEEL_NOTCH_PX = 100;  // a mouse wheel notch is about 100 px of deltaY in Chromium and Firefox

export class DisplayPlayer {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {string} url  ws:// or wss:// address of the display stream
   * @param {{onStatus?: (state: string, text: string) => void, onStats?: (text: string) => void,
   *          codec?: "auto" | "jpeg" | "h264"}} hooks  codec: auto = H.264 where the browser decodes it
   */
  constructor(canvas, url, hooks = {}) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d", { alpha: false });
    this.url = url;
    this.onStatus = hooks.onStatus || (() => {});
    this.onStats = hooks.onStats || (() => {});
    this.ws = null;
    this.stopped = true;
    this.retryMs = RETRY_MIN_MS;
    this.retryTimer = null;
    this.pending = [];            // the rectangles of the frame being received: [{x, y, w, h, sw, sh, bitmap}]
    this.presenting = Promise.resolve();
    this.pressed = new Set();     // key codes down in the VM, released when the canvas loses focus
    this.buttons = 0;
    this.moveQueued = null;       // the latest pointer position, sent on the next animation frame
    this.frames = 0;
    this.bytes = 0;
    this.lagUs = null;
    this.lastStatus = null;       // what onStatus said last about a live stream (its size)
    this.framesShown = 0;         // how many frames have been drawn since the page loaded
    this.statsTimer = null;
    this.codec = hooks.codec || "auto";
    this.useH264 = false;         // decided in start(); false again if the decoder fails
    this.codecChosen = false;     // no connection before that (reconnectNow may come first)
    this.decoder = null;          // the VideoDecoder of this connection's H.264 stream
    this.decoderCodec = null;
    this.bindInput();
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    const choose = this.codec === "jpeg" ? Promise.resolve(false) : h264Supported();
    choose.then((supported) => {
      this.useH264 = supported;
      this.codecChosen = true;
      if (!this.stopped && !this.ws) this.connect();
    });
    this.statsTimer = setInterval(() => this.reportStats(), 1000);
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    clearInterval(this.statsTimer);
    if (this.ws) this.ws.close(1000, "page closed");
    this.ws = null;
  }

  /** Connect now (e.g. the VM was just started) instead of waiting for the next retry. */
  reconnectNow() {
    if (this.stopped) return;
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) return;
    clearTimeout(this.retryTimer);
    this.retryMs = RETRY_MIN_MS;
    this.connect();
  }

  /** Ask the server for a whole new frame. */
  refresh() {
    this.send({ type: "refresh" });
  }

  // ------------------------------------------------------------------ connection

  connect() {
    if (!this.codecChosen) return;  // start() connects once it knows
    clearTimeout(this.retryTimer);
    this.lastStatus = null;
    this.onStatus("connecting", "connecting…");
    this.closeDecoder();  // every connection starts at a keyframe
    let ws;
    try {
      ws = new WebSocket(this.useH264 ? withCodec(this.url, "h264") : this.url);
    } catch (err) {
      this.scheduleRetry(String(err));
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.pending = [];
    ws.onopen = () => {
      if (ws !== this.ws) return;
      this.onStatus("waiting", "waiting for the first frame…");  // the server starts with the whole screen
    };
    ws.onmessage = (event) => {
      if (ws !== this.ws) return;
      if (typeof event.data === "string") {
        this.onText(event.data);
      } else {
        this.onBinary(event.data);
      }
    };
    ws.onclose = (event) => {
      if (ws !== this.ws) return;
      this.ws = null;
      this.releaseAll(false);
      if (this.stopped) return;
      this.scheduleRetry(event.reason || (event.code === 1006 ? "connection lost" : `closed (${event.code})`));
    };
    ws.onerror = () => {};  // onclose follows with the details
  }

  scheduleRetry(reason) {
    const seconds = (this.retryMs / 1000).toFixed(1).replace(/\.0$/, "");
    this.onStatus("down", `${reason}; retrying in ${seconds} s`);
    this.retryTimer = setTimeout(() => this.connect(), this.retryMs);
    this.retryMs = Math.min(this.retryMs * 2, RETRY_MAX_MS);
  }

  onText(text) {
    // The protocol sends binary only; a text message is the server telling something (an error).
    let message = text;
    try {
      const data = JSON.parse(text);
      message = data.message || data.detail || data.error || text;
    } catch (err) { /* plain text */ }
    this.onStatus("waiting", String(message));
  }

  onBinary(buffer) {
    const view = new DataView(buffer);
    if (buffer.byteLength < 1) return;
    this.bytes += buffer.byteLength;
    const kind = view.getUint8(0);
    if (kind === KIND_RECT && buffer.byteLength > RECT_HEADER) {
      const rect = {
        x: view.getUint16(1), y: view.getUint16(3), w: view.getUint16(5), h: view.getUint16(7),
        sw: view.getUint16(9), sh: view.getUint16(11),
      };
      const jpeg = new Blob([new Uint8Array(buffer, RECT_HEADER)], { type: "image/jpeg" });
      rect.bitmap = createImageBitmap(jpeg).catch(() => null);
      this.pending.push(rect);
    } else if (kind === KIND_H264 && buffer.byteLength > H264_HEADER) {
      this.onH264(view, buffer);
    } else if (kind === KIND_FRAME_END && buffer.byteLength >= 9) {
      const serverUs = view.getBigUint64(1);
      const frame = this.pending;
      this.pending = [];
      this.presenting = this.presenting.then(() => this.present(frame, serverUs));
    }
  }

  async present(frame, serverUs) {
    const bitmaps = await Promise.all(frame.map((rect) => rect.bitmap));
    if (this.stopped) return;
    let broken = false;
    for (let i = 0; i < frame.length; i++) {
      const rect = frame[i];
      if (this.canvas.width !== rect.sw || this.canvas.height !== rect.sh) {
        this.canvas.width = rect.sw;   // a new mode: the server sends the whole screen after it
        this.canvas.height = rect.sh;
      }
      const bitmap = bitmaps[i];
      if (bitmap) {
        this.ctx.drawImage(bitmap, rect.x, rect.y, rect.w, rect.h);
        bitmap.close();
      } else {
        broken = true;
      }
    }
    if (broken) this.refresh();  // a rectangle that did not decode: ask for the whole screen again
    this.shown(serverUs);
  }

  // ------------------------------------------------------------------ H.264 (WebCodecs)

  onH264(view, buffer) {
    const keyframe = (view.getUint8(5) & 1) === 1;
    const serverUs = view.getBigUint64(6);
    const data = new Uint8Array(buffer, H264_HEADER);
    if (keyframe) {
      const codec = avcCodec(data);
      if (codec && (!this.decoder || this.decoder.state === "closed" || codec !== this.decoderCodec)) {
        this.openDecoder(codec);
      }
    }
    if (!this.decoder || this.decoder.state !== "configured") return;  // nothing to decode from before a keyframe
    // The timestamp carries the server time through the decoder, for the lag shown in the stats.
    this.decoder.decode(new EncodedVideoChunk({ type: keyframe ? "key" : "delta", timestamp: Number(serverUs),
      data }));
  }

  openDecoder(codec) {
    this.closeDecoder();
    const decoder = new VideoDecoder({
      output: (picture) => this.showPicture(picture, decoder),
      error: (err) => this.h264Failed(decoder, err),
    });
    try {
      decoder.configure({ codec, optimizeForLatency: true });
    } catch (err) {
      this.h264Failed(decoder, err);
      return;
    }
    this.decoder = decoder;
    this.decoderCodec = codec;
  }

  closeDecoder() {
    if (this.decoder && this.decoder.state !== "closed") this.decoder.close();
    this.decoder = null;
    this.decoderCodec = null;
  }

  showPicture(picture, decoder) {
    if (this.stopped || decoder !== this.decoder) {
      picture.close();
      return;
    }
    if (this.canvas.width !== picture.displayWidth || this.canvas.height !== picture.displayHeight) {
      this.canvas.width = picture.displayWidth;
      this.canvas.height = picture.displayHeight;
    }
    this.ctx.drawImage(picture, 0, 0);
    const serverUs = BigInt(picture.timestamp);
    picture.close();
    this.shown(serverUs);
  }

  /** The browser could not decode the stream after all: JPEG from now on, on a new connection. */
  h264Failed(decoder, err) {
    if (decoder !== this.decoder && this.decoder !== null) return;
    console.warn("H.264 decoding failed, switching to JPEG:", err);
    this.useH264 = false;
    this.closeDecoder();
    if (this.ws) this.ws.close(1000, "switching to JPEG");
  }

  // ------------------------------------------------------------------ after a picture is on the canvas

  shown(serverUs) {
    this.frames++;
    this.framesShown++;
    this.canvas.dataset.frames = String(this.framesShown);
    this.lagUs = Number(BigInt(Math.round(Date.now() * 1000)) - serverUs);
    const shown = `${this.canvas.width}×${this.canvas.height}`;
    if (this.lastStatus !== shown) {  // the first frame of a connection, or a new mode
      this.retryMs = RETRY_MIN_MS;
      this.lastStatus = shown;
      this.onStatus("live", shown);
    }
  }

  reportStats() {
    const connected = this.ws && this.ws.readyState === WebSocket.OPEN;
    if (!connected) {
      this.onStats("");
    } else {
      const lag = this.lagUs === null ? "" : ` · lag ${Math.max(0, Math.round(this.lagUs / 1000))} ms`;
      const codec = this.decoder ? "H.264" : "JPEG";
      this.onStats(`${this.canvas.width}×${this.canvas.height} · ${codec} · ${this.frames} fps · ` +
        `${Math.round(this.bytes * 8 / 1000)} kbit/s${lag}`);
    }
    this.frames = 0;
    this.bytes = 0;
  }

  send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(message));
  }

  // ------------------------------------------------------------------ keyboard and mouse

  bindInput() {
    const canvas = this.canvas;
    canvas.addEventListener("keydown", (event) => {
      if (event.ctrlKey && event.altKey && event.code === "KeyG") {  // leave the display, as in QEMU's window
        event.preventDefault();
        canvas.blur();
        return;
      }
      event.preventDefault();
      this.pressed.add(event.code);
      this.send({ type: "key", code: event.code, key: event.key, down: true });
    });
    canvas.addEventListener("keyup", (event) => {
      event.preventDefault();
      if (!this.pressed.delete(event.code)) return;  // pressed before the display had focus
      this.send({ type: "key", code: event.code, key: event.key, down: false });
    });
    canvas.addEventListener("blur", () => this.releaseAll(true));

    canvas.addEventListener("pointerdown", (event) => {
      canvas.focus({ preventScroll: true });
      canvas.setPointerCapture(event.pointerId);
      event.preventDefault();
      this.pointer(event, true);
    });
    canvas.addEventListener("pointerup", (event) => this.pointer(event, true));
    canvas.addEventListener("pointermove", (event) => this.pointer(event, false));
    canvas.addEventListener("contextmenu", (event) => event.preventDefault());
    canvas.addEventListener("wheel", (event) => this.wheel(event), { passive: false });
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") this.refresh();
    });
  }

  /** Where the pointer is on the framebuffer (the canvas may be shown scaled). */
  position(event) {
    const box = this.canvas.getBoundingClientRect();
    const sx = box.width ? this.canvas.width / box.width : 1;
    const sy = box.height ? this.canvas.height / box.height : 1;
    const x = Math.round((event.clientX - box.left) * sx);
    const y = Math.round((event.clientY - box.top) * sy);
    return {
      x: Math.min(Math.max(x, 0), this.canvas.width - 1),
      y: Math.min(Math.max(y, 0), this.canvas.height - 1),
    };
  }

  pointer(event, immediate) {
    const { x, y } = this.position(event);
    const message = { type: "pointer", x, y, buttons: event.buttons };
    if (immediate || event.buttons !== this.buttons) {
      this.moveQueued = null;
      this.buttons = event.buttons;
      this.send(message);
      return;
    }
    // Moves are sent at most once per animation frame: the latest position wins.
    const first = this.moveQueued === null;
    this.moveQueued = message;
    if (first) {
      requestAnimationFrame(() => {
        if (this.moveQueued) this.send(this.moveQueued);
        this.moveQueued = null;
      });
    }
  }

  /** The wheel: one {"type":"wheel"} message per notch (PROTOCOL.md), whatever the device's resolution. */
  wheel(event) {
    event.preventDefault();
    const unit = { [WheelEvent.DOM_DELTA_PIXEL]: WHEEL_NOTCH_PX, [WheelEvent.DOM_DELTA_LINE]: 3 }[event.deltaMode] ?? 1;
    this.wheelX = (this.wheelX || 0) + event.deltaX / unit;
    this.wheelY = (this.wheelY || 0) + event.deltaY / unit;
    const { x, y } = this.position(event);
    for (const axis of ["wheelX", "wheelY"]) {
      while (Math.abs(this[axis]) >= 1) {
        const step = Math.sign(this[axis]);
        this[axis] -= step;
        this.send({ type: "wheel", x, y, dx: axis === "wheelX" ? step : 0, dy: axis === "wheelY" ? step : 0,
          buttons: event.buttons });
      }
    }
  }

  /** Release every key still down in the VM (the display lost focus, or the connection dropped). */
  releaseAll(send) {
    if (send) {
      for (const code of this.pressed) this.send({ type: "key", code, key: "", down: false });
    }
    this.pressed.clear();
  }
}

/** Whether this browser decodes H.264 with WebCodecs (Constrained Baseline, what the server sends). */
export async function h264Supported() {
  if (typeof VideoDecoder === "undefined") return false;  // no WebCodecs, or not a secure context
  try {
    const answer = await VideoDecoder.isConfigSupported({ codec: "avc1.42c028", optimizeForLatency: true });
    return answer.supported === true;
  } catch (err) {
    return false;
  }
}

/** RFC 6381's avc1.PPCCLL from the SPS (NAL unit type 7) at the start of an Annex B keyframe. */
export function avcCodec(data) {
  const hex = (byte) => byte.toString(16).padStart(2, "0");
  for (let i = 0; i + 6 < data.length; i++) {
    if (data[i] === 0 && data[i + 1] === 0 && data[i + 2] === 1 && (data[i + 3] & 0x1f) === 7) {
      return `avc1.${hex(data[i + 4])}${hex(data[i + 5])}${hex(data[i + 6])}`;
    }
  }
  return null;
}

function withCodec(url, codec) {
  const address = new URL(url);
  address.searchParams.set("codec", codec);
  return address.href;
}

/** The ws:// (or wss://) address of a VM's display stream, relative to this page. */
export function displayUrl(name) {
  const url = new URL(`api/v1/vms/${encodeURIComponent(name)}/display`, document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}
