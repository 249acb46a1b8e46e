// y = W x for a quantized W [rows, C] (one chunk of rows), with an optional RMSNorm of x first
// and one of three epilogues. Needs a weight scheme (q4_1.wgsl / q8_0.wgsl) prepended.
// Python reference: server/llama.py forward() (rms_norm, the projections, silu(g) * u, residuals).
//
// Workgroup: 64 invocations = (64 / LANES) rows x LANES lanes. The input vector is staged once
// per workgroup in workgroup memory (normalized there when NORM); each lane sums every
// LANES-th block of its row and the lanes are reduced through workgroup memory.
// Dispatch: ceil(rows / (64 / LANES)) workgroups along x.

override C: u32;              // input length, a multiple of 32
override LANES: u32 = 4u;     // invocations per row: 1, 2, 4, ... 64
override MODE: u32 = 0u;      // 0: y[r] = W x   1: y[r] += W x   2: y[r] = silu(W_r x) * (W_{r+up} x)
override NORM: bool = false;  // x <- x * rsqrt(mean(x^2) + EPS) * norm_w before the product
override EPS: f32 = 1e-5;

struct Params {
  rows: u32,   // rows computed by this dispatch (for MODE 2: gate rows; up rows follow them)
  y0: u32,     // index in y of this chunk's first row
  up: u32,     // MODE 2: offset of the up rows in W
  _pad: u32,
}

@group(0) @binding(3) var<storage, read> x: array<vec4f>;
@group(0) @binding(4) var<storage, read> norm_w: array<vec4f>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<uniform> p: Params;

const WG = 64u;
var<workgroup> xs: array<vec4f, C / 4u>;
var<workgroup> xsum: array<f32, C / 32u>;
var<workgroup> red: array<f32, WG>;

fn row_dot(row: u32, lane: u32) -> f32 {
  let nb = C / 32u;
  var acc = 0.0;
  for (var b = lane; b < nb; b += LANES) {
    var xb: array<vec4f, 8>;
    for (var i = 0u; i < 8u; i++) { xb[i] = xs[b * 8u + i]; }
    acc += block_dot(row * nb + b, xb, xsum[b]);
  }
  return acc;
}

// Sum of `red` over each row's LANES lanes, left in the row's lane 0.
fn reduce_lanes(lid: u32) -> f32 {
  var stride = LANES / 2u;
  loop {
    if (stride == 0u) { break; }
    workgroupBarrier();
    if ((lid % LANES) < stride) { red[lid] += red[lid + stride]; }
    stride /= 2u;
  }
  workgroupBarrier();
  return red[lid];
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3u) {
  let n4 = C / 4u;
  var scale = 1.0;
  if (NORM) {
    var ss = 0.0;
    for (var i = lid; i < n4; i += WG) { ss += dot(x[i], x[i]); }
    red[lid] = ss;
    for (var s = WG / 2u; s > 0u; s /= 2u) {
      workgroupBarrier();
      if (lid < s) { red[lid] += red[lid + s]; }
    }
    workgroupBarrier();
    scale = inverseSqrt(red[0] / f32(C) + EPS);
    workgroupBarrier();
  }
  for (var i = lid; i < n4; i += WG) {
    xs[i] = select(x[i], x[i] * scale * norm_w[i], NORM);
  }
  workgroupBarrier();
  for (var b = lid; b < C / 32u; b += WG) {
    var s = 0.0;
    for (var i = 0u; i < 8u; i++) { s += dot(xs[b * 8u + i], vec4f(1.0)); }
    xsum[b] = s;
  }
  workgroupBarrier();

  let lane = lid % LANES;
  let row = wid.x * (WG / LANES) + lid / LANES;
  let live = row < p.rows;
  let r = min(row, p.rows - 1u);  // dead lanes compute a valid row and drop it: barriers stay uniform
  red[lid] = row_dot(r, lane);
  let a = reduce_lanes(lid);
  var b = 0.0;
  if (MODE == 2u) {
    workgroupBarrier();
    red[lid] = row_dot(r + p.up, lane);
    b = reduce_lanes(lid);
  }
  if (!live || lane != 0u) { return; }
  let o = p.y0 + row;
  switch MODE {
    case 1u: { y[o] = y[o] + a; }
    case 2u: { y[o] = a / (1.0 + exp(-a)) * b; }
    default: { y[o] = a; }
  }
}
