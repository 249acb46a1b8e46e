// What createEngine checks before it downloads anything, so that a browser that cannot run the
// engine fails at once with a typed error instead of after a pack download.

import { AdapterLimits, QuotaExceeded, WebGPUUnavailable } from './errors.js';

// What the kernels (shaders/) ask of an adapter: 64-invocation workgroups (gemv's WG may ask
// more) and up to 7 storage buffers in one bind group (gemv: two weight planes and five more).
const KERNEL_LIMITS = { maxComputeWorkgroupSizeX: 64, maxComputeInvocationsPerWorkgroup: 64,
  maxStorageBuffersPerShaderStage: 7 };

/** WebGPU, an adapter, and the limits the kernels need with gemv tuning `gemv`. */
export async function checkAdapter(gemv) {
  if (!('gpu' in navigator)) throw new WebGPUUnavailable('This browser does not offer WebGPU (navigator.gpu is missing).');
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) throw new WebGPUUnavailable('WebGPU is present but no GPU adapter is available.');
  const wg = gemv.WG || 0;
  const needs = { ...KERNEL_LIMITS, maxComputeWorkgroupSizeX: Math.max(KERNEL_LIMITS.maxComputeWorkgroupSizeX, wg),
    maxComputeInvocationsPerWorkgroup: Math.max(KERNEL_LIMITS.maxComputeInvocationsPerWorkgroup, wg) };
  const short = Object.entries(needs).filter(([name, needed]) => adapter.limits[name] < needed)
    .map(([name, needed]) => ({ name, needed, available: adapter.limits[name] }));
  if (short.length) {
    throw new AdapterLimits(`the GPU adapter offers less than the engine needs: ${short.map((l) =>
      `${l.name} ${l.available} < ${l.needed}`).join(', ')}`, { limits: short });
  }
}

/** Room in the origin's storage for `model`'s pack, unless `storage` already holds it. */
export async function checkQuota(storage, model) {
  if (await storage.getPack(model.pack_hash)) return;
  const { usage, quota } = await storage.usage();
  if (quota === undefined || usage === undefined) return;
  const needed = model.pack_bytes, available = Math.max(quota - usage, 0);
  if (needed > available) {
    throw new QuotaExceeded(`the model pack needs ${mb(needed)} of storage; this origin has ${mb(available)} left`,
      { needed, available });
  }
}

const mb = (n) => `${(n / 1e6).toFixed(1)} MB`;
