// The resonator engine: a Llama decode loop in WGSL (shaders/) over a model pack and
// conversation holograms, token for token the Python reference (server/resonator.py).
//
// Buffers are laid out once per pack: every weight matrix is kept in the pack's own
// quantized planes (split into row chunks if a plane exceeds the adapter's binding size),
// the q/k/v and gate/up matrices of a layer are concatenated so each is one product, and
// the KV cache is one [capacity, G, Dh] f32 buffer per layer and kind, grown by copying.
// Pipelines and bind groups are built once. A step is ~7 dispatches per layer in one
// compute pass; the chosen token stays on the GPU (sample.wgsl feeds it to the next step's
// embedding), so a batch of steps is one submission and only token ids are read back.
//
// Positions follow server/resonator.py: `position` counts the cached positions and
// `nextId` is the token to feed at `position`; its logits choose the token at
// `position + 1`.

import { WebGPUUnavailable } from './errors.js';
import { loadHologram } from './holo.js';

// common.wgsl is the prelude of every kernel (shaders/README.md).
const SHADERS = ['common', 'lanes', 'q4_1', 'q8_0', 'gemv', 'gemv_wg', 'embed', 'rope_append', 'attn_scores', 'attn_softmax',
  'attn_values', 'attn_wg', 'sample', 'holo_basis', 'holo_unpack'];
// The 'gpu' layout's kernels, which reduce across lanes: compiled after lanes.wgsl, and after the
// subgroup exchange it calls (SUBGROUP_XOR), whose `enable` must open the module.
const LANE_KERNELS = new Set(['lanes', 'gemv_wg', 'attn_wg']);
const SUBGROUP_XOR = {
  shuffle: 'enable subgroups;\nfn subgroup_xor(v: vec4f, k: u32) -> vec4f { return subgroupShuffleXor(v, k); }\n',
  none: 'fn subgroup_xor(v: vec4f, k: u32) -> vec4f { return v; }  // not reached: SUBGROUP_MIN is 1\n',
};
// The GPU planes of each weight scheme (see its .wgsl) from the pack's planes, as bytes, by
// the scheme's WGSL variable names: Q4_1 puts a block's f16 scale and minimum in one word;
// Q8_0 widens its scale to a word and stores its signed bytes as q + 128.
const PLANES = {
  q4_1: (plane) => {
    const d = new Uint16Array(plane('d').buffer), m = new Uint16Array(plane('m').buffer);
    const dm = new Uint16Array(2 * d.length);
    for (let i = 0; i < d.length; i++) { dm[2 * i] = d[i]; dm[2 * i + 1] = m[i]; }
    return { w_dm: new Uint8Array(dm.buffer), w_qs: plane('qs') };
  },
  q8_0: (plane) => ({ w_d: new Uint8Array(Uint32Array.from(new Uint16Array(plane('d').buffer)).buffer),
    w_q: plane('q').map((b) => b ^ 0x80) }),
};
const KEYS_PER_WORKGROUP = 256;  // attn_scores.wgsl: 64 invocations x 4 keys
const ATTN_SLICES = 16;           // attn_values.wgsl, attn_wg.wgsl: parts of the positions summed separately
const GPU_KEYS = 64;              // attn_wg.wgsl `qk`: positions per workgroup
const SAMPLE_SPAN = 4096;  // logits per sample.wgsl `scan` workgroup (64 invocations x 64)
const { STORAGE, UNIFORM, COPY_DST, COPY_SRC, MAP_READ, QUERY_RESOLVE } = GPUBufferUsage;

const align = (n, a) => Math.ceil(n / a) * a;

// The kernel layouts (shaders/README.md): 'cpu' (gemv.wgsl `main`, four whole rows per
// invocation, and attn_scores/softmax/values.wgsl, a few positions per invocation; barrier-free
// where possible) for software adapters, 'gpu' (gemv_wg.wgsl, a workgroup per few rows, and
// attn_wg.wgsl, workgroups over the positions; reductions across lanes) for real GPUs.
export const LAYOUTS = ['cpu', 'gpu'];
const SOFTWARE_ADAPTER = /swiftshader|llvmpipe|lavapipe|software|basic render/i;
const GPU_WG = 64;         // lanes.wgsl LANES: invocations per 'gpu'-layout workgroup
const MAX_GROUPS_X = 65535;  // WebGPU's default maxComputeWorkgroupsPerDimension

/** Whether `adapter` is a fallback or software (CPU-emulated) adapter. */
export function isSoftwareAdapter(adapter) {
  const info = adapter.info || {};
  if (adapter.isFallbackAdapter || info.isFallbackAdapter) return true;
  return SOFTWARE_ADAPTER.test([info.vendor, info.architecture, info.device, info.description].join(' '));
}

/** gemv_wg.wgsl's invocations per row for input length `cols`: a power of two <= 32 and <= its blocks. */
export function rowThreads(cols) {
  let tpr = 4;
  while (tpr < 32 && 2 * tpr <= cols / 32) tpr *= 2;
  return tpr;
}

