// A conversation's record (README.md) and its two copies elsewhere: the anchor's session,
// which reads the turns and sends holograms, and the KV state on the GPU, rebuilt from the
// holograms kept in IndexedDB (or the anchor's full hologram when one is gone).

import { ProtocolError } from './errors.js';
import { GENESIS } from './sync.js';

export function newRecord(rt, sampling, title, ephemeral = false) {
  return { id: crypto.randomUUID(), title, created: Date.now(), modelKey: rt.model.model_key, mode: rt.mode,
    session: null, sampling, turns: [], segments: [], sync: null, ...(ephemeral ? { ephemeral } : {}) };
}

export const lastAnswer = (record) => record.turns.findLast((t) => t.role === 'assistant');

/** A hologram response: its bytes and the KV positions [start, end) it covers. */
async function segmentOf(rt, response) {
  const bytes = new Uint8Array(await response.arrayBuffer());
  rt.stats.hologramBytes += bytes.byteLength;
  return { bytes, start: Number(response.headers.get('X-HPI-Start')), end: Number(response.headers.get('X-HPI-End')) };
}

export async function fullHologram(rt, record) {
  const { id, token } = record.session;
  return segmentOf(rt, await rt.anchor.request(`/v1/sessions/${id}/hologram`, { token }));
}

/** Put a segment on the GPU (which must hold the conversation up to its start) and keep it. */
export async function addSegment(rt, record, seg) {
  rt.gpu.rewind(seg.start, null);
  await rt.gpu.addHologram(seg.bytes);
  const i = record.segments.findIndex((s) => s.start >= seg.start);
  if (i >= 0) record.segments.length = i;
  const key = `${record.id}#${record.segments.length}`;
  record.segments.push({ key, start: seg.start, end: seg.end });
  if (!record.ephemeral) {
    await rt.keep('the hologram', () => rt.storage.putHologram(key, seg.bytes, { start: seg.start, end: seg.end }));
  }
}

/**
 * Put a conversation on the GPU: its holograms from IndexedDB, then the confirmed tokens of
 * the last answer past them. If a hologram is gone, the anchor's full hologram replaces them.
 */
export async function load(rt, record) {
  rt.loaded = null;
  rt.current = record;
  rt.gpu.rewind(0, null);
  let fromStore = true;
  for (const seg of record.segments) {
    const kept = !record.ephemeral && await rt.storage.getHologram(seg.key);
    if (!kept) {
      fromStore = false;
      break;
    }
    await rt.gpu.addHologram(kept.bytes);
  }
  if (!fromStore) {
    record.segments = [];
    await addSegment(rt, record, await fullHologram(rt, record));
  }
  rt.stats.hologramFrom = fromStore ? 'IndexedDB' : 'network';
  const answer = lastAnswer(record);
  const covered = record.segments.at(-1).end + 1;
  if (answer && answer.start + answer.ids.length > covered) {
    await rt.gpu.append(answer.ids.slice(covered - answer.start));
  }
  if (rt.gpu.position !== record.sync.position - 1) {
    throw new ProtocolError(`the kept conversation is inconsistent (${rt.gpu.position} positions for ` +
      `${record.sync.position} tokens)`);
  }
  rt.loaded = record.id;
}

/** The anchor reads new messages: a new session with its hologram, or a delta for this one. */
export async function readTurn(rt, record, messages) {
  record.title ??= (messages.find((m) => m.role === 'user') || messages[0])?.content.slice(0, 60) ?? '';
  const turns = messages.map(({ role, content }) => ({ role, content }));
  if (record.mode === 'server') {
    record.turns.push(...turns, { role: 'assistant', content: '' });
    await rt.persist(record);
    return;
  }
  let seg;
  if (!record.session) {
    const body = await rt.anchor.json('/v1/sessions', { method: 'POST', json: { messages: turns, ...record.sampling } });
    record.session = { id: body.session_id, token: body.token };
    seg = await segmentOf(rt, await rt.anchor.request(body.hologram_url, { token: body.token }));
  } else {
    // Unverified answers were never read by the anchor: it reads them with the new turn.
    const sent = rt.draftSize ? turns : [{ role: 'assistant', content: lastAnswer(record).content }, ...turns];
    if (rt.loaded !== record.id) await load(rt, record);
    const { id, token } = record.session;
    seg = await segmentOf(rt, await rt.anchor.request(`/v1/sessions/${id}/messages`, {
      method: 'POST', token, json: { messages: sent } }));
  }
  rt.current = record;
  await addSegment(rt, record, seg);
  rt.loaded = record.id;
  record.sync = { position: seg.end + 1, chain: GENESIS };
  record.turns.push(...turns, { role: 'assistant', ids: [], content: '', start: seg.end + 1 });
  await rt.persist(record);
}

/** Ask the anchor to drop the record's session; nothing waits on it, and a failure changes nothing here. */
export function dropSession(rt, record) {
  const s = record.session;
  if (s) rt.anchor.request(`/v1/sessions/${s.id}`, { method: 'DELETE', token: s.token }).catch(() => {});
}

/** POST /v1/sessions/{id}/{path}: checkpoints, backtrack, fork. */
export function trail(rt, record, path, body) {
  const { id, token } = record.session;
  return rt.anchor.json(`/v1/sessions/${id}/${path}`, { method: 'POST', token, json: body });
}

/**
 * Put `record` in the state the anchor restored at a checkpoint (a backtrack's or a fork's
 * reply): turns after it dropped, the open answer's tokens, the holograms that end before it
 * (the tokens after them are fed again), and the sync position and chain there.
 */
export async function restoreTo(rt, record, r) {
  record.turns.length = r.n_messages;
  record.turns.push({ role: 'assistant', ids: [...r.tokens], content: rt.content(record, r.tokens), start: r.chain_base });
  record.segments = record.segments.filter((seg) => seg.end <= r.position - 1);
  record.checkpoints = (record.checkpoints || []).filter((c) => c.position <= r.position);
  record.sync = { position: r.position, chain: hexBytes(r.chain) };
  await load(rt, record);
  await rt.persist(record);
}

const hexBytes = (hex) => Uint8Array.from(hex.match(/../g), (h) => parseInt(h, 16));
