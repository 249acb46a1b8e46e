// The chat page, written on the SDK's public API (index.js) alone: the anchor reads each user
// turn and sends its hologram; this machine's GPU drafts the answer and the anchor confirms
// it, so the answer is exactly the anchor model's. The engine keeps conversations, their
// holograms and the model pack in IndexedDB: a reload, or a lost GPU device, picks up where
// it was without downloading or re-reading earlier turns. Without WebGPU the page asks the
// anchor to write the answers itself (server mode).
// `window.hpi` exposes the page's state to tests and benchmarks.
//
// URL parameters: `sync=K` drafts per verification pass (0: the resonator alone, unverified);
// `mode=server` forces server-only answers; `provisional=N` bounds the tail drafted while the
// anchor is unreachable; `drift=1` (tests) corrupts a drafted token of every pass; gemv
// workgroup size `wg`, steps per submission `batch`.

import { DeviceLost, WebGPUUnavailable, createEngine } from './index.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const maxProvisional = Math.max(1, Number(params.get('provisional')) || 256);
const options = {
  anchor: location.origin,
  maxProvisional,
  drift: params.get('drift') === '1',
  batch: Number(params.get('batch') || 4),
  gemv: params.has('wg') ? { WG: Number(params.get('wg')) } : {},
  // The kernels' layout is picked from the adapter; ?layout=cpu|gpu and ?subgroups=0 override it.
  ...(params.has('layout') ? { layout: params.get('layout') } : {}),
  subgroups: params.get('subgroups') !== '0',
  ...(params.has('sync') ? { draftSize: Math.max(0, Number(params.get('sync')) || 0) } : {}),
  onProgress: ({ phase, total, cached }) => {
    if (phase === 'gpu') status('Loading the model pack onto the GPU…');
    else if (!cached) status(`Downloading the model pack (${(total / 1e6).toFixed(1)} MB)…`);
  },
  onDeviceLost: (e) => recover(e),
  onWarning: (message) => status(message, true),
};

const hpi = window.hpi = {
  engine: null, store: null, model: null, mode: null, stats: {}, sessions: [], session: null,
  reconciler: null,  // the last verified answer's {provisional, provisionalText, online, running, stats}
  busy: false, recoveries: 0,
  ready: null,  // resolves once the page can answer
  get conv() { return this.session?.record ?? null; },
  get conversations() { return this.sessions.map((s) => s.record); },
};

function status(text, error = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', error);
}

const lastAnswer = (conv) => conv.turns.findLast((t) => t.role === 'assistant');

// ---- view -------------------------------------------------------------------------------

function render() {
  const list = hpi.sessions.map((s) => {
    const li = document.createElement('li');
    li.classList.toggle('active', s === hpi.session);
    const open = document.createElement('button');
    open.className = 'open';
    open.textContent = s.record.title;
    open.onclick = () => switchTo(s);
    const del = document.createElement('button');
    del.className = 'delete';
    del.textContent = '×';
    del.title = 'Delete this conversation';
    del.onclick = () => remove(s);
    li.append(open, del);
    return li;
  });
  $('conversations').replaceChildren(...list);
  const conv = hpi.conv;
  const turns = (conv?.turns || []).map((turn) => {
    const div = document.createElement('div');
    div.className = `msg ${turn.role}`;
    div.textContent = turn.content;
    return div;
  });
  const r = hpi.reconciler;
  if (r?.provisionalText && turns.length) {
    const span = document.createElement('span');
    span.className = 'provisional';
    span.textContent = r.provisionalText;
    turns.at(-1).append(span);
  }
  $('messages').replaceChildren(...turns);
  $('checkpoints').replaceChildren(...(conv?.checkpoints || []).map((c) => new Option(`${c.name} (at ${c.position})`,
    c.name)));
  showStats();
}

