// The resonator page: ask the anchor for a conversation hologram, then write the answer on
// this machine's GPU (resonator.js). The model pack and each session's hologram are kept in
// IndexedDB (store.js), so a reload, or a lost GPU device, picks up without downloading
// either again. `window.hpi` exposes the page's state to tests and the benchmark.
//
// URL parameters: gemv workgroup size `wg`, steps per submission `batch`; `sync=K` drafts K
// tokens at a time and has the anchor verify them (sync.js), so only tokens the anchor
// confirms are kept: the answer is then exactly the anchor model's. `drift=1` (for tests)
// corrupts the second token of every draft, so corrections must repair the answer.

import { NoWebGPUError, Resonator } from './resonator.js';
import { contentHash } from './holo.js';
import { openStore } from './store.js';
import { SyncChannel } from './sync.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const engineOptions = {
  batch: Number(params.get('batch') || 4),
  gemv: params.has('wg') ? { WG: Number(params.get('wg')) } : {},
};

const draftSize = params.has('sync') ? Math.max(1, Number(params.get('sync')) || 8) : 0;
const drift = params.get('drift') === '1';

const hpi = window.hpi = {
  engine: null, store: null, model: null, session: null, provisional: [], corrections: 0,
  busy: false, recoveries: 0, stats: {},
  ready: null,  // resolves once the page can generate
};

function status(text, error = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', error);
}

function showStats() {
  const s = hpi.stats;
  const items = [
    ['tok/s', s.tokensPerSecond?.toFixed(2)], ['tokens', hpi.session?.generated.length],
    ['position', hpi.engine?.position], ['pack', s.packFrom], ['hologram', s.hologramFrom],
    ['adapter', hpi.engine?.adapter],
  ];
  $('stats').replaceChildren(...items.filter(([, v]) => v !== undefined).map(([k, v]) => {
    const el = document.createElement('span');
    el.innerHTML = `${k} <b></b>`;
    el.querySelector('b').textContent = v;
    return el;
  }));
}

function showAnswer() {
  const s = hpi.session;
  const text = (ids) => hpi.engine.decode(ids.filter((id) => !hpi.engine.eos.has(id)));
  $('prompt-echo').textContent = s ? s.prompt : '';
  const pending = document.createElement('span');
  pending.className = 'provisional';
  pending.textContent = s ? text(hpi.provisional) : '';
  $('output').replaceChildren(s ? text(s.generated) : '', pending);
  showStats();
}