/**
 * The binding slot of each group-0 variable a WGSL module declares, by name. The slot numbers
 * are written only in the WGSL; bind groups are built by name from this map. Two variables on
 * one slot (a kernel over the slots its weight scheme takes) are refused here, by name, where
 * WebGPU would refuse the pipeline as a whole.
 */
export function bindingSlots(code, label) {
  const slots = {};
  const declared = code.replace(/\/\/.*$/gm, '').matchAll(/@group\(0\)\s*@binding\((\d+)\)\s*var(?:<[^>]*>)?\s+(\w+)/g);
  for (const [, slot, name] of declared) {
    const other = Object.keys(slots).find((n) => slots[n] === Number(slot));
    if (other) throw new Error(`${label}: ${other} and ${name} both declare binding ${slot}`);
    slots[name] = Number(slot);
  }
  return slots;
}

const SCALAR_SETTERS = { u32: 'setUint32', i32: 'setInt32', f32: 'setFloat32' };

/**
 * The byte layout of each struct the WGSL declares, by name. Every field is a 4-byte scalar, so
 * a field's offset is 4 times its place; the JS writes structs through these layouts, so the
 * order of the fields is written only in the WGSL.
 */
export function structLayouts(code, label) {
  const layouts = {};
  for (const [, name, body] of code.replace(/\/\/.*$/gm, '').matchAll(/struct\s+(\w+)\s*\{([^}]*)\}/g)) {
    const fields = body.split(',').map((f) => f.trim()).filter(Boolean).map((f, i) => {
      const [field, type] = f.split(':').map((x) => x.trim());
      if (!SCALAR_SETTERS[type]) throw new Error(`${label}: ${name}.${field} is ${type}, not a 4-byte scalar`);
      return { field, type, offset: 4 * i };
    });
    layouts[name] = { name, fields, size: 4 * fields.length };
  }
  return layouts;
}

/** Write `values` (by field name; `_`-named padding is 0) as struct `layout` at byte `at` of `view`. */
export function writeStruct(layout, values, view, at = 0) {
  for (const { field, type, offset } of layout.fields) {
    const v = field.startsWith('_') ? 0 : values[field];
    if (v === undefined) throw new Error(`${layout.name}.${field}: no value`);
    view[SCALAR_SETTERS[type]](at + offset, v, true);
  }
}

function concatBytes(views) {
  const out = new Uint8Array(views.reduce((n, v) => n + v.byteLength, 0));
  let at = 0;
  for (const v of views) {
    out.set(new Uint8Array(v.buffer, v.byteOffset, v.byteLength), at);
    at += v.byteLength;
  }
  return out;
}

export class Resonator {
  /**
   * Set up the device; throws WebGPUUnavailable where WebGPU is missing. Weight matrices are
   * split into chunks of at most `maxWeightBytes` per plane (default: the adapter's limit).
   */
  static async create({ shaderBase = new URL('./shaders/', import.meta.url), gemv = {}, batch = 4,
    maxWeightBytes = Infinity, layout = null, subgroups = true } = {}) {
    if (layout !== null && !LAYOUTS.includes(layout)) throw new TypeError(`layout is 'cpu' or 'gpu', not ${layout}`);
    if (!('gpu' in navigator)) {
      throw new WebGPUUnavailable('This browser does not offer WebGPU (navigator.gpu is missing).');
    }
    const adapter = await navigator.gpu.requestAdapter();
    if (!adapter) throw new WebGPUUnavailable('WebGPU is present but no GPU adapter is available.');
    const lim = adapter.limits;
    const info = adapter.info || {};
    const picked = layout ?? (isSoftwareAdapter(adapter) ? 'cpu' : 'gpu');
    // The 'gpu' layout's reductions shuffle within subgroups where the adapter has them and
    // says how small one can be (lanes.wgsl); `subgroups: false` keeps them in workgroup memory.
    const subgroupMin = picked === 'gpu' && subgroups && adapter.features.has('subgroups')
      ? Math.min(info.subgroupMinSize || 0, GPU_WG) : 0;
    const features = ['timestamp-query', ...(subgroupMin > 1 ? ['subgroups'] : [])];
    const device = await adapter.requestDevice({
      requiredLimits: {
        maxStorageBufferBindingSize: lim.maxStorageBufferBindingSize,
        maxBufferSize: lim.maxBufferSize,
      },
      requiredFeatures: features.filter((f) => adapter.features.has(f)),
    });
    const sources = Object.fromEntries(await Promise.all(SHADERS.map(async (name) => {
      const r = await fetch(`${shaderBase}${name}.wgsl`);
      if (!r.ok) throw new Error(`could not load shader ${name}.wgsl: HTTP ${r.status}`);
      return [name, await r.text()];
    })));
    return new Resonator(device, sources, {
      layout: picked, subgroups: subgroupMin > 1 ? subgroupMin : 0,
      gemv: { WG: 16, ...gemv }, batch,
      bindingBytes: Math.min(lim.maxStorageBufferBindingSize, lim.maxBufferSize),
      weightBytes: Math.min(maxWeightBytes, lim.maxStorageBufferBindingSize, lim.maxBufferSize),
      adapter: `${info.vendor || '?'} / ${info.architecture || '?'}`,
    });
  }

