// The chat page. The anchor reads each user turn and sends its hologram; this machine's GPU
// drafts the answer (resonator.js) and the anchor confirms it over the sync channel
// (reconcile.js), so the answer is exactly the anchor model's. Conversations, their
// holograms and the model pack are kept in IndexedDB (store.js): a reload, or a lost GPU
// device, picks up where it was without downloading or re-reading earlier turns. Without
// WebGPU the page asks the anchor to write the answers itself (server-only streaming).
// `window.hpi` exposes the page's state to tests and benchmarks.
//
// URL parameters: `sync=K` drafts per verification pass (0: the resonator alone, unverified);
// `mode=server` forces server-only answers; `provisional=N` bounds the tail drafted while the
// anchor is unreachable; `drift=1` (tests) corrupts a drafted token of every pass; gemv
// workgroup size `wg`, steps per submission `batch`.

import { NoWebGPUError, Resonator } from './resonator.js';
import { contentHash } from './holo.js';
import { openStore } from './store.js';
import { GENESIS } from './sync.js';
import { Reconciler } from './reconcile.js';

const DEFAULT_DRAFT = 16;  // bench/reconcile.py: see docs/reconcile.md
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const engineOptions = {
  batch: Number(params.get('batch') || 4),
  gemv: params.has('wg') ? { WG: Number(params.get('wg')) } : {},
};
const draftSize = params.has('sync') ? Math.max(0, Number(params.get('sync')) || 0) : DEFAULT_DRAFT;
const maxProvisional = Math.max(1, Number(params.get('provisional')) || 256);
const drift = params.get('drift') === '1';

const hpi = window.hpi = {
  engine: null, store: null, model: null, mode: null, conversations: [], conv: null, loaded: null,
  reconciler: null, busy: false, recoveries: 0, stats: { hologramBytes: 0 },
  ready: null,  // resolves once the page can answer
};

function status(text, error = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', error);
}

async function fetchOk(url, init = {}) {
  const r = await fetch(url, init);
  if (!r.ok) {
    let message = `HTTP ${r.status}`;
    try { message = (await r.json()).error?.message || message; } catch { /* not JSON */ }
    throw new Error(`${url}: ${message}`);
  }
  return r;
}

const bearer = (conv) => ({ Authorization: `Bearer ${conv.session.token}` });
const lastAnswer = (conv) => conv.turns.findLast((t) => t.role === 'assistant');

// Keeping a copy is a convenience: a full store costs a download next time, not the answer.
async function keep(what, put) {
  try {
    await put();
  } catch (e) {
    console.warn(`not keeping ${what}: ${e.message}`);
    status(`Could not keep ${what} in IndexedDB: ${e.message}`, true);
  }
}

const persist = (conv) => keep('the conversation', () => hpi.store.putSession(conv));

// ---- view -------------------------------------------------------------------------------

function decode(ids) {
  return hpi.engine.decode(ids.filter((id) => !hpi.engine.eos.has(id)));
}

// An answer written on the GPU is kept as token ids (its text too, for pages without WebGPU).
function text(turn) {
  if (turn.ids === undefined) return turn.content;
  return hpi.engine ? decode(turn.ids) : turn.content;
}

function render() {
  const list = hpi.conversations.map((c) => {
    const li = document.createElement('li');
    li.classList.toggle('active', c === hpi.conv);
    const open = document.createElement('button');
    open.className = 'open';
    open.textContent = c.title;
    open.onclick = () => switchTo(c);
    const del = document.createElement('button');
    del.className = 'delete';
    del.textContent = '×';
    del.title = 'Delete this conversation';
    del.onclick = () => remove(c);
    li.append(open, del);
    return li;
  });
  $('conversations').replaceChildren(...list);
  const conv = hpi.conv;
  const turns = (conv?.turns || []).map((turn) => {
    const div = document.createElement('div');
    div.className = `msg ${turn.role}`;
    div.textContent = text(turn);
    return div;
  });
  const r = hpi.reconciler;
  if (r?.provisional.length && turns.length) {
    const span = document.createElement('span');
    span.className = 'provisional';
    span.textContent = decode(r.provisional);
    turns.at(-1).append(span);
  }
  $('messages').replaceChildren(...turns);
  $('checkpoints').replaceChildren(...(conv?.checkpoints || []).map((c) => new Option(`${c.name} (at ${c.position})`,
    c.name)));
  showStats();
}

