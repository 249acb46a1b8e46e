#!/usr/bin/env node
// The unchanged browser engine (client_web/resonator.js + shaders/) outside the browser: Node
// with Dawn's WebGPU bindings (npm `webgpu`, installed into bench/gpu/node_modules on first use).
//
// Input: a folder written by `python -m bench.gpu_kernels` (info.json, the model pack and one
// conversation hologram per context length). Per gemv layout the engine offers (both of
// 'cpu' and 'gpu' where resonator.js has them, else its default) and per context length:
// greedy decode tokens/s, per-kernel ms of one step (GPU timestamps where the adapter has
// 'timestamp-query', else the engine's wall-clock fallback, and it says which), dispatches
// per step, bytes of weights read per step, and that traffic over the adapter's copy
// bandwidth (bench/bandwidth.wgsl `copy`, same device). A table on stdout, JSON to --out.
//
//   node bench/gpu/gpu_kernels.mjs --files var/gpu-kernels/<model> [--ctx 256] [--new 16]
//
// Adapter (--adapter): 'auto' takes what Dawn finds through the system's Vulkan loader
// (a real GPU); if there is none it runs itself again on SwiftShader, the software Vulkan
// driver Chromium ships (/usr/lib/chromium/vk_swiftshader_icd.json, or $HPI_SWIFTSHADER_ICD).
// 'system' never falls back; 'swiftshader' always uses it. Offline: carry bench/gpu/node_modules
// (pruned to this platform's dawn.node, ~21 MB) and the files folder; --no-install then
// refuses to reach npm.
//
// Node's fetch cannot read file: URLs, so this script answers them itself (the shaders are
// loaded from the repo's shaders/ folder by file URL); resonator.js is imported as it is.
// --client / --shaders run another copy of the engine (say, an older commit's) on the same files.

import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { cpus, loadavg } from 'node:os';

const HERE = dirname(fileURLToPath(import.meta.url));
const REPO = resolve(HERE, '..', '..');
const SWIFTSHADER_ICDS = [process.env.HPI_SWIFTSHADER_ICD, '/usr/lib/chromium/vk_swiftshader_icd.json',
  '/usr/lib64/chromium/vk_swiftshader_icd.json', '/usr/lib/chromium-browser/vk_swiftshader_icd.json'].filter(Boolean);
const REEXEC = 'HPI_GPU_KERNELS_REEXEC';

const HELP = `usage: node bench/gpu/gpu_kernels.mjs --files DIR [options]
  --files DIR          folder from \`python -m bench.gpu_kernels\` (info.json, pack, holograms)
  --ctx N[,N...]       context lengths to run (default: every one in info.json)
  --new N              timed greedy decode steps per context (default 16)
  --warmup N           untimed steps first (default 2)
  --batch N            Resonator.create batch: steps per submission (default 4)
  --profile-repeats N  r.profile(N) per context; 0 skips it (default 3)
  --layouts a,b        gemv layouts to run (default: every one resonator.js declares)
  --probe-mb N         copy-bandwidth buffer size in MiB (default: min(128, binding limit))
  --adapter MODE       auto | system | swiftshader (default auto)
  --dawn FLAG          a Dawn option for create() (repeatable), e.g. --dawn backend=vulkan
  --out FILE           JSON result (default DIR/gpu_kernels.json)
  --client DIR         the engine's folder, resonator.js in it (default: the repo's client_web)
  --shaders DIR        its WGSL folder (default: the repo's shaders), e.g. both from an older commit
  --no-install         never run npm; fail if bench/gpu/node_modules/webgpu is missing`;

