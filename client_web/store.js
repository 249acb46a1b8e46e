// The resonator page's IndexedDB store: model packs, conversation holograms and sessions.
//
// Packs and holograms are `.holo` files (protocol/SPEC.md). A pack is kept under its
// content hash, a hologram under its session with its content hash; both are re-hashed
// on every read, and an entry that no longer matches is deleted and counted in
// `store.corruptions`, so the caller fetches it again instead of decoding bad bytes.
// Running out of quota is a StoreError with code 'quota', never a silent failure.

import {contentHash} from './holo.js';

// One upgrade step per schema version; a new version appends a step.
const MIGRATIONS = [
  (db) => {
    db.createObjectStore('packs', {keyPath: 'hash'});
    db.createObjectStore('holograms', {keyPath: 'sessionId'});
    db.createObjectStore('sessions', {keyPath: 'id'});
  },
];
export const DB_VERSION = MIGRATIONS.length;

export class StoreError extends Error {
  /** code: 'quota' (not enough storage) or 'idb' (any other IndexedDB failure). */
  constructor(code, message, options) {
    super(message, options);
    this.name = 'StoreError';
    this.code = code;
  }
}

/**
 * Open (creating or upgrading) the database `name`.
 *
 * `storage` is where it lives: anything with `indexedDB` and `estimate()`, such as a
 * StorageBucket from `navigator.storageBuckets.open(...)`; by default the origin's storage.
 */
export async function openStore(name = 'hpi', storage = originStorage()) {
  const db = await new Promise((resolve, reject) => {
    const req = storage.indexedDB.open(name, DB_VERSION);
    req.onupgradeneeded = (e) => MIGRATIONS.slice(e.oldVersion).forEach((step) => step(req.result));
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(new StoreError('idb', `cannot open IndexedDB '${name}': ${req.error?.message}`,
                                              {cause: req.error}));
  });
  // Another tab loading a newer version of the page must not wait on this connection.
  db.onversionchange = () => db.close();
  return new Store(db, storage);
}

class Store {
  #db;
  #storage;

  constructor(db, storage) {
    this.#db = db;
    this.#storage = storage;
    /** Entries found corrupted (and deleted) by getPack / getHologram since opening. */
    this.corruptions = 0;
  }

  /** Keep a model pack under its content hash (the caller has checked that it is). */
  async putPack(hash, bytes) {
    await this.#putBytes('packs', {hash, bytes: exact(bytes)}, `model pack ${hash.slice(0, 12)}`);
  }

  /** The pack's bytes, or null when absent or corrupted. */
  async getPack(hash) {
    const entry = await this.#run('packs', 'readonly', (tx) => tx.objectStore('packs').get(hash));
    if (!entry) return null;
    return (await this.#verified('packs', hash, entry.bytes, hash)) ? entry.bytes : null;
  }

  /** Keep a session's hologram and `info` (e.g. etag, start, end); returns its content hash. */
  async putHologram(sessionId, bytes, info = {}) {
    const data = exact(bytes);
    const sha256 = await contentHash(data);
    await this.#putBytes('holograms', {sessionId, sha256, bytes: data, info}, `the hologram of session ${sessionId}`);
    return sha256;
  }

  /** {bytes, sha256, info} of the session's hologram, or null when absent or corrupted. */
  async getHologram(sessionId) {
    const entry = await this.#run('holograms', 'readonly', (tx) => tx.objectStore('holograms').get(sessionId));
    if (!entry || !(await this.#verified('holograms', sessionId, entry.bytes, entry.sha256))) return null;
    return {bytes: entry.bytes, sha256: entry.sha256, info: entry.info};
  }

  /** Keep a small session record (its `id`, token, model key, ...). */
  async putSession(record) {
    if (typeof record?.id !== 'string') throw new TypeError('a session record needs a string id');
    await this.#run('sessions', 'readwrite', (tx) => tx.objectStore('sessions').put(record), `session ${record.id}`);
  }

  async getSession(id) {
    return (await this.#run('sessions', 'readonly', (tx) => tx.objectStore('sessions').get(id))) ?? null;
  }

  async listSessions() {
    return this.#run('sessions', 'readonly', (tx) => tx.objectStore('sessions').getAll());
  }

  /** Forget a session and its holograms: the one kept under `id` and those under `id#<n>`. */
  async deleteSession(id) {
    await this.#run(['sessions', 'holograms'], 'readwrite', (tx) => {
      tx.objectStore('sessions').delete(id);
      tx.objectStore('holograms').delete(id);
      tx.objectStore('holograms').delete(IDBKeyRange.bound(`${id}#`, `${id}#\uffff`));
    });
  }

  /** {usage, quota} in bytes, as estimated by the browser; {} where it cannot tell. */
  async usage() {
    try {
      return (await this.#storage.estimate()) ?? {};
    } catch {
      return {};
    }
  }

  close() {
    this.#db.close();
  }

  async #verified(storeName, key, bytes, sha256) {
    const actual = await contentHash(bytes);
    if (actual === sha256) return true;
    await this.#run(storeName, 'readwrite', (tx) => tx.objectStore(storeName).delete(key));
    this.corruptions += 1;
    console.warn(`hpi store: ${storeName} entry ${key} is corrupted (SHA-256 ${actual}, expected ${sha256}); deleted`);
    return false;
  }

  // Refuses early what cannot fit: the browser may only notice once the transaction commits.
  async #putBytes(storeName, record, what) {
    what += ` (${human(record.bytes.byteLength)})`;
    const {usage, quota} = await this.usage();
    if (quota !== undefined && usage !== undefined && record.bytes.byteLength > quota - usage) {
      throw new StoreError('quota', `not enough storage for ${what}: only ` +
                           `${human(Math.max(quota - usage, 0))} of the ${human(quota)} quota is free`);
    }
    await this.#run(storeName, 'readwrite', (tx) => tx.objectStore(storeName).put(record), what);
  }

  // Resolves with the result of the request `body` returns, once the transaction commits.
  // `what` names the data for a quota error.
  #run(storeNames, mode, body, what = 'the data') {
    return new Promise((resolve, reject) => {
      let req;
      let tx;
      try {
        tx = this.#db.transaction(storeNames, mode);
        req = body(tx);
      } catch (e) {
        reject(new StoreError('idb', `IndexedDB failed: ${e.message}`, {cause: e}));
        return;
      }
      tx.oncomplete = () => resolve(req?.result);
      tx.onabort = async () => {
        const e = tx.error;
        if (e?.name !== 'QuotaExceededError') {
          reject(new StoreError('idb', `IndexedDB failed: ${e?.message ?? 'transaction aborted'}`, {cause: e}));
          return;
        }
        const {usage, quota} = await this.usage();
        const used = quota === undefined ? '' : ` (${human(usage)} of ${human(quota)} used)`;
        reject(new StoreError('quota', `the browser refused to store ${what}: storage quota exceeded${used}`,
                              {cause: e}));
      };
    });
  }
}

function originStorage() {
  return {
    indexedDB: globalThis.indexedDB,
    estimate: async () => navigator.storage?.estimate?.(),
  };
}

// A typed array is stored with its whole ArrayBuffer: copy a view of part of a buffer.
function exact(bytes) {
  const view = bytes instanceof ArrayBuffer ? new Uint8Array(bytes)
    : new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return view.byteLength === view.buffer.byteLength ? view : view.slice();
}

function human(n) {
  return n < 1e6 ? `${n} bytes` : `${(n / 1e6).toFixed(1)} MB`;
}
