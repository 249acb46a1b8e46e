// y = W x for a quantized W [rows, C] (one chunk of rows): the 'gpu' layout of gemv.wgsl's
// `main`, for adapters that are real GPUs. Needs a weight scheme (q4_1.wgsl / q8_0.wgsl)
// prepended. x is staged by gemv.wgsl's `stage` (same `xi` / `xsum`, same bindings by name),
// and the epilogues (MODE, GemvParams) are gemv.wgsl's.
// Python reference: server/llama.py forward() (the projections, silu(g) * u, residuals).
//
// `main`: a workgroup of LANES (lanes.wgsl) invocations is LANES / TPR rows of TPR invocations
//         each. Invocation t of a row takes the row's blocks t, t + TPR, ..., so the TPR
//         invocations of a row read TPR consecutive blocks at a time: one vec4<u32> of nibbles
//         (Q4_1) or two of bytes (Q8_0) and one scale word per invocation, contiguous across
//         the row (coalesced). The TPR partial sums are then added across the row's lanes
//         (lanes.wgsl: subgroup shuffles where the device has them, workgroup memory
//         otherwise; the same bits either way); invocation 0 of the row applies the epilogue.
//         MODE 2 carries the up row's sum beside the gate row's. TPR is a power of two
//         dividing LANES (resonator.js picks it from C). Dispatch: ceil(rows / (LANES / TPR))
//         workgroups, as (x, y) with x <= 65535; the flat index is y * num_workgroups.x + x.
// The float sums run in another order than gemv.wgsl's (strided partials, then a tree), so
// the two layouts' logits differ in the last bits; tests/test_web_resonator.py holds both to
// the Python reference's tokens.

override C: u32;              // input length, a multiple of 32
override TPR: u32 = 32u;      // invocations per row, a power of two dividing LANES
override MODE: u32 = 0u;      // 0: y[r] = W x   1: y[r] += W x   2: y[r] = silu(W_r x) * (W_{r+up} x)

@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<uniform> p: GemvParams;
@group(0) @binding(7) var<storage, read_write> xi: array<vec4f>;  // block b: 8 vec4, see block_dot
@group(0) @binding(8) var<storage, read_write> xsum: array<f32>;

@compute @workgroup_size(LANES)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3u,
        @builtin(num_workgroups) nwg: vec3u) {
  let nb = C / 32u;
  let t = lid % TPR;
  let want = (wid.y * nwg.x + wid.x) * (LANES / TPR) + lid / TPR;
  let row = min(want, p.rows - 1u);  // rows past the end compute a valid row, then drop it
  var acc = 0.0;
  var up = 0.0;
  for (var b = t; b < nb; b += TPR) {
    let xl = mat4x4f(xi[8u * b], xi[8u * b + 1u], xi[8u * b + 2u], xi[8u * b + 3u]);
    let xh = mat4x4f(xi[8u * b + 4u], xi[8u * b + 5u], xi[8u * b + 6u], xi[8u * b + 7u]);
    let s = xsum[b];
    acc += block_dot(row * nb + b, xl, xh, s);
    if (MODE == 2u) { up += block_dot((row + p.up) * nb + b, xl, xh, s); }
  }
  let sums = lanes_sum(vec4f(acc, up, 0.0, 0.0), lid, 1u, TPR);
  if (t != 0u || want >= p.rows) { return; }
  let o = p.y0 + want;
  let a = sums.x;
  switch MODE {
    case 1u: { y[o] = y[o] + a; }
    case 2u: { y[o] = a / (1.0 + exp(-a)) * sums.y; }
    default: { y[o] = a; }
  }
}