function showStats() {
  const s = hpi.stats;
  const r = hpi.reconciler?.stats;
  const items = [
    ['mode', hpi.mode === 'gpu' ? (draftSize ? `GPU drafts, anchor verifies K=${draftSize}` : 'GPU only, unverified')
      : 'server only'],
    ['tok/s', s.tokensPerSecond?.toFixed(2)],
    ['accepted/pass', r?.passes ? (r.accepted / r.passes).toFixed(2) : undefined],
    ['anchor passes', r?.passes], ['corrections', r?.corrections],
    ['provisional', hpi.reconciler ? `${hpi.reconciler.provisional.length}/${maxProvisional}` +
      (hpi.reconciler.running && !hpi.reconciler.online ? ' (anchor unreachable, retrying)' : '') : undefined],
    ['reconnects', r?.reconnects || undefined],
    ['sync bytes', r ? r.bytesSent + r.bytesReceived : undefined], ['hologram bytes', s.hologramBytes || undefined],
    ['position', hpi.engine?.position], ['pack', s.packFrom], ['holograms', s.hologramFrom],
    ['adapter', hpi.engine?.adapter],
  ];
  $('stats').replaceChildren(...items.filter(([, v]) => v !== undefined).map(([k, v]) => {
    const el = document.createElement('span');
    el.innerHTML = `${k} <b></b>`;
    el.querySelector('b').textContent = v;
    return el;
  }));
}

function setBusy(busy) {
  hpi.busy = busy;
  const can = !busy && (hpi.mode === 'server' || hpi.engine);
  $('send').disabled = !can;
  const answer = hpi.conv && lastAnswer(hpi.conv);
  $('more').disabled = !can || hpi.mode !== 'gpu' || hpi.conv?.mode !== 'gpu' || !answer || answer.ended;
  $('new').disabled = busy;
}

// ---- model pack and holograms -----------------------------------------------------------

async function packBytes() {
  const { pack_hash: hash, pack_url: url } = hpi.model;
  const cached = await hpi.store.getPack(hash);
  if (cached) {
    hpi.stats.packFrom = 'IndexedDB';
    return cached;
  }
  status(`Downloading the model pack (${(hpi.model.pack_bytes / 1e6).toFixed(1)} MB)…`);
  const bytes = new Uint8Array(await (await fetchOk(url)).arrayBuffer());
  if (await contentHash(bytes) !== hash) throw new Error('the model pack does not match its hash');
  await keep('the model pack', () => hpi.store.putPack(hash, bytes));
  hpi.stats.packFrom = 'network';
  return bytes;
}

/** A hologram response: its bytes and the KV positions [start, end) it covers. */
async function segmentOf(response) {
  const bytes = new Uint8Array(await response.arrayBuffer());
  hpi.stats.hologramBytes += bytes.byteLength;
  return { bytes, start: Number(response.headers.get('X-HPI-Start')), end: Number(response.headers.get('X-HPI-End')) };
}

/** Put a segment on the engine (which must hold the conversation up to its start) and keep it. */
async function addSegment(conv, seg) {
  hpi.engine.rewind(seg.start, null);
  await hpi.engine.addHologram(seg.bytes);
  const i = conv.segments.findIndex((s) => s.start >= seg.start);
  if (i >= 0) conv.segments.length = i;
  const key = `${conv.id}#${conv.segments.length}`;
  conv.segments.push({ key, start: seg.start, end: seg.end });
  await keep('the hologram', () => hpi.store.putHologram(key, seg.bytes, { start: seg.start, end: seg.end }));
}

/**
 * Put a conversation on the engine: its holograms from IndexedDB, then the confirmed tokens
 * of the last answer past them. If a hologram is gone, the anchor's full hologram replaces them.
 */
