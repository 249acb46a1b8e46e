// The HPI web SDK. createEngine({anchor}) gives an engine that answers in OpenAI's chat
// completion shapes, exactly as the anchor model would: the anchor reads the conversation and
// sends its hologram, this machine's GPU drafts the answer (resonator.js) and the anchor
// confirms it over the sync channel (reconcile.js). Stream chunks say which tokens are
// confirmed and which are still provisional. Sessions (conversations the engine keeps in
// IndexedDB with their holograms, store.js) resume after a reload without downloads, and
// wrap the anchor's checkpoints, backtracking and forks. Without WebGPU, `mode: 'server'`
// asks the anchor to write the answers itself. Failures are the typed errors of errors.js.

export { createEngine } from './engine.js';
export * from './errors.js';