function parseArgs(argv) {
  const a = { ctx: null, new: 16, warmup: 2, batch: 4, profileRepeats: 3, layouts: null, probeMb: null,
    adapter: 'auto', dawn: [], out: null, install: true, files: null,
    client: join(REPO, 'client_web'), shaders: join(REPO, 'shaders') };
  const num = (v, k) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) throw new Error(`${k} takes a whole number, not ${v}`);
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i], v = () => { if (i + 1 >= argv.length) throw new Error(`${k} needs a value`); return argv[++i]; };
    switch (k) {
      case '--files': a.files = resolve(v()); break;
      case '--ctx': a.ctx = v().split(',').filter(Boolean).map((x) => num(x, k)); break;
      case '--new': a.new = num(v(), k); break;
      case '--warmup': a.warmup = num(v(), k); break;
      case '--batch': a.batch = num(v(), k); break;
      case '--profile-repeats': a.profileRepeats = num(v(), k); break;
      case '--layouts': a.layouts = v().split(',').filter(Boolean); break;
      case '--probe-mb': a.probeMb = num(v(), k); break;
      case '--adapter': a.adapter = v(); break;
      case '--dawn': a.dawn.push(v()); break;
      case '--out': a.out = resolve(v()); break;
      case '--no-install': a.install = false; break;
      case '--client': a.client = resolve(v()); break;
      case '--shaders': a.shaders = resolve(v()); break;
      case '-h': case '--help': console.log(HELP); process.exit(0); break;
      default: throw new Error(`unknown argument ${k}\n${HELP}`);
    }
  }
  if (!a.files) throw new Error(`--files is required\n${HELP}`);
  if (!['auto', 'system', 'swiftshader'].includes(a.adapter)) throw new Error(`--adapter: auto, system or swiftshader`);
  if (a.new < 1) throw new Error('--new must be at least 1');
  return a;
}

const log = (...m) => console.error('[gpu_kernels]', ...m);

// ---- the webgpu package ------------------------------------------------------------------------

const platformDir = () => `${process.platform}-${process.platform === 'darwin' ? 'universal' : process.arch}`;

async function loadWebgpu(install) {
  const entry = join(HERE, 'node_modules', 'webgpu', 'index.js');
  if (!existsSync(entry)) {
    if (!install) throw new Error(`${entry} is missing and --no-install was given (carry bench/gpu/node_modules)`);
    log('installing the npm package webgpu into bench/gpu/node_modules ...');
    const r = spawnSync('npm', ['ci', '--no-audit', '--no-fund', '--loglevel=error'], { cwd: HERE, stdio: ['ignore', 2, 2] });
    if (r.status !== 0) throw new Error(`npm ci in ${HERE} failed (${r.error?.message || `exit ${r.status}`})`);
    // Dawn comes prebuilt for five platforms (~130 MB); keep this one's (~21 MB), so the folder can be carried.
    const dist = join(HERE, 'node_modules', 'webgpu', 'dist');
    for (const d of readdirSync(dist)) if (d !== platformDir()) rmSync(join(dist, d), { recursive: true, force: true });
  }
  return import(pathToFileURL(entry).href);
}

function findSwiftShader() {
  return SWIFTSHADER_ICDS.find((p) => existsSync(p)) || null;
}

/** Run this script again with SwiftShader as the only Vulkan driver (and its loader found first). */
function reexecOnSwiftShader(icd) {
  const dir = dirname(icd);
  const env = { ...process.env, [REEXEC]: '1', VK_ICD_FILENAMES: icd, VK_DRIVER_FILES: icd, NODEVICE_SELECT: '1',
    LD_LIBRARY_PATH: [dir, process.env.LD_LIBRARY_PATH].filter(Boolean).join(':') };
  log(`running again on SwiftShader (${icd})`);
  const r = spawnSync(process.execPath, [...process.execArgv, ...process.argv.slice(1)], { stdio: 'inherit', env });
  process.exit(r.status ?? 1);
}

