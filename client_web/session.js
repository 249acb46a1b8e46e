// engine.sessions: conversations kept in IndexedDB that resume after a reload, and the
// anchor's checkpoints, backtracking and forks on them.

import { respond } from './answer.js';
import { dropSession, load, readTurn, restoreTo, trail } from './conversation.js';

/**
 * A conversation with the anchor. `record` is what the engine keeps in IndexedDB (README.md):
 * its turns with the answers' token ids, the anchor session, holograms and sync position.
 */
export class Session {
  #rt;

  constructor(runtime, record) {
    this.#rt = runtime;
    this.record = record;
    /** For a fork: {session_id, checkpoint, position, shared_tokens} of its parent. */
    this.forkedFrom = null;
  }

  get id() { return this.record.id; }

  /**
   * Add `messages` (a string is one user message) and answer them: a chat.completion, or with
   * `stream` an async iterable of chat.completion.chunk. Resolves once the anchor has read them.
   */
  async send(messages, { max_tokens: maxTokens, stream = false } = {}) {
    const list = typeof messages === 'string' ? [{ role: 'user', content: messages }] : messages;
    await this.#rt.exclusive(() => readTurn(this.#rt, this.record, list));
    return respond(this.#rt, this.record, maxTokens, stream);
  }

  /** Go on with the last answer, as `send` answers. */
  async continue({ max_tokens: maxTokens, stream = false } = {}) {
    return respond(this.#rt, this.record, maxTokens, stream);
  }

  /** Put the conversation back on the GPU (from IndexedDB; from the anchor if a hologram is gone). */
  async resume() {
    const r = this.record;
    if (this.#rt.mode !== 'gpu' || r.mode !== 'gpu' || !r.segments.length) return;
    await this.#rt.exclusive(() => load(this.#rt, r));
  }

  /** Name the current position; {name, position}. */
  async checkpoint(name) {
    const c = await trail(this.#rt, this.record, 'checkpoints', { name });
    (this.record.checkpoints ??= []).push({ name: c.name, position: c.position });
    await this.#rt.persist(this.record);
    return { name: c.name, position: c.position };
  }

  /** Go back to checkpoint `name`: later turns and tokens are dropped. {position, dropped}. */
  async backtrack(name) {
    const r = await this.#rt.exclusive(async () => {
      const back = await trail(this.#rt, this.record, 'backtrack', { checkpoint: name });
      await restoreTo(this.#rt, this.record, back);
      return back;
    });
    return { position: r.position, dropped: r.dropped };
  }

  /** A new session that shares this one up to checkpoint `name`, answering with its own sampling. */
  async fork(name, { temperature, seed } = {}) {
    return this.#rt.exclusive(async () => {
      const r = await trail(this.#rt, this.record, 'fork', { checkpoint: name, temperature, seed });
      const record = structuredClone(this.record);
      Object.assign(record, { id: crypto.randomUUID(), title: `${record.title} (fork)`, created: Date.now(),
        session: { id: r.session_id, token: r.token },
        sampling: r.sampling ?? this.record.sampling });
      await restoreTo(this.#rt, record, r);
      const fork = new Session(this.#rt, record);
      fork.forkedFrom = { ...r.forked_from, shared_tokens: r.shared_tokens };
      return fork;
    });
  }

  /** The anchor's activations for this session (POST /v1/capture; `request` without session_id). */
  async capture(request) {
    const { id, token } = this.record.session;
    return this.#rt.anchor.json('/v1/capture', { method: 'POST', token, json: { session_id: id, ...request } });
  }

  /** Forget the conversation here and at the anchor. */
  async delete() {
    await this.#rt.keep('the deletion', () => this.#rt.storage.deleteSession(this.record.id));
    dropSession(this.#rt, this.record);
  }
}