async function loadConversation(conv) {
  hpi.loaded = null;
  hpi.engine.rewind(0, null);
  let fromStore = true;
  for (const seg of conv.segments) {
    const kept = await hpi.store.getHologram(seg.key);
    if (!kept) {
      fromStore = false;
      break;
    }
    await hpi.engine.addHologram(kept.bytes);
  }
  if (!fromStore) {
    conv.segments = [];
    await addSegment(conv, await segmentOf(await fetchOk(`/v1/sessions/${conv.session.id}/hologram`,
      { headers: bearer(conv) })));
  }
  hpi.stats.hologramFrom = fromStore ? 'IndexedDB' : 'network';
  const answer = lastAnswer(conv);
  const covered = conv.segments.at(-1).end + 1;
  if (answer && answer.start + answer.ids.length > covered) {
    await hpi.engine.append(answer.ids.slice(covered - answer.start));
  }
  if (hpi.engine.position !== conv.sync.position - 1) {
    throw new Error(`the kept conversation is inconsistent (${hpi.engine.position} positions for ` +
      `${conv.sync.position} tokens)`);
  }
  hpi.loaded = conv.id;
}

/** A fresh engine with the pack and the current conversation. */
async function startEngine() {
  const engine = await Resonator.create(engineOptions);
  engine.onLost = (info) => recover(info);
  status('Loading the model pack onto the GPU…');
  await engine.loadPack(await packBytes(), hpi.model.pack_hash);
  hpi.engine = engine;
  if (hpi.conv?.mode === 'gpu' && hpi.conv.segments.length) await loadConversation(hpi.conv);
}

async function recover(info) {
  hpi.recoveries += 1;
  hpi.reconciler?.stop();
  status(`The GPU device was lost (${info.reason || 'unknown'}: ${info.message}); restarting from IndexedDB…`, true);
  hpi.ready = startEngine().then(() => {
    status(`Recovered from a lost GPU device at position ${hpi.engine.position}.`);
    render();
    setBusy(false);
  });
  await hpi.ready;
}

// ---- answering --------------------------------------------------------------------------

function sampling() {
  const t = Math.min(2, Number($('temperature').value) || 0);
  // The anchor takes 0 (greedy) or 0.001 to 2 (protocol/SPEC.md): below that a temperature is greedy.
  return { temperature: t < 0.001 ? 0 : t, seed: Math.floor(Math.random() * 2 ** 32) };
}

/** Draft on the GPU and keep what the anchor confirms (or, with sync=0, what the GPU wrote). */
async function answerOnGpu(conv, n) {
  const answer = lastAnswer(conv);
  if (hpi.loaded !== conv.id) await loadConversation(conv);
  const t0 = performance.now();
  if (!draftSize) {
    const ids = await hpi.engine.generate(n, { ...conv.sampling, onTokens: (batch) => {
      answer.ids.push(...batch);
      answer.content = decode(answer.ids);
      conv.sync.position += batch.length;
      hpi.stats.tokensPerSecond = answer.ids.length / ((performance.now() - t0) / 1000);
      render();
    } });
    answer.ended = ids.some((id) => hpi.engine.eos.has(id));
    return;
  }
  const r = hpi.reconciler = new Reconciler(hpi.engine, conv.session, conv.sync, {
    draftSize, maxProvisional, drift, ...conv.sampling,
    onChange: () => {
      hpi.stats.tokensPerSecond = r.stats.generated / Math.max(r.stats.draftSeconds, 1e-3);
      render();
    },
    onConfirmed: async (tokens, sync) => {
      answer.ids.push(...tokens);
      answer.content = decode(answer.ids);
      answer.ended = tokens.some((id) => hpi.engine.eos.has(id));
      conv.sync = sync;
      await persist(conv);
    },
    onRefresh: async (ready) => {
      status('The anchor holds a different history for this conversation; reloading it from the anchor…', true);
      conv.segments = [];
      await addSegment(conv, await segmentOf(await fetchOk(`/v1/sessions/${conv.session.id}/hologram`,
        { headers: bearer(conv) })));
      answer.ids = [...ready.tokens];
      answer.content = decode(answer.ids);
      answer.ended = ready.tokens.some((id) => hpi.engine.eos.has(id));
      conv.sync = { position: ready.position, chain: ready.chain };
      await persist(conv);
    },
  });
  await r.run(n);
}