/** navigator.gpu from Dawn, on the adapter `mode` asks for; may re-exec (and then never returns). */
async function setUpGpu(webgpu, args) {
  const icd = findSwiftShader();
  if (args.adapter === 'swiftshader' && !process.env[REEXEC]) {
    if (!icd) throw new Error(`no SwiftShader ICD at ${SWIFTSHADER_ICDS.join(', ')}`);
    reexecOnSwiftShader(icd);
  }
  Object.assign(globalThis, webgpu.globals);
  const gpu = webgpu.create(args.dawn);
  const adapter = await gpu.requestAdapter();
  if (adapter) return gpu;
  if (args.adapter === 'auto' && !process.env[REEXEC] && icd) reexecOnSwiftShader(icd);
  throw new Error('Dawn found no WebGPU adapter: no Vulkan loader/driver (install a GPU driver, or chromium for '
    + `SwiftShader at ${SWIFTSHADER_ICDS.join(', ')}; VK_ICD_FILENAMES=${process.env.VK_ICD_FILENAMES || ''})`);
}

/** fetch() that also reads file: URLs (Node's cannot); everything else goes to Node's own. */
function fetchFileUrls() {
  const nodeFetch = globalThis.fetch;
  globalThis.fetch = async (input, init) => {
    const url = new URL(typeof input === 'string' || input instanceof URL ? input : input.url);
    if (url.protocol !== 'file:') return nodeFetch(input, init);
    try {
      return new Response(await readFile(url), { status: 200 });
    } catch (e) {
      return new Response(String(e.message), { status: e.code === 'ENOENT' ? 404 : 500 });
    }
  };
}

// ---- measurements ------------------------------------------------------------------------------

const median = (xs) => { const s = [...xs].sort((a, b) => a - b); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };

/** Copy bandwidth of the device: bench/bandwidth.wgsl `copy` over `bytes`, traffic = read + write. */
async function copyBandwidth(device, bindingSlots, bytes, reps = 5, perSubmit = 8) {
  const src = readFileSync(join(REPO, 'bench', 'bandwidth.wgsl'), 'utf8');
  const module = device.createShaderModule({ code: src, label: 'bandwidth.wgsl' });
  const pipe = device.createComputePipeline({ layout: 'auto', compute: { module, entryPoint: 'copy' } });
  const slots = bindingSlots(src, 'bandwidth.wgsl');
  const S = GPUBufferUsage.STORAGE;
  const a = device.createBuffer({ size: bytes, usage: S }), b = device.createBuffer({ size: bytes, usage: S });
  const group = device.createBindGroup({ layout: pipe.getBindGroupLayout(0), entries: [
    { binding: slots.src, resource: { buffer: a } }, { binding: slots.dst, resource: { buffer: b } }] });
  const groups = Math.ceil(bytes / 16 / 256);
  const stamps = device.features.has('timestamp-query');
  const qs = stamps ? device.createQuerySet({ type: 'timestamp', count: 2 }) : null;
  const resolveBuf = stamps ? device.createBuffer({ size: 16, usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC }) : null;
  const readBuf = stamps ? device.createBuffer({ size: 16, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST }) : null;
  const run = async (count, timed) => {
    const enc = device.createCommandEncoder();
    const pass = enc.beginComputePass(timed && stamps
      ? { timestampWrites: { querySet: qs, beginningOfPassWriteIndex: 0, endOfPassWriteIndex: 1 } } : {});
    for (let i = 0; i < count; i++) { pass.setPipeline(pipe); pass.setBindGroup(0, group); pass.dispatchWorkgroups(groups); }
    pass.end();
    if (timed && stamps) { enc.resolveQuerySet(qs, 0, 2, resolveBuf, 0); enc.copyBufferToBuffer(resolveBuf, 0, readBuf, 0, 16); }
    device.queue.submit([enc.finish()]);
    await device.queue.onSubmittedWorkDone();
    if (!(timed && stamps)) return null;
    await readBuf.mapAsync(GPUMapMode.READ);
    const t = new BigUint64Array(readBuf.getMappedRange().slice(0));
    readBuf.unmap();
    return Number(t[1] - t[0]) / 1e6;
  };
  await run(1, false);  // compile, first touch of the pages
  const wall = [], gpu = [];
  for (let r = 0; r < reps; r++) {
    const t0 = performance.now();
    const ms = await run(perSubmit, true);
    wall.push((performance.now() - t0) / perSubmit);
    if (ms !== null) gpu.push(ms / perSubmit);
  }
  [a, b, qs, resolveBuf, readBuf].forEach((x) => x?.destroy());
  const traffic = 2 * bytes;
  const out = { kernel: 'bench/bandwidth.wgsl copy', bytes, traffic, reps, perSubmit,
    wallMs: wall, wallGBs: traffic / median(wall) / 1e6 };
  if (gpu.length) Object.assign(out, { timestampMs: gpu, timestampGBs: traffic / median(gpu) / 1e6 });
  out.gbS = Math.max(out.wallGBs, out.timestampGBs || 0);
  out.method = out.timestampGBs && out.timestampGBs >= out.wallGBs ? 'timestamp-query' : 'wall clock';
  return out;
}

