// The model pack: from IndexedDB when it is there, else downloaded from the anchor with
// progress, checked against its hash and kept for the next start.

import { ProtocolError } from './errors.js';
import { contentHash } from './holo.js';

/** The bytes of the runtime's model pack; sets `rt.stats.packFrom`. */
export async function packBytes(rt) {
  const { pack_hash: hash, pack_url: url, pack_bytes: total } = rt.model;
  const cached = await rt.storage.getPack(hash);
  if (cached) {
    rt.stats.packFrom = 'IndexedDB';
    rt.onProgress({ phase: 'download', loaded: cached.byteLength, total: cached.byteLength, cached: true });
    return cached;
  }
  const reader = (await rt.anchor.request(url)).body.getReader();
  const bytes = new Uint8Array(total);
  let loaded = 0;
  rt.onProgress({ phase: 'download', loaded, total, cached: false });
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    if (loaded + value.byteLength > total) throw new ProtocolError(`the model pack is larger than ${total} bytes`);
    bytes.set(value, loaded);
    loaded += value.byteLength;
    rt.onProgress({ phase: 'download', loaded, total, cached: false });
  }
  if (loaded !== total || await contentHash(bytes) !== hash) {
    throw new ProtocolError('the model pack does not match its hash');
  }
  await rt.keep('the model pack', () => rt.storage.putPack(hash, bytes));
  rt.stats.packFrom = 'network';
  return bytes;
}
