// y = W x for a quantized W [rows, C] (one chunk of rows), with an optional RMSNorm of x first
// and one of three epilogues. Needs a weight scheme (q4_1.wgsl / q8_0.wgsl) prepended.
// Python reference: server/llama.py forward() (rms_norm, the projections, silu(g) * u, residuals).
//
// Two entry points, one dispatch each:
// `stage`: one workgroup of 64 writes x (summed over its SLICES parts, then normalized when
//          NORM) to `xi`, interleaved per 32-block the way the schemes' block_dot reads it
//          and scaled by their x_scale, and each block's sum (unscaled) to `xsum`.
// `main`:  WG invocations per workgroup, each computing 4 rows WG apart and reading each
//          block of xi once for its 4 rows. No barriers, so a software adapter runs a
//          workgroup as one loop rather than one coroutine per 4 invocations, and
//          straight-line code, since its compiler does not unroll loops or keep small
//          arrays in registers. Dispatch: ceil(rows / (4 * WG)) workgroups along x.

override C: u32;              // input length, a multiple of 32
override WG: u32 = 64u;
override MODE: u32 = 0u;      // 0: y[r] = W x   1: y[r] += W x   2: y[r] = silu(W_r x) * (W_{r+up} x)
override NORM: bool = false;  // x <- x * rsqrt(mean(x^2) + EPS) * norm_w before the product
override SLICES: u32 = 1u;    // x arrives as SLICES partial sums, one after the other
override EPS: f32 = 1e-5;

// GemvParams (common.wgsl): this dispatch's rows, y index of its first row, MODE 2's up offset.

@group(0) @binding(3) var<storage, read> x: array<f32>;  // [SLICES, C]
@group(0) @binding(4) var<storage, read> norm_w: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<uniform> p: GemvParams;
@group(0) @binding(7) var<storage, read_write> xi: array<vec4f>;  // block b: 8 vec4, see block_dot
@group(0) @binding(8) var<storage, read_write> xsum: array<f32>;

var<workgroup> red: array<f32, 64>;

fn dots(rows: vec4u, b: u32, nb: u32) -> vec4f {
  let xl = mat4x4f(xi[8u * b], xi[8u * b + 1u], xi[8u * b + 2u], xi[8u * b + 3u]);
  let xh = mat4x4f(xi[8u * b + 4u], xi[8u * b + 5u], xi[8u * b + 6u], xi[8u * b + 7u]);
  let s = xsum[b];
  return vec4f(block_dot(rows.x * nb + b, xl, xh, s), block_dot(rows.y * nb + b, xl, xh, s),
               block_dot(rows.z * nb + b, xl, xh, s), block_dot(rows.w * nb + b, xl, xh, s));
}

fn x_at(i: u32) -> f32 {
  var v = x[i];
  for (var s = 1u; s < SLICES; s++) { v += x[s * C + i]; }
  return v;
}

@compute @workgroup_size(64)
fn stage(@builtin(local_invocation_index) lid: u32) {
  var scale = 1.0;
  if (NORM) {
    var ss = 0.0;
    for (var i = lid; i < C; i += 64u) { ss += x_at(i) * x_at(i); }
    red[lid] = ss;
    for (var s = 32u; s > 0u; s /= 2u) {
      workgroupBarrier();
      if (lid < s) { red[lid] += red[lid + s]; }
    }
    workgroupBarrier();
    scale = inverseSqrt(red[0] / f32(C) + EPS);
  }
  // vec4 k of block b holds x[32b + 16(k/4) + k%4 + 4i] in component i
  for (var v = lid; v < C / 4u; v += 64u) {
    let base = 32u * (v / 8u) + 16u * ((v % 8u) / 4u) + v % 4u;
    let idx = vec4u(base, base + 4u, base + 8u, base + 12u);
    var xv = vec4f(x_at(idx.x), x_at(idx.y), x_at(idx.z), x_at(idx.w));
    if (NORM) { xv = xv * scale * vec4f(norm_w[idx.x], norm_w[idx.y], norm_w[idx.z], norm_w[idx.w]); }
    xi[v] = xv * x_scale(v % 8u);
  }
  for (var b = lid; b < C / 32u; b += 64u) {
    var s = 0.0;
    for (var j = 32u * b; j < 32u * b + 32u; j++) { s += select(x_at(j), x_at(j) * scale * norm_w[j], NORM); }
    xsum[b] = s;
  }
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3u) {
  let nb = C / 32u;
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