  constructor(device, sources, opts) {
    this.device = device;
    this.sources = sources;
    this.structs = structLayouts(Object.values(sources).join('\n'), 'shaders');
    this.opts = opts;
    this.adapter = opts.adapter;
    this.layout = opts.layout || 'cpu';  // the kernel layout: 'cpu' or 'gpu' (LAYOUTS)
    // The smallest subgroup the 'gpu' layout's reductions shuffle within; 0: workgroup memory only.
    this.subgroups = opts.subgroups || 0;
    this.pipelines = new Map();
    this.slots = new WeakMap();  // pipeline -> bindingSlots of its module
    this.position = 0;
    this.nextId = null;
    this.capacity = 0;
    this.closed = false;
    this.isLost = false;
    this.onLost = null;
    this.lost = device.lost.then((info) => {
      this.isLost = true;
      if (!this.closed) this.onLost?.(info);
      return info;
    });
    device.addEventListener('uncapturederror', (e) => console.error('WebGPU error:', e.error.message));
  }

  // ---- buffers -----------------------------------------------------------------------------

  buffer(size, usage, data) {
    const buf = this.device.createBuffer({ size: align(Math.max(size, 4), 4), usage, mappedAtCreation: !!data });
    if (data) {
      new Uint8Array(buf.getMappedRange()).set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
      buf.unmap();
    }
    return buf;
  }

  upload(data) {
    return this.buffer(data.byteLength, STORAGE | COPY_DST, data);
  }

  /** A uniform buffer holding the shaders' struct `name`, its fields from `values` by name. */
  params(name, values) {
    const layout = this.structs[name];
    const bytes = new DataView(new ArrayBuffer(align(layout.size, 16)));
    writeStruct(layout, values, bytes);
    return this.buffer(bytes.byteLength, UNIFORM, bytes);
  }

  /**
   * Weight matrices `names` of the pack, stacked by rows, as chunks of GPU planes that fit
   * the binding size. `paired` (gate and up) keeps row r of both in one chunk, gate rows
   * first: chunk {row0, rows} holds gate rows [row0, row0 + rows), then the same up rows.
   */
  matrix(names, paired = false) {
    const schemes = names.map((n) => this.meta.weights[n]);
    const scheme = schemes[0];
    if (!PLANES[scheme]) throw new Error(`weight scheme ${scheme} of ${names[0]} has no WGSL kernel`);
    if (schemes.some((s) => s !== scheme)) throw new Error(`${names.join(', ')} mix weight schemes ${schemes}`);
    const tensor = (n, p) => this.tensors[`${n}.${p}`];
    const counts = names.map((n) => tensor(n, 'd').shape[0]);
    const cols = tensor(names[0], 'd').shape[1] * 32;
    // Row slices [name, first, end) -> GPU planes (bytes), via the scheme's re-layout.
    const planesOf = (slices) => PLANES[scheme]((p) => concatBytes(slices.map(([n, a, b]) => {
      const t = tensor(n, p);
      const per = t.data.length / t.shape[0];
      return t.data.subarray(a * per, b * per);
    })));
    const rowBytes = Object.values(planesOf(names.map((n) => [n, 0, 1]))).map((b) => b.byteLength);
    let per = Math.floor(this.opts.weightBytes / Math.max(...rowBytes));
    if (paired) per = Math.floor(per / 2);
    if (per < 1) throw new Error(`rows of ${names[0]} do not fit the adapter's binding size`);
    const chunks = [];
    const total = paired ? counts[0] : counts.reduce((a, b) => a + b, 0);
    for (let row0 = 0; row0 < total; row0 += per) {
      const end = Math.min(row0 + per, total);
      let slices;
      if (paired) {
        slices = names.map((n) => [n, row0, end]);
      } else {  // the stacked rows [row0, end) as slices of each matrix
        slices = [];
        names.forEach((n, i) => {
          const first = counts.slice(0, i).reduce((a, b) => a + b, 0);
          const a = Math.max(row0, first), b = Math.min(end, first + counts[i]);
          if (a < b) slices.push([n, a - first, b - first]);
        });
      }
      const planes = Object.entries(planesOf(slices)).map(([plane, bytes]) => [plane, this.upload(bytes)]);
      chunks.push({ row0, rows: end - row0, planes: Object.fromEntries(planes) });
    }
    return { scheme, rows: total, cols, chunks };
  }

  // ---- pipelines ---------------------------------------------------------------------------

  /**
   * The WGSL of a kernel as compiled: the subgroup exchange and lanes.wgsl if it reduces across
   * lanes, the prelude, the weight scheme if it takes one, the kernel.
   */
  source(shader, scheme = null) {
    const lanes = LANE_KERNELS.has(shader);
    const files = new Set(['common', lanes && 'lanes', scheme, shader].filter(Boolean));
    const exchange = lanes && SUBGROUP_XOR[this.subgroups ? 'shuffle' : 'none'];
    return [exchange, ...[...files].map((f) => this.sources[f])].filter(Boolean).join('\n');
  }

