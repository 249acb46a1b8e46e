// The page's end of the reconciliation channel (/v1/sessions/{id}/sync, protocol/SPEC.md,
// "Reconciliation frames"): a hello, then one draft at a time, each answered by a verdict.

import { AnchorClient } from './anchor.js';
import { AnchorUnreachable, ProtocolError, anchorError } from './errors.js';
import { decode, encode } from './msgpack.js';
import { VERSION } from './protocol.js';

export const GENESIS = new Uint8Array(32);

export class SyncChannel {
  /**
   * Connect and say hello; resolves to the channel and the anchor's `ready` frame.
   * `stats.bytesSent/bytesReceived` count the frames; `onClose` runs when the socket closes;
   * `anchor` (an AnchorClient) says where the anchor is, by default the page's own origin.
   */
  static async open(sessionId, token, { position, chain = GENESIS, temperature = 0, seed = 0 },
    { stats = {}, onClose = () => {}, anchor = new AnchorClient() } = {}) {
    const { url, protocols } = anchor.websocket(`/v1/sessions/${sessionId}/sync`);
    const ws = new WebSocket(url, protocols);
    ws.binaryType = 'arraybuffer';
    const opened = await new Promise((resolve) => {
      ws.onopen = () => resolve(true);
      ws.onerror = ws.onclose = () => resolve(false);
    });
    if (!opened) throw await SyncChannel.whyRefused(anchor, sessionId, token, url);
    const channel = new SyncChannel(ws, stats, onClose);
    try {
      const ready = await channel.request({ type: 'hello', token, position, chain, temperature, seed });
      return { channel, ready };
    } catch (e) {
      channel.close();
      throw e;
    }
  }

  /**
   * The anchor refuses the channel of a session it does not hold before it opens, and a page
   * cannot read why: ask the session's own endpoint, which says 404 (or 401/403) in JSON.
   */
  static async whyRefused(anchor, sessionId, token, url) {
    try {
      await anchor.request(`/v1/sessions/${sessionId}/checkpoints`, { token });
    } catch (e) {
      return e;
    }
    return new AnchorUnreachable(`cannot reach the anchor's sync channel at ${url}`, { url: url.href });
  }

  constructor(ws, stats, onClose) {
    this.ws = ws;
    this.stats = stats;
    this.waiting = null;
    this.closed = false;
    ws.onmessage = (e) => {
      this.stats.bytesReceived = (this.stats.bytesReceived || 0) + e.data.byteLength;
      const w = this.waiting;
      this.waiting = null;
      try {
        w?.resolve(decode(e.data));
      } catch (err) {
        w?.reject(new ProtocolError(`a frame the page cannot decode: ${err.message}`, { cause: err }));
      }
    };
    ws.onclose = () => {
      this.closed = true;
      this.waiting?.reject(new AnchorUnreachable('the sync channel closed'));
      this.waiting = null;
      onClose();
    };
  }

  /** Send one frame and wait for the answer; an `error` frame rejects with its typed error. */
  async request(frame) {
    if (this.closed) throw new AnchorUnreachable('the sync channel is closed');
    if (this.waiting) throw new Error('one request at a time on the sync channel');
    const answer = new Promise((resolve, reject) => { this.waiting = { resolve, reject }; });
    const bytes = encode({ v: VERSION, ...frame });
    this.stats.bytesSent = (this.stats.bytesSent || 0) + bytes.byteLength;
    this.ws.send(bytes);
    const reply = await answer;
    if (reply.type === 'error') throw anchorError(reply.code, reply.message);
    return reply;
  }

  draft(position, chain, tokens) {
    return this.request({ type: 'draft', position, chain, tokens });
  }

  close() {
    this.ws.close();
  }
}
