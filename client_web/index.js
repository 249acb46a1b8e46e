// The HPI web SDK. createEngine({anchor}) gives an engine that answers in OpenAI's chat
// completion shapes, exactly as the anchor model would: the anchor reads the conversation and
// sends its hologram, this machine's GPU drafts the answer (resonator.js) and the anchor
// confirms it over the sync channel (reconcile.js). Stream chunks say which tokens are
// confirmed and which are still provisional. Sessions (conversations the engine keeps in
// IndexedDB with their holograms, store.js) resume after a reload without downloads, and
// wrap the anchor's checkpoints, backtracking and forks. Without WebGPU, `mode: 'server'`
// asks the anchor to write the answers itself. Failures are the typed errors of errors.js.

import { AnchorClient } from './anchor.js';
import { AdapterLimits, DeviceLost, HPIError, ProtocolError, QuotaExceeded, WebGPUUnavailable, anchorError }
  from './errors.js';
import { contentHash } from './holo.js';
import { Reconciler } from './reconcile.js';
import { Resonator } from './resonator.js';
import { openStore } from './store.js';
import { GENESIS } from './sync.js';

export * from './errors.js';

const DEFAULT_DRAFT = 16;  // bench/reconcile.py: see docs/reconcile.md
const DEFAULT_MAX_TOKENS = 256;
// What the kernels (shaders/) ask of an adapter: 64-invocation workgroups (gemv's WG may ask
// more) and up to 7 storage buffers in one bind group (gemv: two weight planes and five more).
const KERNEL_LIMITS = { maxComputeWorkgroupSizeX: 64, maxComputeInvocationsPerWorkgroup: 64,
  maxStorageBuffersPerShaderStage: 7 };

/**
 * Check this browser, load the model pack onto the GPU and resolve to a ready engine.
 * Options (README.md): anchor, apiKey, model, mode ('gpu' | 'server'), onProgress,
 * onDeviceLost, onWarning, database, draftSize, maxProvisional, shaderBase, batch, gemv, drift.
 */
export async function createEngine(options = {}) {
  const runtime = new Runtime(options);
  await runtime.start();
  return new Engine(runtime);
}

/** The public face of a Runtime: chat completions, sessions and what a page may show. */
class Engine {
  #rt;

  constructor(runtime) {
    this.#rt = runtime;
    this.chat = { completions: { create: (params) => runtime.complete(params) } };
    this.sessions = {
      /** A new conversation; nothing is sent or kept before its first `send`. */
      create: ({ temperature = 0, seed = 0, title = null } = {}) => new Session(runtime,
        runtime.newRecord({ temperature, seed }, title)),
      /** The conversations kept in IndexedDB for this model, newest first. */
      list: async () => (await runtime.storage.listSessions())
        .filter((r) => r.modelKey === runtime.model.model_key && Array.isArray(r.turns))
        .sort((a, b) => b.created - a.created)
        .map((r) => new Session(runtime, r)),
    };
  }