  pipeline(shader, constants, { scheme = null, entry = 'main' } = {}) {
    if (LANE_KERNELS.has(shader) && this.subgroups) constants = { ...constants, SUBGROUP_MIN: this.subgroups };
    const key = JSON.stringify([shader, scheme, entry, constants]);
    if (!this.pipelines.has(key)) {
      const code = this.source(shader, scheme);
      const slots = bindingSlots(code, shader);
      const module = this.device.createShaderModule({ code, label: shader });
      const pipeline = this.device.createComputePipeline({
        label: `${shader}:${entry}`, layout: 'auto', compute: { module, entryPoint: entry, constants },
      });
      this.slots.set(pipeline, slots);
      this.pipelines.set(key, pipeline);
    }
    return this.pipelines.get(key);
  }

  /** A bind group of `pipeline` from buffers by the names of their WGSL variables. */
  bind(pipeline, buffers) {
    const slots = this.slots.get(pipeline);
    return this.device.createBindGroup({
      layout: pipeline.getBindGroupLayout(0),
      entries: Object.entries(buffers).map(([name, buffer]) => {
        if (!(name in slots)) throw new Error(`${pipeline.label} declares no binding ${name}`);
        return { binding: slots[name], resource: { buffer } };
      }),
    });
  }

  /**
   * Dispatches of y = W x, one per row chunk: gemv.wgsl's `stage`, then its `main` (layout
   * 'cpu') or gemv_wg.wgsl's (layout 'gpu').
   */
  gemv(name, m, { x, y, norm = null, mode = 0, slices = 1 }) {
    const g = this.opts.gemv;
    const stage = this.pipeline('gemv', { C: m.cols, NORM: norm ? 1 : 0, EPS: this.cfg.eps, SLICES: slices },
      { scheme: m.scheme, entry: 'stage' });
    const gpu = this.layout === 'gpu';
    const tpr = rowThreads(m.cols);
    const pipe = gpu
      ? this.pipeline('gemv_wg', { C: m.cols, TPR: tpr, MODE: mode }, { scheme: m.scheme })
      : this.pipeline('gemv', { C: m.cols, WG: g.WG, MODE: mode }, { scheme: m.scheme });
    const staged = { xi: this.xi, xsum: this.xsum };
    return [[`${name}`, stage, this.bind(stage, { x, norm_w: norm || x, ...staged }), 1, 1], ...m.chunks.map((c) => {
      const n = c.rows;
      const p = this.params('GemvParams', { rows: n, y0: c.row0, up: mode === 2 ? n : 0 });
      const group = this.bind(pipe, { ...c.planes, y, p, ...staged });
      if (!gpu) return [name, pipe, group, Math.ceil(n / (4 * g.WG)), 1];
      const groups = Math.ceil(n / (GPU_WG / tpr));
      return [name, pipe, group, Math.min(groups, MAX_GROUPS_X), Math.ceil(groups / MAX_GROUPS_X)];
    })];
  }

  // ---- the model pack ----------------------------------------------------------------------

  /** Upload a model pack (.holo bytes) and build every pipeline and bind group. */
  async loadPack(bytes, packHash) {
    const holo = await loadHologram(bytes);
    if (holo.kind !== 'model_pack' || holo.meta.format !== 'hpi.model_pack/1') {
      throw new Error(`not a model pack (kind ${holo.kind}, format ${holo.meta.format})`);
    }
    this.meta = holo.meta;
    this.tensors = holo.tensors;
    this.packHash = packHash;
    const c = holo.meta.config;
    this.cfg = { V: c.vocab, DM: c.hidden, L: c.layers, H: c.heads, G: c.kv_heads, DH: c.head_dim,
      F: c.intermediate, eps: c.eps };
    const { V, DM, L, H, G, DH, F } = this.cfg;
    if (DH > 64 || DH % 8 || DM % 32 || F % 32 || H % G || H / G > 4 || H > 64) {
      throw new Error(`unsupported shape: heads ${H}/${G}, head_dim ${DH}, hidden ${DM}, intermediate ${F}`);
    }
    this.eos = new Set(holo.meta.eos_ids);
    this.vocabBytes = holo.tensors['vocab.bytes'].data.slice();
    this.vocabOffsets = holo.tensors['vocab.offsets'].data.slice();
    this.invFreq = holo.tensors['rope.inv_freq'].data.slice();

    const f32 = (name) => this.upload(holo.tensors[name].data);
    this.embed = this.matrix(['embed']);
    this.lmHead = c.tied ? this.embed : this.matrix(['lm_head']);
    this.layers = [];
    for (let l = 0; l < L; l++) {
      const p = `layers.${l}.`;
      this.layers.push({
        attnNorm: f32(p + 'attn_norm'), mlpNorm: f32(p + 'mlp_norm'),
        qkv: this.matrix([p + 'wq', p + 'wk', p + 'wv']), wo: this.matrix([p + 'wo']),
        gateUp: this.matrix([p + 'w_gate', p + 'w_up'], true), down: this.matrix([p + 'w_down']),
      });
    }
    this.norm = f32('norm');
    this.calib = {};
    for (const kind of ['k', 'v']) {
      const parts = ['pca', 'unwhiten', 'mean'].map((p) => holo.tensors[`codec.${kind}.${p}`].data);
      this.calib[kind] = { buffer: this.upload(concatBytes(parts)), unwhitenAt: parts[0].length,
        meanAt: parts[0].length + parts[1].length };
    }
    this.tensors = null;  // the pack's bytes can go: everything lives on the GPU now

    const nb = (n) => this.buffer(n * 4, STORAGE | COPY_DST | COPY_SRC);
    this.state = nb(align(this.structs.State.size, 16) / 4);
    this.x = nb(DM);
    this.qkvOut = nb((H + 2 * G) * DH);
    this.attnOut = nb(ATTN_SLICES * H * DH);
    this.sums = nb(H);
    this.act = nb(F);
    this.xi = nb(Math.max(DM, F));
    this.xsum = nb(Math.max(DM, F) / 32);
    this.logits = nb(V);
    this.best = nb(2 * Math.max(V, Math.ceil(V / SAMPLE_SPAN)));
    this.tokens = nb(256);
    this.readback = this.buffer(256 * 4, MAP_READ | COPY_DST);
    this.reserve(1024);
  }

