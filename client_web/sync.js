// The page's end of the reconciliation channel (/v1/sessions/{id}/sync, protocol/SPEC.md,
// "Reconciliation frames"): a hello, then one draft at a time, each answered by a verdict.

import { decode, encode } from './msgpack.js';

export const GENESIS = new Uint8Array(32);

export class SyncChannel {
  /** Connect and say hello; resolves to the channel and the anchor's `ready` frame. */
  static async open(sessionId, token, { position, chain = GENESIS, temperature = 0, seed = 0 }) {
    const url = new URL(`/v1/sessions/${sessionId}/sync`, location.href);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(url);
    ws.binaryType = 'arraybuffer';
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new Error(`cannot reach the anchor's sync channel at ${url}`));
    });
    const channel = new SyncChannel(ws);
    const ready = await channel.request({ type: 'hello', token, position, chain, temperature, seed });
    return { channel, ready };
  }

  constructor(ws) {
    this.ws = ws;
    this.waiting = null;
    ws.onmessage = (e) => {
      const w = this.waiting;
      this.waiting = null;
      try {
        w?.resolve(decode(e.data));
      } catch (err) {
        w?.reject(err);
      }
    };
    ws.onclose = () => this.waiting?.reject(new Error('the sync channel closed'));
  }

  /** Send one frame and wait for the answer; an `error` frame rejects with its message. */
  async request(frame) {
    if (this.waiting) throw new Error('one request at a time on the sync channel');
    const answer = new Promise((resolve, reject) => { this.waiting = { resolve, reject }; });
    this.ws.send(encode({ v: 1, ...frame }));
    const reply = await answer;
    if (reply.type === 'error') throw new Error(`anchor: ${reply.code}: ${reply.message}`);
    return reply;
  }

  draft(position, chain, tokens) {
    return this.request({ type: 'draft', position, chain, tokens });
  }

  close() {
    this.ws.close();
  }
}
