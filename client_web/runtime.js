// The engine's state, shared by the modules that answer and keep conversations: the anchor,
// the GPU engine (restarted from IndexedDB when its device is lost), the store, and the queue
// that keeps one conversation on the GPU at a time.

import { cut, stopsOf } from './answer-rules.js';
import { AnchorClient } from './anchor.js';
import { checkAdapter, checkQuota } from './capabilities.js';
import { load } from './conversation.js';
import { DeviceLost, anchorError } from './errors.js';
import { packBytes } from './model.js';
import { Resonator } from './resonator.js';
import { openStore } from './store.js';

const DEFAULT_DRAFT = 16;  // bench/reconcile.py: see docs/reconcile.md

export class Runtime {
  constructor({ anchor = location.origin, apiKey = null, model = null, mode = 'gpu', onProgress = () => {},
    onDeviceLost = () => {}, onWarning = (message) => console.warn(message), database = 'hpi',
    draftSize = DEFAULT_DRAFT, maxProvisional = 256, shaderBase,
    batch = 4, gemv = {}, layout = null, subgroups = true, drift = false } = {}) {
    if (mode !== 'gpu' && mode !== 'server') throw new TypeError(`mode is 'gpu' or 'server', not ${mode}`);
    this.anchor = new AnchorClient(anchor, apiKey);
    Object.assign(this, { wanted: model, mode, onProgress, onDeviceLost, onWarning, database, draftSize,
      maxProvisional, drift, gpuOptions: { shaderBase, batch, gemv, layout, subgroups } });
    this.stats = { hologramBytes: 0 };
    this.gpu = null;
    this.loaded = null;  // id of the record whose conversation the GPU holds
    this.current = null;  // the record a restarted GPU engine loads again
    this.reconciler = null;
    this.queue = Promise.resolve();
    this.ready = Promise.resolve();
  }

  async start() {
    if (this.mode === 'gpu') await checkAdapter(this.gpuOptions.gemv);
    const { models } = await this.anchor.json('/v1/models');
    this.model = this.wanted ? models.find((m) => [m.model_key, m.anchor_model].includes(this.wanted)) : models[0];
    if (!this.model) {
      throw anchorError('unknown_model', `the anchor serves ${models.map((m) => m.anchor_model).join(', ')}, ` +
        `not ${this.wanted}`);
    }
    this.storage = await openStore(this.database);
    if (this.mode === 'gpu') {
      await checkQuota(this.storage, this.model);
      this.ready = this.startGpu();
      await this.ready;
    }
  }

  async startGpu() {
    const gpu = await Resonator.create(this.gpuOptions);
    gpu.onLost = (info) => this.lost(info);
    const bytes = await packBytes(this);
    this.onProgress({ phase: 'gpu', loaded: bytes.byteLength, total: bytes.byteLength, cached: true });
    await gpu.loadPack(bytes, this.model.pack_hash);
    this.gpu = gpu;
    this.stats.layout = gpu.layout;
    this.stats.subgroups = gpu.subgroups;
    this.loaded = null;
    if (this.current?.segments.length) await load(this, this.current);
  }

  lost(info) {
    this.reconciler?.stop();
    const recovered = this.ready = this.startGpu();
    recovered.catch(() => {});  // a failed restart is the page's to hear, through `recovered`
    this.lostError = new DeviceLost(`the GPU device was lost (${info.reason || 'unknown'}: ${info.message}); ` +
      'the engine restarts from IndexedDB', { reason: info.reason, recovered });
    this.onDeviceLost(this.lostError);
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

  /** An answer's text as the user reads it: cut before a stop text of the conversation's sampling. */
  content(record, ids) {
    return cut(this.decode(ids), stopsOf(record.sampling))[0];
  }
}