  /** Make room in the KV cache (and RoPE table) for `positions` positions, keeping its contents. */
  reserve(positions) {
    if (positions <= this.capacity) return;
    const { L, G, DH } = this.cfg;
    const cap = Math.max(align(positions, KEYS_PER_WORKGROUP), 2 * this.capacity);
    const bytes = cap * G * DH * 4;
    if (bytes > this.opts.bindingBytes) throw new Error(`a KV cache of ${cap} positions exceeds the adapter's binding size`);
    const enc = this.device.createCommandEncoder();
    const grow = (old) => {
      const b = this.buffer(bytes, STORAGE | COPY_DST | COPY_SRC);
      if (old) { enc.copyBufferToBuffer(old, 0, b, 0, old.size); }
      return b;
    };
    const old = this.cache || [];
    this.cache = Array.from({ length: L }, (_, l) => ({ k: grow(old[l]?.k), v: grow(old[l]?.v) }));
    this.device.queue.submit([enc.finish()]);
    old.forEach((c) => { c.k.destroy(); c.v.destroy(); });
    this.rope?.destroy();
    this.rope = this.upload(this.ropeTable(cap));
    this.scores?.destroy();
    this.scores = this.buffer(cap * this.cfg.H * 4, STORAGE);
    this.capacity = cap;
    this.buildPlan();
  }

  /** cos/sin per position and dimension pair, angles in float64 then rounded (server/rope.py). */
  ropeTable(cap) {
    const half = this.cfg.DH / 2;
    const t = new Float32Array(cap * half * 2);
    for (let p = 0; p < cap; p++) {
      for (let i = 0; i < half; i++) {
        const a = p * this.invFreq[i];
        t[(p * half + i) * 2] = Math.cos(a);
        t[(p * half + i) * 2 + 1] = Math.sin(a);
      }
    }
    return t;
  }

  /** Every dispatch of a decode step, with bind groups made once: [name, pipeline, group, x, y]. */
  buildPlan() {
    const { V, DM, H, G, DH } = this.cfg;
    const dims = { H, G, DH };
    const embed = this.pipeline('embed', { C: DM }, { scheme: this.embed.scheme });
    this.embedPlan = this.embed.chunks.map((c) => ['embed', embed, this.bind(embed, {
      ...c.planes, state: this.state, chunk: this.params('Chunk', { row0: c.row0, rows: c.rows }), x: this.x,
    }), 1, 1]);
    const rope = this.pipeline('rope_append', dims);
    const attention = this.layout === 'gpu' ? this.attentionWg() : this.attentionCpu();
    this.layerPlans = this.layers.map((w, l) => ({
      pre: [
        ...this.gemv('qkv', w.qkv, { x: this.x, y: this.qkvOut, norm: w.attnNorm }),
        ['rope_append', rope, this.bind(rope, { state: this.state, rope: this.rope, qkv: this.qkvOut,
          k_cache: this.cache[l].k, v_cache: this.cache[l].v }), Math.ceil(Math.max((H + G) * DH / 2, G * DH) / 64), 1],
      ],
      scores: attention.scores(this.cache[l]),
      post: [
        ...attention.post(this.cache[l]),
        ...this.gemv('wo', w.wo, { x: this.attnOut, y: this.x, mode: 1, slices: ATTN_SLICES }),
        ...this.gemv('gate_up', w.gateUp, { x: this.x, y: this.act, norm: w.mlpNorm, mode: 2 }),
        ...this.gemv('down', w.down, { x: this.act, y: this.x, mode: 1 }),
      ],
    }));
    const scan = this.pipeline('sample', { V }, { entry: 'scan' });
    const pick = this.pipeline('sample', { V }, { entry: 'pick' });
    this.headPlan = [
      ...this.gemv('lm_head', this.lmHead, { x: this.x, y: this.logits, norm: this.norm }),
      ['sample', scan, this.bind(scan, { state: this.state, logits: this.logits, best: this.best }),
        Math.ceil(V / SAMPLE_SPAN), 1],
      ['sample', pick, this.bind(pick, { state: this.state, best: this.best, tokens: this.tokens }), 1, 1],
    ];
  }