async function fetchBytes(url, headers = {}) {
  const r = await fetch(url, { headers });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status} ${await r.text()}`);
  return new Uint8Array(await r.arrayBuffer());
}

// Keeping a copy is a convenience: a full store costs a download next time, not the answer.
async function keep(what, put) {
  try {
    await put();
  } catch (e) {
    console.warn(`not keeping ${what}: ${e.message}`);
    status(`Could not keep ${what} in IndexedDB: ${e.message}`, true);
  }
}

async function packBytes() {
  const { pack_hash: hash, pack_url: url } = hpi.model;
  const cached = await hpi.store.getPack(hash);
  if (cached) {
    hpi.stats.packFrom = 'IndexedDB';
    return cached;
  }
  status(`Downloading the model pack (${(hpi.model.pack_bytes / 1e6).toFixed(1)} MB)…`);
  const bytes = await fetchBytes(url);
  if (await contentHash(bytes) !== hash) throw new Error('the model pack does not match its hash');
  await keep('the model pack', () => hpi.store.putPack(hash, bytes));
  hpi.stats.packFrom = 'network';
  return bytes;
}

async function hologramBytes(session) {
  const cached = await hpi.store.getHologram(session.id);
  if (cached) {
    hpi.stats.hologramFrom = 'IndexedDB';
    return cached.bytes;
  }
  const bytes = await fetchBytes(`/v1/sessions/${session.id}/hologram`, { Authorization: `Bearer ${session.token}` });
  await keep('the hologram', () => hpi.store.putHologram(session.id, bytes));
  hpi.stats.hologramFrom = 'network';
  return bytes;
}

/** A fresh engine with the pack, the session's hologram and the tokens generated so far. */
async function startEngine() {
  const engine = await Resonator.create(engineOptions);
  engine.onLost = (info) => recover(info);
  status('Loading the model pack onto the GPU…');
  await engine.loadPack(await packBytes(), hpi.model.pack_hash);
  if (hpi.session) {
    await engine.addHologram(await hologramBytes(hpi.session));
    await engine.append(hpi.session.generated);
  }
  hpi.engine = engine;
}

async function recover(info) {
  hpi.recoveries += 1;
  status(`The GPU device was lost (${info.reason || 'unknown'}: ${info.message}); restarting from IndexedDB…`, true);
  hpi.ready = startEngine().then(() => {
    status(`Recovered from a lost GPU device at position ${hpi.engine.position}.`);
    setBusy(false);
  });
  await hpi.ready;
}

function setBusy(busy) {
  hpi.busy = busy;
  $('send').disabled = busy || !hpi.engine;
  $('more').disabled = busy || !hpi.engine || !hpi.session;
}

/**
 * Draft `draftSize` tokens at a time and keep what the anchor confirms: the accepted drafts
 * and its own next token. A correction rewinds the engine to just after the last accepted
 * draft; an ack feeds the anchor's extra token after the drafts.
 */
async function generateVerified(n) {
  const engine = hpi.engine;
  const s = hpi.session;
  const { channel, ready } = await SyncChannel.open(s.id, s.token, {
    position: s.syncPosition, chain: s.syncChain,
  });
  try {
    if (ready.tokens.length) throw new Error('the anchor has confirmed tokens this page lacks; start a new session');
    let done = 0;
    while (done < n) {
      const start = engine.position;
      hpi.provisional = [];
      const drafts = await engine.generate(Math.min(draftSize, n - done), {
        onTokens: (ids) => { hpi.provisional.push(...ids); showAnswer(); },
      });
      if (drift) {
        const i = Math.min(1, drafts.length - 1);
        drafts[i] = (drafts[i] + 1) % engine.cfg.V;
      }
      const v = await channel.draft(s.syncPosition, s.syncChain, drafts);
      const confirmed = [...drafts.slice(0, v.accepted), v.token];
      if (v.type === 'ack') {
        await engine.append([v.token]);
      } else {
        hpi.corrections += 1;
        engine.rewind(start + v.accepted + 1, v.token);
      }
      s.generated.push(...confirmed);
      s.syncPosition = v.position;
      s.syncChain = v.chain;
      hpi.provisional = [];
      done += confirmed.length;
      showAnswer();
      if (confirmed.some((id) => engine.eos.has(id))) break;
    }
  } finally {
    channel.close();
  }
}

async function generate() {
  const n = Math.max(1, Math.min(4096, Number($('max-new').value) || 48));
  setBusy(true);
  status('Generating on the GPU…');
  const engine = hpi.engine;
  const t0 = performance.now();
  let count = 0;
  try {
    if (draftSize) {
      await generateVerified(n);
    } else {
      await engine.generate(n, {
        onTokens: (ids) => {
          count += ids.length;
          hpi.session.generated.push(...ids);
          hpi.stats.tokensPerSecond = count / ((performance.now() - t0) / 1000);
          showAnswer();
        },
      });
    }
    status(engine.nextId !== null && engine.eos.has(engine.nextId) ? 'Done (end of answer).' : 'Done.');
  } catch (e) {
    // A lost device fails the step in flight; recover() has taken over by now.
    if (!engine.isLost) status(`Generation failed: ${e.message}`, true);
  } finally {
    await keep('the session', () => hpi.store.putSession(hpi.session));
    if (engine === hpi.engine) setBusy(false);
  }
}

async function send(prompt) {
  setBusy(true);
  status('The anchor is reading the prompt…');
  const r = await fetch('/v1/sessions', {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ messages: [{ role: 'user', content: prompt }] }),
  });
  const body = await r.json();
  if (!r.ok) {
    setBusy(false);
    return status(`The anchor refused the prompt: ${body.error?.message || r.status}`, true);
  }
  hpi.session = { id: body.session_id, token: body.token, modelKey: hpi.model.model_key, prompt, generated: [],
    created: Date.now() };
  await keep('the session', () => hpi.store.putSession(hpi.session));
  hpi.engine.rewind(0, null);
  const meta = await hpi.engine.addHologram(await hologramBytes(hpi.session));
  hpi.session.syncPosition = meta.end + 1;  // the prompt's tokens; the chain starts after them
  hpi.session.syncChain = new Uint8Array(32);
  showAnswer();
  await generate();
}

async function boot() {
  hpi.store = await openStore();
  const models = await (await fetch('/v1/models')).json();
  hpi.model = models.models[0];
  const sessions = (await hpi.store.listSessions()).filter((s) => s.modelKey === hpi.model.model_key);
  hpi.session = sessions.sort((a, b) => b.created - a.created)[0] || null;
  try {
    await startEngine();
  } catch (e) {
    if (!(e instanceof NoWebGPUError)) throw e;
    $('nogpu').hidden = false;
    $('nogpu').textContent = `${e.message} The resonator writes answers with WebGPU; use a browser that ` +
      'supports it (Chrome or Edge 113+, or Firefox/Safari with WebGPU enabled).';
    status('WebGPU is not available here.', true);
    return;
  }
  showAnswer();
  status(hpi.session ? `Resumed the last conversation at position ${hpi.engine.position}.` : 'Ready.');
  setBusy(false);
}

$('ask').addEventListener('submit', (e) => {
  e.preventDefault();
  const prompt = $('prompt').value.trim();
  if (prompt && !hpi.busy) send(prompt);
});
$('more').addEventListener('click', () => { if (!hpi.busy) generate(); });

hpi.ready = boot().catch((e) => {
  status(`The page could not start: ${e.message}`, true);
  throw e;
});