/** The gemv layouts resonator.js declares (`LAYOUTS = ['a', 'b']`), or [null]: its default only. */
function engineLayouts(mod, client) {
  if (Array.isArray(mod.LAYOUTS)) return mod.LAYOUTS;
  const src = readFileSync(join(client, 'resonator.js'), 'utf8');
  const m = src.match(/\bLAYOUTS\s*=\s*\[([^\]]*)\]/);
  const names = m ? [...m[1].matchAll(/'(\w+)'|"(\w+)"/g)].map((x) => x[1] || x[2]) : [];
  return names.length ? names : [null];
}

async function runLayout(Resonator, layout, pack, info, contexts, args) {
  const opts = { shaderBase: pathToFileURL(args.shaders).href + '/', batch: args.batch };
  if (layout) opts.layout = layout;
  let t0 = performance.now();
  const r = await Resonator.create(opts);
  const errors = [];
  r.device.addEventListener('uncapturederror', (e) => errors.push(e.error.message));
  await r.loadPack(pack, info.pack_hash);
  await r.device.queue.onSubmittedWorkDone();
  const out = { layout: r.layout ?? layout ?? 'default', loadPackMs: performance.now() - t0,
    bytesPerToken: r.bytesPerToken, cfg: r.cfg, contexts: {}, errors };
  log(`layout ${out.layout}: loadPack ${out.loadPackMs.toFixed(0)} ms; ${(out.bytesPerToken / 1e6).toFixed(3)} MB of weights per token`);
  const gen = { temperature: 0, seed: 0, stopAtEos: false };
  for (const ctx of contexts) {
    const c = info.contexts[String(ctx)];
    const holo = readFileSync(join(args.files, c.file));
    r.rewind(0, null);
    t0 = performance.now();
    const meta = await r.addHologram(holo);
    const addMs = performance.now() - t0;
    if (args.warmup) await r.generate(args.warmup, gen);
    r.rewind(meta.end, meta.next_id);
    const marks = [];
    t0 = performance.now();
    const tokens = await r.generate(args.new, { ...gen, onTokens: (b) => marks.push(b.length) });
    const decodeMs = performance.now() - t0;
    r.rewind(meta.end, meta.next_id);
    const plan = r.stepPlan(r.position);
    const dispatches = {};
    for (const [name] of plan) dispatches[name] = (dispatches[name] || 0) + 1;
    const profile = args.profileRepeats ? await r.profile(args.profileRepeats) : null;
    r.rewind(meta.end, meta.next_id);
    const row = { positions: meta.end, hologramBytes: holo.byteLength, addHologramMs: addMs, n: args.new,
      warmup: args.warmup, decodeMs, msPerToken: decodeMs / args.new, tokS: 1e3 * args.new / decodeMs, tokens,
      dispatchesPerToken: plan.length, dispatches, profile };
    out.contexts[ctx] = row;
    log(`  ctx ${meta.end}: ${row.msPerToken.toFixed(2)} ms/token = ${row.tokS.toFixed(2)} tok/s; ${plan.length} dispatches/token`
      + (profile ? `; profile (${profile.method})` : ''));
  }
  r.destroy();
  return out;
}