  /**
   * The attention dispatches of the 'cpu' layout, per layer's cache: `scores` without its size
   * (one workgroup per `keys` positions, times G), then softmax and values.
   */
  attentionCpu() {
    const { H, G, DH } = this.cfg;
    const dims = { H, G, DH };
    const scores = this.pipeline('attn_scores', { ...dims, SCALE: Math.fround(1 / Math.sqrt(DH)) });
    const softmax = this.pipeline('attn_softmax', { H });
    const values = this.pipeline('attn_values', { ...dims, SLICES: ATTN_SLICES });
    this.attnKeys = KEYS_PER_WORKGROUP;
    return {
      scores: (c) => ['attn_scores', scores, this.bind(scores, { state: this.state, qkv: this.qkvOut, k_cache: c.k,
        scores: this.scores })],
      post: (c) => [
        ['attn_softmax', softmax, this.bind(softmax, { state: this.state, scores: this.scores, sums: this.sums }), H, 1],
        ['attn_values', values, this.bind(values, { state: this.state, e: this.scores, sums: this.sums,
          v_cache: c.v, attn: this.attnOut }), Math.ceil(G * DH / 4 / 64), ATTN_SLICES],
      ],
    };
  }

  /** The same for the 'gpu' layout: attn_wg.wgsl's entry points, under the 'cpu' kernels' names. */
  attentionWg() {
    const { H, G, DH } = this.cfg;
    let kl = 1;
    while (kl < DH / 4) kl *= 2;
    const consts = { H, G, DH, KL: kl, SCALE: Math.fround(1 / Math.sqrt(DH)), KEYS: GPU_KEYS, SLICES: ATTN_SLICES };
    const [qk, softmax, pv] = ['qk', 'softmax', 'pv'].map((entry) => this.pipeline('attn_wg', consts, { entry }));
    this.attnKeys = GPU_KEYS;
    return {
      scores: (c) => ['attn_scores', qk, this.bind(qk, { state: this.state, qkv: this.qkvOut, k_cache: c.k,
        scores: this.scores })],
      post: (c) => [
        ['attn_softmax', softmax, this.bind(softmax, { state: this.state, scores: this.scores, sums: this.sums }), H, 1],
        ['attn_values', pv, this.bind(pv, { state: this.state, scores: this.scores, sums: this.sums, v_cache: c.v,
          attn: this.attnOut }), G, ATTN_SLICES],
      ],
    };
  }

  /** The dispatches of one step feeding the token at `pos`; `head` adds the LM head and sampling. */
  stepPlan(pos, head = true) {
    const groups = Math.ceil((pos + 1) / this.attnKeys);
    const out = [...this.embedPlan];
    for (const lp of this.layerPlans) {
      out.push(...lp.pre, [...lp.scores, groups, this.cfg.G], ...lp.post);
    }
    if (head) out.push(...this.headPlan);
    return out;
  }

  encode(pass, plan) {
    for (const [, pipe, group, x, y] of plan) {
      pass.setPipeline(pipe);
      pass.setBindGroup(0, group);
      pass.dispatchWorkgroups(x, y);
    }
  }

  writeState({ pos, token, step = 0, seed = 0, temperature = 0 }) {
    const s = new DataView(new ArrayBuffer(this.structs.State.size));
    writeStruct(this.structs.State, { pos, token, step, seed: seed >>> 0, temperature }, s);
    this.device.queue.writeBuffer(this.state, 0, s.buffer);
  }

  async read(buffer, bytes, offset = 0) {
    const rb = this.buffer(bytes, MAP_READ | COPY_DST);
    const enc = this.device.createCommandEncoder();
    enc.copyBufferToBuffer(buffer, offset, rb, 0, align(bytes, 4));
    this.device.queue.submit([enc.finish()]);
    await rb.mapAsync(GPUMapMode.READ);
    const out = rb.getMappedRange().slice(0, bytes);
    rb.destroy();
    return out;
  }

  // ---- holograms ---------------------------------------------------------------------------