/** Server-only: the anchor writes the answer (/v1/chat/completions, streamed). */
async function answerOnServer(conv, n) {
  const answer = lastAnswer(conv);
  const messages = conv.turns.filter((t) => t !== answer).map((t) => ({ role: t.role, content: t.content }));
  const r = await fetchOk('/v1/chat/completions', {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ messages, max_tokens: n, stream: true, ...conv.sampling }),
  });
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  const t0 = performance.now();
  let buffer = '', chunks = 0;
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
        chunks += 1;
      }
      if (choice.finish_reason) answer.ended = choice.finish_reason === 'stop';
    }
    hpi.stats.tokensPerSecond = chunks / ((performance.now() - t0) / 1000);
    render();
  }
}

async function generate() {
  const conv = hpi.conv;
  const n = Math.max(1, Math.min(1024, Number($('max-new').value) || 64));
  setBusy(true);
  status(hpi.mode === 'gpu' ? 'Writing on the GPU…' : 'The anchor is writing…');
  const engine = hpi.engine;
  try {
    await (hpi.mode === 'gpu' ? answerOnGpu(conv, n) : answerOnServer(conv, n));
    status(lastAnswer(conv).ended ? 'Done (end of answer).' : 'Done.');
  } catch (e) {
    // A lost device fails the step in flight; recover() has taken over by now.
    if (!engine?.isLost) status(`The answer failed: ${e.message}`, true);
  } finally {
    await persist(conv);
    if (engine === hpi.engine) setBusy(false);
    render();
  }
}

/** The anchor reads the user turn: a new session with its hologram, or a delta for this one. */
async function readTurn(conv, content) {
  const json = { 'Content-Type': 'application/json' };
  if (!conv.session) {
    const body = await (await fetchOk('/v1/sessions', {
      method: 'POST', headers: json, body: JSON.stringify({ messages: [{ role: 'user', content }] }),
    })).json();
    conv.session = { id: body.session_id, token: body.token };
    return segmentOf(await fetchOk(body.hologram_url, { headers: bearer(conv) }));
  }
  const messages = [{ role: 'user', content }];
  if (!draftSize) messages.unshift({ role: 'assistant', content: text(lastAnswer(conv)) });
  if (hpi.loaded !== conv.id) await loadConversation(conv);
  return segmentOf(await fetchOk(`/v1/sessions/${conv.session.id}/messages`, {
    method: 'POST', headers: { ...json, ...bearer(conv) }, body: JSON.stringify({ messages }),
  }));
}

async function send(content) {
  // A conversation stays with the mode it began in: a server-only one has no hologram.
  const conv = hpi.conv?.mode === hpi.mode ? hpi.conv : newConversation();
  setBusy(true);
  conv.sampling ??= sampling();
  if (!conv.turns.length) conv.title = content.slice(0, 60);
  try {
    if (hpi.mode === 'gpu') {
      status('The anchor is reading your message…');
      const seg = await readTurn(conv, content);
      await addSegment(conv, seg);
      hpi.loaded = conv.id;
      conv.sync = { position: seg.end + 1, chain: GENESIS };
      conv.turns.push({ role: 'user', content }, { role: 'assistant', ids: [], content: '', start: seg.end + 1 });
    } else {
      conv.turns.push({ role: 'user', content }, { role: 'assistant', content: '' });
    }
  } catch (e) {
    setBusy(false);
    return status(`The anchor refused the message: ${e.message}`, true);
  }
  if (!hpi.conversations.includes(conv)) hpi.conversations.unshift(conv);
  await persist(conv);
  $('prompt').value = '';
  render();
  await generate();
}

function newConversation() {
  hpi.conv = { id: crypto.randomUUID(), title: 'New chat', created: Date.now(), modelKey: hpi.model.model_key,
    mode: hpi.mode, session: null, sampling: null, turns: [], segments: [], sync: null };
  hpi.reconciler = null;
  render();
  return hpi.conv;
}