function showStats() {
  const s = hpi.stats;
  const r = hpi.reconciler;
  const draftSize = options.draftSize ?? 16;
  const items = [
    ['mode', hpi.mode === 'gpu' ? (draftSize ? `GPU drafts, anchor verifies K=${draftSize}` : 'GPU only, unverified')
      : 'server only'],
    ['tok/s', s.tokensPerSecond?.toFixed(2)],
    ['accepted/pass', r?.stats.passes ? (r.stats.accepted / r.stats.passes).toFixed(2) : undefined],
    ['anchor passes', r?.stats.passes], ['corrections', r?.stats.corrections],
    ['provisional', r ? `${r.provisional.length}/${maxProvisional}` +
      (r.running && !r.online ? ' (anchor unreachable, retrying)' : '') : undefined],
    ['reconnects', r?.stats.reconnects || undefined],
    ['sync bytes', r ? r.stats.bytesSent + r.stats.bytesReceived : undefined],
    ['hologram bytes', s.hologramBytes || undefined],
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
  const can = !busy && !!hpi.engine;
  $('send').disabled = !can;
  const answer = hpi.conv && lastAnswer(hpi.conv);
  $('more').disabled = !can || hpi.mode !== 'gpu' || hpi.conv?.mode !== 'gpu' || !answer || answer.ended;
  $('new').disabled = busy;
}

function recover(lost) {
  hpi.recoveries += 1;
  status(`${lost.message}…`, true);
  hpi.ready = lost.recovered.then(() => {
    status(`Recovered from a lost GPU device at position ${hpi.engine.position}.`);
    render();
    setBusy(false);
  });
}

// ---- answering --------------------------------------------------------------------------

function sampling() {
  const t = Math.min(2, Number($('temperature').value) || 0);
  // The anchor takes 0 (greedy) or 0.001 to 2 (protocol/SPEC.md): below that a temperature is greedy.
  return { temperature: t < 0.001 ? 0 : t, seed: Math.floor(Math.random() * 2 ** 32) };
}

/** Show the answer's chunks as they come: confirmed text in the record, the provisional tail. */
async function write(answer) {
  const conv = hpi.conv;
  status(hpi.mode === 'gpu' ? 'Writing on the GPU…' : 'The anchor is writing…');
  try {
    for await (const chunk of await answer()) {
      const { mode, provisional, provisional_text: provisionalText, online, stats } = chunk.hpi;
      const running = !chunk.choices[0].finish_reason;
      hpi.reconciler = mode === 'verified' ? { provisional, provisionalText, online, running, stats } : null;
      render();
    }
    status(lastAnswer(conv).ended ? 'Done (end of answer).' : 'Done.');
  } catch (e) {
    if (e instanceof DeviceLost) return;  // recover() has taken over; it ends the busy state
    status(`The answer failed: ${e.message}`, true);
  }
  setBusy(false);
  render();
}

async function send(content) {
  // A conversation stays with the mode it began in: a server-only one has no hologram.
  if (hpi.session?.record.mode !== hpi.mode) hpi.session = hpi.engine.sessions.create(sampling());
  const session = hpi.session;
  setBusy(true);
  if (hpi.mode === 'gpu') status('The anchor is reading your message…');
  let answer;
  try {
    answer = await session.send(content, { max_tokens: maxNew(), stream: true });
  } catch (e) {
    setBusy(false);
    return status(`The anchor refused the message: ${e.message}`, true);
  }
  if (!hpi.sessions.includes(session)) hpi.sessions.unshift(session);
  $('prompt').value = '';
  render();
  await write(() => answer);
}

const maxNew = () => Math.max(1, Math.min(1024, Number($('max-new').value) || 64));

function more() {
  setBusy(true);
  write(() => hpi.session.continue({ max_tokens: maxNew(), stream: true }));
}

function newConversation() {
  hpi.session = null;
  hpi.reconciler = null;
  render();
}

async function switchTo(session) {
  if (hpi.busy || session === hpi.session) return;
  hpi.session = session;
  hpi.reconciler = null;
  render();
  if (hpi.mode === 'gpu' && session.record.mode === 'gpu') {
    setBusy(true);
    status('Loading the conversation from IndexedDB…');
    try {
      await session.resume();
      status(`Conversation loaded at position ${hpi.engine.position}.`);
    } catch (e) {
      status(`Could not load the conversation: ${e.message}`, true);
    }
    setBusy(false);
  }
  render();
}

async function remove(session) {
  if (hpi.busy) return;
  hpi.sessions = hpi.sessions.filter((s) => s !== session);
  await session.delete();
  if (session === hpi.session) newConversation();
  render();
}

// ---- trail: checkpoints, backtracking, forks (protocol/SPEC.md) -------------------------

async function checkpoint() {
  const conv = hpi.conv;
  if (hpi.busy || conv?.mode !== 'gpu' || !conv.session) return;
  await hpi.session.checkpoint(`checkpoint ${(conv.checkpoints || []).length + 1}`);
  render();
}

async function trailAction(fork) {
  const name = $('checkpoints').value;
  if (hpi.busy || !name) return;
  setBusy(true);
  try {
    if (fork) {
      const temperature = Math.max(0.1, Number($('temperature').value) || 0.7);
      const copy = await hpi.session.fork(name, { temperature, seed: Math.floor(Math.random() * 2 ** 32) });
      hpi.session = copy;
      hpi.sessions.unshift(copy);
      status(`Forked at ${copy.record.sync.position} (${copy.forkedFrom.shared_tokens} positions shared with the parent).`);
    } else {
      const r = await hpi.session.backtrack(name);
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
    cap = await hpi.session.capture({ layers: [layer], heads: [head], states: ['attn.hook_pattern'], start, end });
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
  const serverOnly = params.get('mode') === 'server';
  try {
    hpi.engine = await createEngine({ ...options, mode: serverOnly ? 'server' : 'gpu' });
  } catch (e) {
    if (!(e instanceof WebGPUUnavailable)) throw e;
    hpi.engine = await createEngine({ ...options, mode: 'server' });
    $('nogpu').hidden = false;
    $('nogpu').textContent = `${e.message} Answers come from the anchor alone (server-only streaming); ` +
      'for answers written on your GPU, use a browser with WebGPU (Chrome or Edge 113+, or Firefox/Safari with ' +
      'WebGPU enabled).';
  }
  Object.assign(hpi, { mode: hpi.engine.mode, model: hpi.engine.model, stats: hpi.engine.stats,
    store: hpi.engine.storage });
  hpi.sessions = await hpi.engine.sessions.list();
  hpi.session = hpi.sessions[0] || null;
  await hpi.session?.resume();
  render();
  status(hpi.session ? `Resumed the last conversation${hpi.mode === 'gpu' ? ` at position ${hpi.engine.position}` : ''}.`
    : 'Ready.');
  setBusy(false);
}

$('ask').addEventListener('submit', (e) => {
  e.preventDefault();
  const content = $('prompt').value.trim();
  if (content && !hpi.busy) send(content);
});
$('more').addEventListener('click', () => { if (!hpi.busy) more(); });
$('new').addEventListener('click', () => { if (!hpi.busy) newConversation(); });
$('show-attention').addEventListener('click', () => showAttention());
$('checkpoint').addEventListener('click', () => checkpoint());
$('backtrack').addEventListener('click', () => trailAction(false));
$('fork').addEventListener('click', () => trailAction(true));

hpi.ready = boot().catch((e) => {
  status(`The page could not start: ${e.message}`, true);
  throw e;
});