  /** The anchor's model descriptor (/v1/models): model_key, anchor_model, pack_hash, pack_bytes, ... */
  get model() { return this.#rt.model; }

  /** 'gpu' (drafted here, confirmed by the anchor) or 'server' (the anchor writes alone). */
  get mode() { return this.#rt.mode; }

  /** packFrom, hologramFrom ('network' | 'IndexedDB'), hologramBytes, tokensPerSecond. */
  get stats() { return this.#rt.stats; }

  /** The IndexedDB cache: `corruptions` (entries found damaged and fetched again), `usage()`. */
  get storage() { return this.#rt.storage; }

  /** Resolves when the engine can answer (after a lost device: once it has restarted). */
  get ready() { return this.#rt.ready; }

  /** The GPUDevice the engine drafts on (null in server mode). */
  get device() { return this.#rt.gpu?.device ?? null; }

  /** KV positions held on the GPU for the loaded conversation. */
  get position() { return this.#rt.gpu?.position; }

  /** "vendor / architecture" of the GPU adapter. */
  get adapter() { return this.#rt.gpu?.adapter; }

  /** Release the GPU device. */
  destroy() { this.#rt.gpu?.destroy(); }
}

/**
 * A conversation with the anchor. `record` is what the engine keeps in IndexedDB (README.md):
 * its turns with the answers' token ids, the anchor session, holograms and sync position.
 */
class Session {
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
    await this.#rt.exclusive(() => this.#rt.readTurn(this.record, list));
    return this.#rt.respond(this.record, maxTokens, stream);
  }

  /** Go on with the last answer, as `send` answers. */
  async continue({ max_tokens: maxTokens, stream = false } = {}) {
    return this.#rt.respond(this.record, maxTokens, stream);
  }

  /** Put the conversation back on the GPU (from IndexedDB; from the anchor if a hologram is gone). */
  async resume() {
    const r = this.record;
    if (this.#rt.mode !== 'gpu' || r.mode !== 'gpu' || !r.segments.length) return;
    await this.#rt.exclusive(() => this.#rt.load(r));
  }

  /** Name the current position; {name, position}. */
  async checkpoint(name) {
    const c = await this.#rt.trail(this.record, 'checkpoints', { name });
    (this.record.checkpoints ??= []).push({ name: c.name, position: c.position });
    await this.#rt.persist(this.record);
    return { name: c.name, position: c.position };
  }

  /** Go back to checkpoint `name`: later turns and tokens are dropped. {position, dropped}. */
  async backtrack(name) {
    const r = await this.#rt.exclusive(async () => {
      const back = await this.#rt.trail(this.record, 'backtrack', { checkpoint: name });
      await this.#rt.restoreTo(this.record, back);
      return back;
    });
    return { position: r.position, dropped: r.dropped };
  }

  /** A new session that shares this one up to checkpoint `name`, answering with its own sampling. */
  async fork(name, { temperature, seed } = {}) {
    return this.#rt.exclusive(async () => {
      const r = await this.#rt.trail(this.record, 'fork', { checkpoint: name, temperature, seed });
      const record = structuredClone(this.record);
      Object.assign(record, { id: crypto.randomUUID(), title: `${record.title} (fork)`, created: Date.now(),
        session: { id: r.session_id, token: r.token },
        sampling: { temperature: r.sampling[0], seed: r.sampling[1] } });
      await this.#rt.restoreTo(record, r);
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
    const s = this.record.session;
    if (s) this.#rt.anchor.request(`/v1/sessions/${s.id}`, { method: 'DELETE', token: s.token }).catch(() => {});
  }
}

/** The engine's state: the anchor, the GPU engine, the store and the conversations' logic. */
class Runtime {
  constructor({ anchor = location.origin, apiKey = null, model = null, mode = 'gpu', onProgress = () => {},
    onDeviceLost = () => {}, onWarning = (message) => console.warn(message), database = 'hpi',
    draftSize = DEFAULT_DRAFT, maxProvisional = 256, shaderBase = new URL('./shaders/', import.meta.url).href,
    batch = 4, gemv = {}, drift = false } = {}) {
    if (mode !== 'gpu' && mode !== 'server') throw new TypeError(`mode is 'gpu' or 'server', not ${mode}`);
    this.anchor = new AnchorClient(anchor, apiKey);
    Object.assign(this, { wanted: model, mode, onProgress, onDeviceLost, onWarning, database, draftSize,
      maxProvisional, drift, gpuOptions: { shaderBase, batch, gemv } });
    this.stats = { hologramBytes: 0 };
    this.gpu = null;
    this.loaded = null;  // id of the record whose conversation the GPU holds
    this.current = null;  // the record a restarted GPU engine loads again
    this.reconciler = null;
    this.queue = Promise.resolve();
    this.ready = Promise.resolve();
  }

  async start() {
    if (this.mode === 'gpu') await this.checkAdapter();
    const { models } = await this.anchor.json('/v1/models');
    this.model = this.wanted ? models.find((m) => [m.model_key, m.anchor_model].includes(this.wanted)) : models[0];
    if (!this.model) {
      throw anchorError('unknown_model', `the anchor serves ${models.map((m) => m.anchor_model).join(', ')}, ` +
        `not ${this.wanted}`);
    }
    this.storage = await openStore(this.database);
    if (this.mode === 'gpu') {
      await this.checkQuota();
      this.ready = this.startGpu();
      await this.ready;
    }
  }

  // ---- before any download --------------------------------------------------------------

  async checkAdapter() {
    if (!('gpu' in navigator)) throw new WebGPUUnavailable('This browser does not offer WebGPU (navigator.gpu is missing).');
    const adapter = await navigator.gpu.requestAdapter();
    if (!adapter) throw new WebGPUUnavailable('WebGPU is present but no GPU adapter is available.');
    const wg = this.gpuOptions.gemv.WG || 0;
    const needs = { ...KERNEL_LIMITS, maxComputeWorkgroupSizeX: Math.max(KERNEL_LIMITS.maxComputeWorkgroupSizeX, wg),
      maxComputeInvocationsPerWorkgroup: Math.max(KERNEL_LIMITS.maxComputeInvocationsPerWorkgroup, wg) };
    const short = Object.entries(needs).filter(([name, needed]) => adapter.limits[name] < needed)
      .map(([name, needed]) => ({ name, needed, available: adapter.limits[name] }));
    if (short.length) {
      throw new AdapterLimits(`the GPU adapter offers less than the engine needs: ${short.map((l) =>
        `${l.name} ${l.available} < ${l.needed}`).join(', ')}`, { limits: short });
    }
  }

  async checkQuota() {
    if (await this.storage.getPack(this.model.pack_hash)) return;
    const { usage, quota } = await this.storage.usage();
    if (quota === undefined || usage === undefined) return;
    const needed = this.model.pack_bytes, available = Math.max(quota - usage, 0);
    if (needed > available) {
      throw new QuotaExceeded(`the model pack needs ${mb(needed)} of storage; this origin has ${mb(available)} left`,
        { needed, available });
    }
  }

  // ---- the GPU engine and its pack ------------------------------------------------------

  async startGpu() {
    const gpu = await Resonator.create(this.gpuOptions);
    gpu.onLost = (info) => this.lost(info);
    const bytes = await this.packBytes();
    this.onProgress({ phase: 'gpu', loaded: bytes.byteLength, total: bytes.byteLength, cached: true });
    await gpu.loadPack(bytes, this.model.pack_hash);
    this.gpu = gpu;
    this.loaded = null;
    if (this.current?.segments.length) await this.load(this.current);
  }

  lost(info) {
    this.reconciler?.stop();
    const recovered = this.ready = this.startGpu();
    recovered.catch(() => {});  // a failed restart is the page's to hear, through `recovered`
    this.lostError = new DeviceLost(`the GPU device was lost (${info.reason || 'unknown'}: ${info.message}); ` +
      'the engine restarts from IndexedDB', { reason: info.reason, recovered });
    this.onDeviceLost(this.lostError);
  }

  async packBytes() {
    const { pack_hash: hash, pack_url: url, pack_bytes: total } = this.model;
    const cached = await this.storage.getPack(hash);
    if (cached) {
      this.stats.packFrom = 'IndexedDB';
      this.onProgress({ phase: 'download', loaded: cached.byteLength, total: cached.byteLength, cached: true });
      return cached;
    }
    const reader = (await this.anchor.request(url)).body.getReader();
    const bytes = new Uint8Array(total);
    let loaded = 0;
    this.onProgress({ phase: 'download', loaded, total, cached: false });
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      if (loaded + value.byteLength > total) throw new ProtocolError(`the model pack is larger than ${total} bytes`);
      bytes.set(value, loaded);
      loaded += value.byteLength;
      this.onProgress({ phase: 'download', loaded, total, cached: false });
    }
    if (loaded !== total || await contentHash(bytes) !== hash) {
      throw new ProtocolError('the model pack does not match its hash');
    }
    await this.keep('the model pack', () => this.storage.putPack(hash, bytes));
    this.stats.packFrom = 'network';
    return bytes;
  }

  /** Run `work` after the GPU work queued before it (one conversation on the GPU at a time). */
  exclusive(work) {
    const result = this.queue.then(async () => {
      await this.ready;
      return work();
    });
    this.queue = result.catch(() => {});
    return result;
  }

  // Keeping a copy is a convenience: a full store costs a download next time, not the answer.
  async keep(what, put) {
    try {
      await put();
    } catch (e) {
      this.onWarning(`Could not keep ${what} in IndexedDB: ${e.message}`, e);
    }
  }

  persist(record) {
    return record.ephemeral ? undefined : this.keep('the conversation', () => this.storage.putSession(record));
  }

  decode(ids) {
    return this.gpu.decode(ids.filter((id) => !this.gpu.eos.has(id)));
  }

  // ---- conversations --------------------------------------------------------------------

  newRecord(sampling, title, ephemeral = false) {
    return { id: crypto.randomUUID(), title, created: Date.now(), modelKey: this.model.model_key, mode: this.mode,
      session: null, sampling, turns: [], segments: [], sync: null, ...(ephemeral ? { ephemeral } : {}) };
  }

  /** A hologram response: its bytes and the KV positions [start, end) it covers. */
  async segmentOf(response) {
    const bytes = new Uint8Array(await response.arrayBuffer());
    this.stats.hologramBytes += bytes.byteLength;
    return { bytes, start: Number(response.headers.get('X-HPI-Start')), end: Number(response.headers.get('X-HPI-End')) };
  }

  async fullHologram(record) {
    const { id, token } = record.session;
    return this.segmentOf(await this.anchor.request(`/v1/sessions/${id}/hologram`, { token }));
  }

  /** Put a segment on the GPU (which must hold the conversation up to its start) and keep it. */
  async addSegment(record, seg) {
    this.gpu.rewind(seg.start, null);
    await this.gpu.addHologram(seg.bytes);
    const i = record.segments.findIndex((s) => s.start >= seg.start);
    if (i >= 0) record.segments.length = i;
    const key = `${record.id}#${record.segments.length}`;
    record.segments.push({ key, start: seg.start, end: seg.end });
    if (!record.ephemeral) {
      await this.keep('the hologram', () => this.storage.putHologram(key, seg.bytes, { start: seg.start, end: seg.end }));
    }
  }

  /**
   * Put a conversation on the GPU: its holograms from IndexedDB, then the confirmed tokens of
   * the last answer past them. If a hologram is gone, the anchor's full hologram replaces them.
   */
  async load(record) {
    this.loaded = null;
    this.current = record;
    this.gpu.rewind(0, null);
    let fromStore = true;
    for (const seg of record.segments) {
      const kept = !record.ephemeral && await this.storage.getHologram(seg.key);
      if (!kept) {
        fromStore = false;
        break;
      }
      await this.gpu.addHologram(kept.bytes);
    }
    if (!fromStore) {
      record.segments = [];
      await this.addSegment(record, await this.fullHologram(record));
    }
    this.stats.hologramFrom = fromStore ? 'IndexedDB' : 'network';
    const answer = lastAnswer(record);
    const covered = record.segments.at(-1).end + 1;
    if (answer && answer.start + answer.ids.length > covered) {
      await this.gpu.append(answer.ids.slice(covered - answer.start));
    }
    if (this.gpu.position !== record.sync.position - 1) {
      throw new ProtocolError(`the kept conversation is inconsistent (${this.gpu.position} positions for ` +
        `${record.sync.position} tokens)`);
    }
    this.loaded = record.id;
  }

  /** The anchor reads new messages: a new session with its hologram, or a delta for this one. */
  async readTurn(record, messages) {
    record.title ??= (messages.find((m) => m.role === 'user') || messages[0])?.content.slice(0, 60) ?? '';
    const turns = messages.map(({ role, content }) => ({ role, content }));
    if (record.mode === 'server') {
      record.turns.push(...turns, { role: 'assistant', content: '' });
      await this.persist(record);
      return;
    }
    let seg;
    if (!record.session) {
      const body = await this.anchor.json('/v1/sessions', { method: 'POST', json: { messages: turns } });
      record.session = { id: body.session_id, token: body.token };
      seg = await this.segmentOf(await this.anchor.request(body.hologram_url, { token: body.token }));
    } else {
      // Unverified answers were never read by the anchor: it reads them with the new turn.
      const sent = this.draftSize ? turns : [{ role: 'assistant', content: lastAnswer(record).content }, ...turns];
      if (this.loaded !== record.id) await this.load(record);
      const { id, token } = record.session;
      seg = await this.segmentOf(await this.anchor.request(`/v1/sessions/${id}/messages`, {
        method: 'POST', token, json: { messages: sent } }));
    }
    this.current = record;
    await this.addSegment(record, seg);
    this.loaded = record.id;
    record.sync = { position: seg.end + 1, chain: GENESIS };
    record.turns.push(...turns, { role: 'assistant', ids: [], content: '', start: seg.end + 1 });
    await this.persist(record);
  }

  /** POST /v1/sessions/{id}/{path}: checkpoints, backtrack, fork. */
  trail(record, path, body) {
    const { id, token } = record.session;
    return this.anchor.json(`/v1/sessions/${id}/${path}`, { method: 'POST', token, json: body });
  }

  /**
   * Put `record` in the state the anchor restored at a checkpoint (a backtrack's or a fork's
   * reply): turns after it dropped, the open answer's tokens, the holograms that end before it
   * (the tokens after them are fed again), and the sync position and chain there.
   */
  async restoreTo(record, r) {
    record.turns.length = r.n_messages;
    record.turns.push({ role: 'assistant', ids: [...r.tokens], content: this.decode(r.tokens), start: r.chain_base });
    record.segments = record.segments.filter((seg) => seg.end <= r.position - 1);
    record.checkpoints = (record.checkpoints || []).filter((c) => c.position <= r.position);
    record.sync = { position: r.position, chain: hexBytes(r.chain) };
    await this.load(record);
    await this.persist(record);
  }

  // ---- answers --------------------------------------------------------------------------

  /** OpenAI's create: the anchor reads `messages` in a session of its own, deleted after the answer. */
  async complete({ messages, stream = false, temperature = 0, seed = 0, max_tokens: maxTokens,
    max_completion_tokens: maxCompletionTokens }) {
    if (!Array.isArray(messages) || !messages.length) throw new TypeError('messages: a non-empty array');
    const record = this.newRecord({ temperature, seed }, null, true);
    const forget = () => {
      if (this.current === record) this.current = null;
      const s = record.session;
      if (s) this.anchor.request(`/v1/sessions/${s.id}`, { method: 'DELETE', token: s.token }).catch(() => {});
    };
    try {
      await this.exclusive(() => this.readTurn(record, messages));
    } catch (e) {
      forget();
      throw e;
    }
    return this.respond(record, maxCompletionTokens ?? maxTokens, stream, forget);
  }

  /**
   * Write up to `maxTokens` more of the record's last answer: a chat.completion, or with
   * `stream` the chunks as they come. `done` runs once the answer is over.
   */
  respond(record, maxTokens = DEFAULT_MAX_TOKENS, stream = false, done = () => {}) {
    const chunks = new ChunkStream(this.model.anchor_model);
    const write = record.mode === 'server' ? () => this.writeOnServer(record, maxTokens, chunks)
      : () => this.writeOnGpu(record, maxTokens, chunks);
    this.exclusive(write).then(() => chunks.end(), (e) => chunks.end(e)).finally(() => {
      this.reconciler = null;
      done();
    });
    return stream ? chunks : chunks.completion();
  }

  async writeOnGpu(record, maxTokens, chunks) {
    if (this.mode !== 'gpu') throw new HPIError('this conversation was written on a GPU; the engine is in server mode');
    const gpu = this.gpu;
    const answer = lastAnswer(record);
    // A verdict may confirm one token past the limit: a session keeps it (its record follows
    // the anchor's), a one-off completion stops at max_tokens as OpenAI's does.
    const answerText = new AnswerText(this, answer, chunks, record.ephemeral ? maxTokens : Infinity);
    try {
      if (this.loaded !== record.id) await this.load(record);
      if (this.draftSize) {
        await this.verify(record, answer, maxTokens, answerText);
      } else {
        await this.draftAlone(record, answer, maxTokens, answerText);
      }
      answerText.finish();
    } catch (e) {
      throw gpu.isLost ? this.lostError : e;
    } finally {
      await this.persist(record);
    }
  }

  /** Draft on the GPU and keep what the anchor confirms. */
  async verify(record, answer, maxTokens, answerText) {
    const r = this.reconciler = new Reconciler(this.gpu, record.session, record.sync, {
      anchor: this.anchor, draftSize: this.draftSize, maxProvisional: this.maxProvisional, drift: this.drift,
      ...record.sampling,
      onChange: () => {
        this.stats.tokensPerSecond = r.stats.generated / Math.max(r.stats.draftSeconds, 1e-3);
        answerText.update(r);
      },
      onConfirmed: async (tokens, sync) => {
        answer.ids.push(...tokens);
        answer.content = this.decode(answer.ids);
        answer.ended = tokens.some((id) => this.gpu.eos.has(id));
        record.sync = sync;
        await this.persist(record);
      },
      onRefresh: async (ready) => {
        this.onWarning('The anchor holds a different history for this conversation; reloading it from the anchor…');
        record.segments = [];
        await this.addSegment(record, await this.fullHologram(record));
        answer.ids = [...ready.tokens];
        answer.content = this.decode(answer.ids);
        answer.ended = ready.tokens.some((id) => this.gpu.eos.has(id));
        record.sync = { position: ready.position, chain: ready.chain };
        await this.persist(record);
      },
    });
    answerText.cancel = () => r.stop();
    await r.run(maxTokens);
  }

  /** The resonator alone (draftSize 0): nothing is verified (tests and benchmarks). */
  async draftAlone(record, answer, maxTokens, answerText) {
    const t0 = performance.now();
    const ids = await this.gpu.generate(maxTokens, { ...record.sampling, onTokens: (batch) => {
      answer.ids.push(...batch);
      answer.content = this.decode(answer.ids);
      record.sync.position += batch.length;
      this.stats.tokensPerSecond = answer.ids.length / ((performance.now() - t0) / 1000);
      answerText.update(null);
    } });
    answer.ended = ids.some((id) => this.gpu.eos.has(id));
  }

  /** Server mode: the anchor writes the answer (/v1/chat/completions, streamed). */
  async writeOnServer(record, maxTokens, chunks) {
    const answer = lastAnswer(record);
    const messages = record.turns.filter((t) => t !== answer).map(({ role, content }) => ({ role, content }));
    const controller = new AbortController();
    chunks.cancel = () => controller.abort();
    const r = await this.anchor.request('/v1/chat/completions', { method: 'POST', signal: controller.signal,
      json: { messages, max_tokens: maxTokens, stream: true, ...record.sampling } });
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    const t0 = performance.now();
    let buffer = '', pieces = 0, finish = null;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        const events = buffer.split('\n\n');
        buffer = events.pop();
        for (const event of events) {
          const data = event.replace(/^data: /, '');
          if (data === '[DONE]') continue;
          const choice = JSON.parse(data).choices[0];
          if (choice.delta.content) {
            answer.content += choice.delta.content;
            pieces += 1;
            chunks.push(choice.delta.content, { mode: 'server', confirmed: pieces, tokens: [], provisional: [],
              provisional_text: '', correction: null });
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        this.stats.tokensPerSecond = pieces / ((performance.now() - t0) / 1000);
      }
    } catch (e) {
      if (e.name !== 'AbortError') throw e;
    } finally {
      answer.ended = finish === 'stop';
      await this.persist(record);
    }
    chunks.push('', { mode: 'server', confirmed: pieces, tokens: [], provisional: [], provisional_text: '',
      correction: null }, finish || 'length');
  }
}

/**
 * The chunks of one answer from its token ids. Only confirmed text goes in `delta.content`
 * (so the deltas add up to the exact answer); the provisional tail is restated whole in every
 * chunk. A character split across tokens waits for its last byte, as the anchor's own stream does.
 */
class AnswerText {
  constructor(rt, answer, chunks, limit) {
    Object.assign(this, { rt, answer, chunks, limit });
    this.base = answer.ids.length;
    this.baseText = stable(rt.decode(answer.ids)).length;
    this.sent = '';
    this.reported = 0;
    this.tail = [];
    this.corrections = 0;
    this.online = null;
  }

  set cancel(stop) { this.chunks.cancel = stop; }

  /** After any change; `r`: the Reconciler (null when nothing is verified). */
  update(r, finish = null) {
    const ids = this.answer.ids.slice(0, this.base + this.limit);
    const mine = ids.slice(this.base);
    const tail = r ? [...r.provisional] : [];
    const text = this.rt.decode(ids);
    const confirmed = (finish ? text : stable(text)).slice(this.baseText);
    if (!confirmed.startsWith(this.sent)) throw new ProtocolError('the confirmed text of the answer changed');
    const tokens = mine.slice(this.reported);
    const corrections = r?.stats.corrections ?? 0;
    let correction = null;
    if (corrections > this.corrections) {
      const now = [...tokens, ...tail];
      let kept = 0;
      while (kept < this.tail.length && this.tail[kept] === now[kept]) kept++;
      correction = { dropped: this.tail.length - kept };
    }
    const online = r ? r.online : null;
    const delta = confirmed.slice(this.sent.length);
    if (!finish && !delta && !tokens.length && !correction && online === this.online && sameIds(tail, this.tail)) return;
    const provisionalText = tail.length ? this.rt.decode([...ids, ...tail]).slice(this.baseText + confirmed.length) : '';
    Object.assign(this, { sent: confirmed, reported: mine.length, tail, corrections, online });
    this.chunks.push(delta, { mode: r ? 'verified' : 'unverified', confirmed: mine.length, tokens,
      provisional: tail, provisional_text: provisionalText, correction, online,
      ...(r ? { stats: { ...r.stats } } : {}) }, finish);
    if (finish) this.chunks.usage = { prompt_tokens: this.answer.start + this.base, completion_tokens: mine.length,
      total_tokens: this.answer.start + this.base + mine.length };
  }

  finish() {
    const ended = this.answer.ids.slice(this.base, this.base + this.limit).some((id) => this.rt.gpu.eos.has(id));
    this.update(this.rt.reconciler, ended ? 'stop' : 'length');
  }
}

/** An async iterable of chat.completion.chunk objects, filled as the answer is written. */
class ChunkStream {
  constructor(model) {
    this.head = { id: `chatcmpl-${crypto.randomUUID()}`, created: Math.floor(Date.now() / 1000), model };
    this.queue = [];
    this.wake = null;
    this.closed = false;
    this.error = null;
    this.first = true;
    this.usage = undefined;
    this.cancel = () => {};
  }

  push(content, hpi, finish = null) {
    const delta = this.first ? { role: 'assistant', content } : (content || !finish ? { content } : {});
    this.first = false;
    this.queue.push({ ...this.head, object: 'chat.completion.chunk',
      choices: [{ index: 0, delta, finish_reason: finish }], hpi });
    this.signal();
  }

  end(error = null) {
    this.closed = true;
    this.error = error;
    this.signal();
  }

  signal() {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  async* [Symbol.asyncIterator]() {
    try {
      for (;;) {
        if (this.queue.length) {
          yield this.queue.shift();
        } else if (this.closed) {
          if (this.error) throw this.error;
          return;
        } else {
          await new Promise((resolve) => { this.wake = resolve; });
        }
      }
    } finally {
      if (!this.closed) this.cancel();  // the consumer stopped reading: stop writing
    }
  }

  /** The whole answer as one chat.completion. */
  async completion() {
    let content = '', finish = null, mode;
    const tokens = [];
    for await (const chunk of this) {
      content += chunk.choices[0].delta.content || '';
      finish = chunk.choices[0].finish_reason || finish;
      tokens.push(...chunk.hpi.tokens);
      mode = chunk.hpi.mode;
    }
    return { ...this.head, object: 'chat.completion',
      choices: [{ index: 0, message: { role: 'assistant', content }, finish_reason: finish }],
      ...(this.usage ? { usage: this.usage } : {}), hpi: { mode, tokens } };
  }
}

const lastAnswer = (record) => record.turns.findLast((t) => t.role === 'assistant');
const hexBytes = (hex) => Uint8Array.from(hex.match(/../g), (h) => parseInt(h, 16));
const sameIds = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
// Text that later tokens cannot change: a trailing U+FFFD may be half a character.
const stable = (text) => text.replace(/\uFFFD+$/, '');
const mb = (n) => `${(n / 1e6).toFixed(1)} MB`;