// ---- report ------------------------------------------------------------------------------------

function table(result) {
  const a = result.adapter, lines = [];
  const f = (v, d = 2) => (v === null || v === undefined ? '–' : v.toFixed(d));
  lines.push(`adapter: ${a.vendor || '?'} / ${a.architecture || '?'} / ${a.device || '?'} (${a.description || '?'}); `
    + `isFallbackAdapter ${a.isFallbackAdapter}; Dawn via npm webgpu ${result.webgpu}, Node ${result.node}`);
  lines.push(`features: ${a.features.join(', ') || 'none'}`);
  lines.push(`timestamp-query: ${a.features.includes('timestamp-query') ? 'yes (per-kernel ms from GPU timestamps)'
    : 'NO (per-kernel ms are the engine\'s fallback: each kernel\'s dispatches submitted alone, wall clock)'}`);
  const bw = result.bandwidth;
  lines.push(`copy bandwidth: ${f(bw.gbS)} GB/s (${bw.kernel}, ${(bw.bytes / 2 ** 20).toFixed(0)} MiB, read + write; `
    + `wall clock ${f(bw.wallGBs)}${bw.timestampGBs ? `, timestamps ${f(bw.timestampGBs)}` : ''} GB/s)`);
  lines.push(`model: ${result.model}; pack ${(result.packBytes / 1e6).toFixed(1)} MB; host ${result.cpu}, `
    + `1-min load average ${f(result.loadAvgStart)} at start, ${f(result.loadAvgEnd)} at end`, '');
  lines.push('| layout | context | tok/s | ms/token | dispatches/token | weights MB/token | weights GB/s | of copy bandwidth |');
  lines.push('|---|---:|---:|---:|---:|---:|---:|---:|');
  for (const L of result.layouts) {
    for (const [ctx, c] of Object.entries(L.contexts)) {
      lines.push(`| ${L.layout} | ${c.positions} | ${f(c.tokS)} | ${f(c.msPerToken)} | ${c.dispatchesPerToken} | `
        + `${f(L.bytesPerToken / 1e6, 3)} | ${f(c.weightsGBs, 3)} | ${f(100 * c.bandwidthFraction, 1)}% |`);
    }
  }
  for (const L of result.layouts) {
    for (const [ctx, c] of Object.entries(L.contexts)) {
      if (!c.profile) continue;
      const k = c.profile.kernels, total = Object.values(k).reduce((s, v) => s + v, 0);
      lines.push('', `per-kernel ms of one step, layout ${L.layout}, context ${c.positions} (${c.profile.method}):`, '',
        '| kernel | dispatches | ms | share |', '|---|---:|---:|---:|');
      for (const [name, ms] of Object.entries(k).sort((x, y) => y[1] - x[1])) {
        lines.push(`| ${name} | ${c.dispatches[name] || 0} | ${f(ms, 3)} | ${f(100 * ms / total, 1)}% |`);
      }
      lines.push(`| **sum** | ${c.dispatchesPerToken} | ${f(total, 3)} | 100% |`, `| measured step | | ${f(c.msPerToken, 3)} | |`);
    }
  }
  return lines.join('\n');
}