  /** Decompress a conversation hologram segment (.holo bytes) into the KV cache, on the GPU. */
  async addHologram(bytes) {
    const holo = await loadHologram(bytes);
    const m = holo.meta;
    if (holo.kind !== 'conversation' || m.format !== 'hpi.conversation/1') {
      throw new Error(`not a conversation hologram (kind ${holo.kind}, format ${m.format})`);
    }
    if (this.packHash && m.pack_hash !== this.packHash) {
      throw new Error(`hologram was built for pack ${m.pack_hash.slice(0, 16)}, not ${this.packHash.slice(0, 16)}`);
    }
    const { L, G, DH } = this.cfg;
    if (m.layers !== L || m.kv_heads !== G || m.head_dim !== DH) throw new Error('hologram shape does not match the pack');
    if (m.start !== this.position) throw new Error(`hologram starts at ${m.start}, the resonator is at ${this.position}`);
    const T = m.end - m.start;
    const s = Math.min(Math.max(m.codec.sink - m.start, 0), T);
    const t = Math.min(m.codec.recent, T - s);
    const M = T - s - t;
    this.reserve(m.end + 1);
    const basisPipe = this.pipeline('holo_basis', { DH });
    const exact = this.pipeline('holo_unpack', { DH, G }, { entry: 'exact' });
    const coded = this.pipeline('holo_unpack', { DH, G }, { entry: 'coded' });
    const temp = [];
    const keep = (buf) => { temp.push(buf); return buf; };
    const enc = this.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    for (const kind of ['k', 'v']) {
      const x = (p) => holo.tensors[`${kind}.${p}`].data;
      const head = x('head'), tail = x('tail');
      const f16s = keep(this.upload(concatBytes([head, tail, x('svd_vt')])));
      const codes = keep(this.upload(concatBytes([x('codes'), new Uint8Array(4)])));  // codes4 reads a word past
      const rank = x('rank'), step = x('step'), basis = x('basis');
      const Block = this.structs.Block;
      const table = new DataView(new ArrayBuffer(L * G * Block.size));
      for (let b = 0, at = 0, svdRow = 0; b < L * G; b++) {
        writeStruct(Block, { codes_at: at, rank: rank[b], step: step[b], basis: basis[b], svd_row: svdRow }, table,
          b * Block.size);
        at += rank[b] * M;
        if (basis[b] === 2) svdRow += rank[b];
      }
      const blocks = keep(this.upload(table));
      const cal = this.calib[kind];
      const B = keep(this.buffer(L * G * DH * DH * 4, STORAGE));
      pass.setPipeline(basisPipe);
      const bp = keep(this.params('BasisParams', { svd_at: head.length + tail.length, unwhiten_at: cal.unwhitenAt }));
      pass.setBindGroup(0, this.bind(basisPipe, { p: bp, f16s, blocks, calib: cal.buffer, basis: B }));
      pass.dispatchWorkgroups(Math.ceil(DH * DH / 64), L * G);
      if (T === 0) continue;
      for (let l = 0; l < L; l++) {
        const p = keep(this.params('UnpackParams', { layer: l, start: m.start, head: s, tail: t, total: T,
          is_key: kind === 'k' ? 1 : 0, tail_at: head.length, mean_at: cal.meanAt }));
        const cache = this.cache[l][kind];
        for (const [pipe, items, group] of [
          [exact, s + t, { p, f16s, cache }],
          [coded, Math.ceil(M / 4), { p, codes, blocks, calib: cal.buffer, basis: B, rope: this.rope, cache }],
        ]) {
          if (!items) continue;
          pass.setPipeline(pipe);
          pass.setBindGroup(0, this.bind(pipe, group));
          pass.dispatchWorkgroups(Math.ceil(items * DH / 8 / 64), G);
        }
      }
    }
    pass.end();
    this.device.queue.submit([enc.finish()]);
    await this.device.queue.onSubmittedWorkDone();
    temp.forEach((b) => b.destroy());
    this.position = m.end;
    this.nextId = m.next_id;
    return m;
  }

  // ---- decoding ----------------------------------------------------------------------------

  /**
   * Decode up to `maxNew` tokens (greedy, or Gumbel-max at `temperature` with `seed`).
   * Steps run in batches of `batch` per submission; `onTokens(ids)` sees each batch.
   */
  async generate(maxNew, { temperature = 0, seed = 0, stopAtEos = true, onTokens = null } = {}) {
    if (this.nextId === null) throw new Error('no hologram loaded');
    const out = [];
    let token = this.nextId;
    while (out.length < maxNew) {
      const n = Math.min(this.opts.batch, maxNew - out.length, 256);
      this.reserve(this.position + n + 1);
      this.writeState({ pos: this.position, token, seed, temperature });
      const enc = this.device.createCommandEncoder();
      const pass = enc.beginComputePass();
      for (let i = 0; i < n; i++) this.encode(pass, this.stepPlan(this.position + i));
      pass.end();
      enc.copyBufferToBuffer(this.tokens, 0, this.readback, 0, n * 4);
      this.device.queue.submit([enc.finish()]);
      await this.readback.mapAsync(GPUMapMode.READ, 0, n * 4);
      const ids = Array.from(new Uint32Array(this.readback.getMappedRange(0, n * 4)));
      this.readback.unmap();
      let stop = false;
      const batch = [];
      for (const id of ids) {
        batch.push(id);
        this.position += 1;
        token = id;
        if (stopAtEos && this.eos.has(id)) { stop = true; break; }
      }
      out.push(...batch);
      onTokens?.(batch);
      if (stop) break;
    }
    this.nextId = token;
    return out;
  }

  /**
   * Accept `tokens` as the continuation: feed `nextId` and all but the last of them, which
   * becomes the next token to feed (as after generating them). No logits are computed.
   */
  async append(tokens) {
    if (!tokens.length) return;
    if (this.nextId === null) throw new Error('no hologram loaded');
    const feed = [this.nextId, ...tokens.slice(0, -1)];
    this.reserve(this.position + feed.length + 1);
    for (const token of feed) {
      this.writeState({ pos: this.position, token });
      const enc = this.device.createCommandEncoder();
      const pass = enc.beginComputePass();
      this.encode(pass, this.stepPlan(this.position, false));
      pass.end();
      this.device.queue.submit([enc.finish()]);
      this.position += 1;
    }
    this.nextId = tokens.at(-1);
    await this.device.queue.onSubmittedWorkDone();
  }