async function switchTo(conv) {
  if (hpi.busy || conv === hpi.conv) return;
  hpi.conv = conv;
  hpi.reconciler = null;
  render();
  if (hpi.mode === 'gpu' && conv.mode === 'gpu' && conv.segments.length) {
    setBusy(true);
    status('Loading the conversation from IndexedDB…');
    try {
      await loadConversation(conv);
      status(`Conversation loaded at position ${hpi.engine.position}.`);
    } catch (e) {
      status(`Could not load the conversation: ${e.message}`, true);
    }
    setBusy(false);
  }
  render();
}

async function remove(conv) {
  if (hpi.busy) return;
  hpi.conversations = hpi.conversations.filter((c) => c !== conv);
  await keep('the deletion', () => hpi.store.deleteSession(conv.id));
  if (conv.session) {
    fetch(`/v1/sessions/${conv.session.id}`, { method: 'DELETE', headers: bearer(conv) }).catch(() => {});
  }
  if (conv === hpi.conv) newConversation();
  render();
}

// ---- trail: checkpoints, backtracking, forks (protocol/SPEC.md) -------------------------

const hexBytes = (hex) => Uint8Array.from(hex.match(/../g), (h) => parseInt(h, 16));

async function trailRequest(conv, path, body) {
  return (await fetchOk(`/v1/sessions/${conv.session.id}/${path}`, {
    method: 'POST', headers: { 'Content-Type': 'application/json', ...bearer(conv) }, body: JSON.stringify(body),
  })).json();
}

async function checkpoint() {
  const conv = hpi.conv;
  if (hpi.busy || conv?.mode !== 'gpu' || !conv.session) return;
  const c = await trailRequest(conv, 'checkpoints', { name: `checkpoint ${(conv.checkpoints ??= []).length + 1}` });
  conv.checkpoints.push({ name: c.name, position: c.position });
  await persist(conv);
  render();
}

/**
 * Put `conv` in the state the anchor restored at a checkpoint (a backtrack's or a fork's
 * reply): turns after it dropped, the open answer's tokens, the holograms that end before it
 * (the tokens after them are fed again), and the sync position and chain there.
 */
async function restoreTo(conv, r) {
  conv.turns.length = r.n_messages;
  const answer = { role: 'assistant', ids: [...r.tokens], content: '', start: r.chain_base };
  answer.content = decode(answer.ids);
  conv.turns.push(answer);
  conv.segments = conv.segments.filter((seg) => seg.end <= r.position - 1);
  conv.checkpoints = (conv.checkpoints || []).filter((c) => c.position <= r.position);
  conv.sync = { position: r.position, chain: hexBytes(r.chain) };
  await loadConversation(conv);
  await persist(conv);
}

async function trailAction(fork) {
  const conv = hpi.conv;
  const name = $('checkpoints').value;
  if (hpi.busy || !name) return;
  setBusy(true);
  try {
    if (fork) {
      const temperature = Math.max(0.1, Number($('temperature').value) || 0.7);
      const r = await trailRequest(conv, 'fork', { checkpoint: name, temperature,
        seed: Math.floor(Math.random() * 2 ** 32) });
      const copy = structuredClone(conv);
      Object.assign(copy, { id: crypto.randomUUID(), title: `${conv.title} (fork)`, created: Date.now(),
        session: { id: r.session_id, token: r.token },
        sampling: { temperature: r.sampling[0], seed: r.sampling[1] } });
      hpi.conv = copy;
      hpi.conversations.unshift(copy);
      await restoreTo(copy, r);
      status(`Forked at ${r.position} (${r.shared_tokens} positions shared with the parent).`);
    } else {
      const r = await trailRequest(conv, 'backtrack', { checkpoint: name });
      await restoreTo(conv, r);
      status(`Back at ${r.position}: ${r.dropped} tokens dropped.`);
    }
    hpi.reconciler = null;
  } catch (e) {
    status(`${fork ? 'Fork' : 'Backtrack'} failed: ${e.message}`, true);
  } finally {
    setBusy(false);
    render();
  }
}