// ---- main --------------------------------------------------------------------------------------

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const info = JSON.parse(readFileSync(join(args.files, 'info.json'), 'utf8'));
  const contexts = args.ctx || Object.keys(info.contexts).map(Number).sort((x, y) => x - y);
  for (const c of contexts) {
    if (!info.contexts[String(c)]) {
      throw new Error(`no hologram for context ${c} in ${args.files} (has ${Object.keys(info.contexts).join(', ')}); `
        + `run python -m bench.gpu_kernels --ctx ${c}`);
    }
  }
  const webgpu = await loadWebgpu(args.install);
  const gpu = await setUpGpu(webgpu, args);
  globalThis.navigator = { gpu };
  fetchFileUrls();
  const engine = await import(pathToFileURL(join(args.client, 'resonator.js')).href);

  const adapter = await gpu.requestAdapter();
  const ai = adapter.info || {};
  const adapterInfo = { vendor: ai.vendor, architecture: ai.architecture, device: ai.device, description: ai.description,
    isFallbackAdapter: ai.isFallbackAdapter ?? adapter.isFallbackAdapter ?? null,
    subgroupMinSize: ai.subgroupMinSize, subgroupMaxSize: ai.subgroupMaxSize,
    features: [...adapter.features].sort(),
    limits: Object.fromEntries(['maxStorageBufferBindingSize', 'maxBufferSize', 'maxComputeWorkgroupsPerDimension',
      'maxComputeInvocationsPerWorkgroup', 'maxComputeWorkgroupStorageSize'].map((k) => [k, adapter.limits[k]])) };
  log(`adapter ${adapterInfo.vendor} / ${adapterInfo.architecture} / ${adapterInfo.description}; `
    + `fallback ${adapterInfo.isFallbackAdapter}; timestamp-query ${adapter.features.has('timestamp-query')}`);

  const pack = readFileSync(join(args.files, info.pack));
  const layouts = args.layouts || engineLayouts(engine, args.client);
  // What the engine picks on this adapter when the page does not say (null: it has no choice).
  const chooser = await engine.Resonator.create({ shaderBase: pathToFileURL(args.shaders).href + '/' });
  const chosenLayout = chooser.layout ?? null;
  chooser.destroy();
  const result = { adapter: adapterInfo, chosenLayout, client: args.client, shaders: args.shaders, node: process.version,
    webgpu: JSON.parse(readFileSync(join(HERE, 'node_modules', 'webgpu', 'package.json'), 'utf8')).version,
    cpu: `${cpus()[0]?.model} x ${cpus().length}`, loadAvgStart: loadavg()[0],
    vkIcd: process.env.VK_ICD_FILENAMES || null, model: info.model, packHash: info.pack_hash, packBytes: pack.byteLength,
    flags: { new: args.new, warmup: args.warmup, batch: args.batch, profileRepeats: args.profileRepeats, contexts },
    layouts: [] };
  for (const layout of layouts) result.layouts.push(await runLayout(engine.Resonator, layout, pack, info, contexts, args));

  // The copy probe on a device of its own, after the engine's are gone (same adapter).
  const device = await adapter.requestDevice({ requiredLimits: {
    maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize, maxBufferSize: adapter.limits.maxBufferSize },
  requiredFeatures: adapter.features.has('timestamp-query') ? ['timestamp-query'] : [] });
  const limit = Math.min(device.limits.maxStorageBufferBindingSize, device.limits.maxBufferSize, 65535 * 256 * 16);
  const bytes = Math.floor(Math.min(limit, (args.probeMb ?? 128) * 2 ** 20) / 4096) * 4096;
  result.bandwidth = await copyBandwidth(device, engine.bindingSlots, bytes);
  device.destroy();
  log(`copy bandwidth ${result.bandwidth.gbS.toFixed(2)} GB/s (${result.bandwidth.method})`);

  for (const L of result.layouts) {
    for (const c of Object.values(L.contexts)) {
      c.weightsGBs = L.bytesPerToken * c.tokS / 1e9;
      c.bandwidthFraction = c.weightsGBs / result.bandwidth.gbS;
    }
  }
  result.loadAvgEnd = loadavg()[0];
  const out = args.out || join(args.files, 'gpu_kernels.json');
  mkdirSync(dirname(out), { recursive: true });
  writeFileSync(out, JSON.stringify(result, null, 1) + '\n');
  console.log(table(result));
  log(`wrote ${out}`);
  delete globalThis.navigator.gpu;  // Dawn keeps Node alive while the instance is referenced
}

main().then(() => process.exit(0), (e) => {
  console.error(`gpu_kernels: ${e.stack || e}`);
  process.exit(1);
});
