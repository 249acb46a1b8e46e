// y = W x for a quantized W [rows, C] (one chunk of rows), with an optional RMSNorm of x first
// and one of three epilogues. Needs a weight scheme (q4_1.wgsl / q8_0.wgsl) prepended.
// Python reference: server/llama.py forward() (rms_norm, the projections, silu(g) * u, residuals).
//
// Workgroup: WG invocations, each computing 4 rows WG apart. The input vector is staged once
// per workgroup in workgroup memory (normalized there when NORM), interleaved per 32-block
// the way the schemes' block_dot reads it; each invocation loads a block of x once for its
// 4 rows. Straight-line code on purpose: a software adapter's compiler does not unroll
// loops or keep small arrays in registers, and loads, not arithmetic, bound the product.
// Dispatch: ceil(rows / (4 * WG)) workgroups along x.

override C: u32;              // input length, a multiple of 32
override WG: u32 = 64u;
override MODE: u32 = 0u;      // 0: y[r] = W x   1: y[r] += W x   2: y[r] = silu(W_r x) * (W_{r+up} x)
override NORM: bool = false;  // x <- x * rsqrt(mean(x^2) + EPS) * norm_w before the product
override EPS: f32 = 1e-5;

struct Params {
  rows: u32,   // rows computed by this dispatch (for MODE 2: gate rows; up rows follow them)
  y0: u32,     // index in y of this chunk's first row
  up: u32,     // MODE 2: offset of the up rows in W
  _pad: u32,
}

@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> norm_w: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<uniform> p: Params;

var<workgroup> xs: array<vec4f, C / 4u>;  // block b: 8 vec4, see block_dot
var<workgroup> xsum: array<f32, C / 32u>;
var<workgroup> red: array<f32, WG>;

fn dots(rows: vec4u, b: u32, nb: u32) -> vec4f {
  let xl = mat4x4f(xs[8u * b], xs[8u * b + 1u], xs[8u * b + 2u], xs[8u * b + 3u]);
  let xh = mat4x4f(xs[8u * b + 4u], xs[8u * b + 5u], xs[8u * b + 6u], xs[8u * b + 7u]);
  let s = xsum[b];
  return vec4f(block_dot(rows.x * nb + b, xl, xh, s), block_dot(rows.y * nb + b, xl, xh, s),
               block_dot(rows.z * nb + b, xl, xh, s), block_dot(rows.w * nb + b, xl, xh, s));
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3u) {
  var scale = 1.0;
  if (NORM) {
    var ss = 0.0;
    for (var i = lid; i < C; i += WG) { ss += x[i] * x[i]; }
    red[lid] = ss;
    for (var s = WG / 2u; s > 0u; s /= 2u) {
      workgroupBarrier();
      if (lid < s) { red[lid] += red[lid + s]; }
    }
    workgroupBarrier();
    scale = inverseSqrt(red[0] / f32(C) + EPS);
  }
  // vec4 k of block b holds x[32b + 16(k/4) + k%4 + 4i] in component i
  for (var v = lid; v < C / 4u; v += WG) {
    let base = 32u * (v / 8u) + 16u * ((v % 8u) / 4u) + v % 4u;
    let idx = vec4u(base, base + 4u, base + 8u, base + 12u);
    var xv = vec4f(x[idx.x], x[idx.y], x[idx.z], x[idx.w]);
    if (NORM) { xv = xv * scale * vec4f(norm_w[idx.x], norm_w[idx.y], norm_w[idx.z], norm_w[idx.w]); }
    xs[v] = xv;
  }
  workgroupBarrier();
  let nb = C / 32u;
  for (var b = lid; b < nb; b += WG) {
    let s = xs[8u * b] + xs[8u * b + 1u] + xs[8u * b + 2u] + xs[8u * b + 3u]
          + xs[8u * b + 4u] + xs[8u * b + 5u] + xs[8u * b + 6u] + xs[8u * b + 7u];
    xsum[b] = s.x + s.y + s.z + s.w;
  }
  workgroupBarrier();

  let first = wid.x * 4u * WG + lid;
  let want = vec4u(first, first + WG, first + 2u * WG, first + 3u * WG);
  let rows = min(want, vec4u(p.rows - 1u));  // rows past the end compute a valid row, then drop it
  var acc = vec4f(0.0);
  var up = vec4f(0.0);
  for (var b = 0u; b < nb; b++) {
    acc += dots(rows, b, nb);
    if (MODE == 2u) { up += dots(rows + vec4u(p.up), b, nb); }
  }
  for (var k = 0u; k < 4u; k++) {
    if (want[k] >= p.rows) { break; }
    let o = p.y0 + want[k];
    let a = acc[k];
    switch MODE {
      case 1u: { y[o] = y[o] + a; }
      case 2u: { y[o] = a / (1.0 + exp(-a)) * up[k]; }
      default: { y[o] = a; }
    }
  }
}
