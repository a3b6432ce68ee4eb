// The VM display player: a WebSocket stream of JPEG rectangles drawn onto a canvas, with the
// keyboard and mouse sent back. Wire protocol (service/stream/PROTOCOL.md):
//
//   server -> client, binary: byte 0 = kind
//     kind 1, a JPEG rectangle: bytes 1..12 = big-endian u16 x, y, w, h, screen_w, screen_h; bytes 13.. = JPEG
//     kind 2, end of frame:     bytes 1..8  = big-endian u64 server time, µs since the epoch
//   client -> server, text JSON:
//     {"type":"key","code":"KeyA","key":"a","down":true}
//     {"type":"pointer","x":10,"y":20,"buttons":1}
//     {"type":"wheel","x":10,"y":20,"dx":0,"dy":1,"buttons":0}   (one notch; sign = direction)
//     {"type":"refresh"}
//
// Rectangles are decoded as they arrive (createImageBitmap, off the main thread) and a frame is drawn
// all at once, in order, when its end marker comes, so a half-updated frame never shows.

const KIND_RECT = 1;
const KIND_FRAME_END = 2;
const RECT_HEADER = 13;
const RETRY_MIN_MS = 500;
const RETRY_MAX_MS = 5000;
const WHEEL_NOTCH_PX = 100;  // a mouse wheel notch is about 100 px of deltaY in Chromium and Firefox

export class DisplayPlayer {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {string} url  ws:// or wss:// address of the display stream
   * @param {{onStatus?: (state: string, text: string) => void, onStats?: (text: string) => void}} hooks
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
    this.bindInput();
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this.connect();
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
    clearTimeout(this.retryTimer);
    this.lastStatus = null;
    this.onStatus("connecting", "connecting…");
    let ws;
    try {
      ws = new WebSocket(this.url);
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
      this.onStats(`${this.canvas.width}×${this.canvas.height} · ${this.frames} fps · ` +
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

/** The ws:// (or wss://) address of a VM's display stream, relative to this page. */
export function displayUrl(name) {
  const url = new URL(`api/v1/vms/${encodeURIComponent(name)}/display`, document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}
