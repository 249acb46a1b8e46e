// createEngine and the engine it resolves to: the public face of a Runtime.

import { complete } from './answer.js';
import { newRecord } from './conversation.js';
import { Runtime } from './runtime.js';
import { samplingOf } from './sampling.js';
import { Session } from './session.js';

/**
 * Check this browser, load the model pack onto the GPU and resolve to a ready engine.
 * Options (README.md): anchor, apiKey, model, mode ('gpu' | 'server'), onProgress,
 * onDeviceLost, onWarning, database, draftSize, maxProvisional, shaderBase, batch, gemv, layout, subgroups
 * (false: the 'gpu' layout reduces through workgroup memory only), drift.
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
    this.chat = { completions: { create: (params) => complete(runtime, params) } };
    this.sessions = {
      /**
       * A new conversation; nothing is sent or kept before its first `send`. Its answers' sampling
       * takes OpenAI's fields (temperature, seed, top_p, top_k, presence_penalty, frequency_penalty,
       * logit_bias, stop, response_format), confirmed by the anchor exactly as it applies them.
       */
      create: ({ title = null, ...sampling } = {}) => new Session(runtime, newRecord(runtime, samplingOf(sampling), title)),
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

  /** packFrom, hologramFrom ('network' | 'IndexedDB'), hologramBytes, tokensPerSecond, layout (the kernels' layout),
   *  subgroups (the subgroup size the 'gpu' layout's reductions shuffle within; 0: workgroup memory only). */
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

  /** The gemv layout the GPU engine runs: 'cpu' (software adapters) or 'gpu' (null in server mode). */
  get layout() { return this.#rt.gpu?.layout ?? null; }

  /** Release the GPU device. */
  destroy() { this.#rt.gpu?.destroy(); }
}