  /** Go back to an earlier position (the cache beyond it is simply overwritten later). */
  rewind(position, nextId) {
    if (!(position >= 0 && position <= this.position)) throw new Error(`cannot rewind to ${position} from ${this.position}`);
    this.position = position;
    this.nextId = nextId;
  }

  /** Logits [V] of the last generated step. */
  async readLogits() {
    return new Float32Array(await this.read(this.logits, this.cfg.V * 4));
  }

  /** Layer l's cached keys and values for positions [0, position), each [position, G, Dh]. */
  async readKV(l) {
    const n = this.position * this.cfg.G * this.cfg.DH * 4;
    return { k: new Float32Array(await this.read(this.cache[l].k, n)),
      v: new Float32Array(await this.read(this.cache[l].v, n)) };
  }

  /** The sampling noise of sample.wgsl for every token id: (u bits, gumbel bits) per id. */
  async noise(seed, pos) {
    const pipe = this.pipeline('sample', { V: this.cfg.V }, { entry: 'noise' });
    this.writeState({ pos, token: 0, seed });
    const enc = this.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    pass.setPipeline(pipe);
    pass.setBindGroup(0, this.bind(pipe, { state: this.state, best: this.best }));
    pass.dispatchWorkgroups(Math.ceil(this.cfg.V / 64));
    pass.end();
    this.device.queue.submit([enc.finish()]);
    return new Uint32Array(await this.read(this.best, this.cfg.V * 8));
  }

  // ---- text --------------------------------------------------------------------------------

  tokenBytes(id) {
    return this.vocabBytes.subarray(this.vocabOffsets[id], this.vocabOffsets[id + 1]);
  }

  /** Text of token ids (UTF-8 across token boundaries). */
  decode(ids) {
    return new TextDecoder().decode(concatBytes(ids.map((id) => this.tokenBytes(id))));
  }

  // ---- measurement -------------------------------------------------------------------------

  /**
   * Time per kernel of one decode step at the current position, in ms, by kernel name:
   * GPU timestamps around each dispatch where the adapter has them, else each kernel's
   * dispatches of a step submitted alone and timed on the wall clock.
   */
  async profile(repeats = 3) {
    const plan = this.stepPlan(this.position);
    this.writeState({ pos: this.position, token: this.nextId });
    const totals = {};
    const add = (name, ms) => { totals[name] = (totals[name] || 0) + ms / repeats; };
    if (this.device.features.has('timestamp-query')) {
      const qs = this.device.createQuerySet({ type: 'timestamp', count: 2 * plan.length });
      const resolve = this.buffer(16 * plan.length, QUERY_RESOLVE | COPY_SRC);
      for (let r = 0; r < repeats; r++) {
        const enc = this.device.createCommandEncoder();
        plan.forEach((d, i) => {
          const pass = enc.beginComputePass({ timestampWrites: { querySet: qs, beginningOfPassWriteIndex: 2 * i,
            endOfPassWriteIndex: 2 * i + 1 } });
          this.encode(pass, [d]);
          pass.end();
        });
        enc.resolveQuerySet(qs, 0, 2 * plan.length, resolve, 0);
        this.device.queue.submit([enc.finish()]);
        const ts = new BigUint64Array(await this.read(resolve, 16 * plan.length));
        plan.forEach(([name], i) => add(name, Number(ts[2 * i + 1] - ts[2 * i]) / 1e6));
      }
      qs.destroy();
      resolve.destroy();
      return { method: 'timestamp-query', kernels: totals };
    }
    const names = [...new Set(plan.map(([name]) => name))];
    for (let r = 0; r < repeats; r++) {
      for (const name of names) {
        const enc = this.device.createCommandEncoder();
        const pass = enc.beginComputePass();
        this.encode(pass, plan.filter(([n]) => n === name));
        pass.end();
        await this.device.queue.onSubmittedWorkDone();
        const t0 = performance.now();
        this.device.queue.submit([enc.finish()]);
        await this.device.queue.onSubmittedWorkDone();
        add(name, performance.now() - t0);
      }
    }
    return { method: 'isolated kernels, wall clock', kernels: totals };
  }

  /** Bytes of weights one decode step reads: every layer matrix and norm, the LM head, one embedding row. */
  get bytesPerToken() {
    const size = (m) => m.chunks.reduce((n, c) => n + Object.values(c.planes).reduce((s, b) => s + b.size, 0), 0);
    const layers = this.layers.reduce((n, w) => n + size(w.qkv) + size(w.wo) + size(w.gateUp) + size(w.down)
      + w.attnNorm.size + w.mlpNorm.size, 0);
    return layers + size(this.lmHead) + size(this.embed) / this.cfg.V + this.norm.size;
  }

  /** Release the device (a deliberate loss, not reported to onLost). */
  destroy() {
    this.closed = true;
    this.device.destroy();
  }
}