/**
 * The anchor's attention weights of one layer and head over the last answer (POST /v1/capture),
 * as a heatmap of queries (rows) by keys (columns) within the answer, and the answer's tokens
 * with the peaks of attention received (capture's percentile, default 90) highlighted.
 */
async function showAttention() {
  const conv = hpi.conv;
  const answer = conv && lastAnswer(conv);
  if (!conv?.session || !answer?.ids?.length) return status('Write an answer on the GPU first.', true);
  const layer = Number($('layer').value), head = Number($('head').value);
  const start = answer.start, end = answer.start + answer.ids.length;
  let cap;
  try {
    cap = await (await fetchOk('/v1/capture', {
      method: 'POST', headers: { 'Content-Type': 'application/json', ...bearer(conv) },
      body: JSON.stringify({ session_id: conv.session.id, layers: [layer], heads: [head],
        states: ['attn.hook_pattern'], start, end }),
    })).json();
  } catch (e) {
    return status(`No attention view: ${e.message}`, true);
  }
  const rows = cap.tensors[`blocks.${layer}.attn.hook_pattern`].data[0];  // [n queries][end keys]
  const n = rows.length;
  const cell = Math.max(2, Math.floor(480 / n));
  const canvas = $('attention');
  canvas.width = canvas.height = n * cell;
  const g = canvas.getContext('2d');
  for (let q = 0; q < n; q++) {
    for (let k = 0; k < n; k++) {
      const shade = Math.round(255 * (1 - Math.sqrt(rows[q][start + k])));  // sqrt: faint weights stay visible
      g.fillStyle = `rgb(${shade},${shade},255)`;
      g.fillRect(k * cell, q * cell, cell, cell);
    }
  }
  const peaks = new Set(cap.peaks.attention.positions);
  $('attention-tokens').replaceChildren(...cap.tokens.positions.map((pos, i) => {
    const span = document.createElement('span');
    span.textContent = cap.tokens.pieces[i];
    span.classList.toggle('peak', peaks.has(pos));
    span.title = `position ${pos}, attention received ${cap.tokens.attention_received[i].toFixed(3)}`;
    return span;
  }));
  hpi.attention = { layer, head, start, end, rows, peaks: [...peaks] };
}

async function boot() {
  hpi.store = await openStore();
  hpi.model = (await (await fetchOk('/v1/models')).json()).models[0];
  hpi.conversations = (await hpi.store.listSessions())
    .filter((c) => c.modelKey === hpi.model.model_key && Array.isArray(c.turns))
    .sort((a, b) => b.created - a.created);
  hpi.conv = hpi.conversations[0] || null;
  hpi.mode = params.get('mode') === 'server' ? 'server' : 'gpu';
  if (hpi.mode === 'gpu') {
    try {
      await startEngine();
    } catch (e) {
      if (!(e instanceof NoWebGPUError)) throw e;
      hpi.mode = 'server';
      $('nogpu').hidden = false;
      $('nogpu').textContent = `${e.message} Answers come from the anchor alone (server-only streaming); ` +
        'for answers written on your GPU, use a browser with WebGPU (Chrome or Edge 113+, or Firefox/Safari with ' +
        'WebGPU enabled).';
    }
  }
  render();
  status(hpi.conv ? `Resumed the last conversation${hpi.engine ? ` at position ${hpi.engine.position}` : ''}.`
    : 'Ready.');
  setBusy(false);
}

$('ask').addEventListener('submit', (e) => {
  e.preventDefault();
  const content = $('prompt').value.trim();
  if (content && !hpi.busy) send(content);
});
$('more').addEventListener('click', () => { if (!hpi.busy) generate(); });
$('new').addEventListener('click', () => { if (!hpi.busy) newConversation(); });
$('show-attention').addEventListener('click', () => showAttention());
$('checkpoint').addEventListener('click', () => checkpoint());
$('backtrack').addEventListener('click', () => trailAction(false));
$('fork').addEventListener('click', () => trailAction(true));

hpi.ready = boot().catch((e) => {
  status(`The page could not start: ${e.message}`, true);
  throw e;
});
