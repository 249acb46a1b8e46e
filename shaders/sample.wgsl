// Token choice over the logits: greedy argmax (first index on ties), or Gumbel-max at
// temperature T > 0 with noise from the counter-based hash of protocol/SPEC.md "Sampling",
// bit-identical to numpy for the uniform u (log is not bit-exact across platforms).
// Python reference: server/sampling.py choose(), uniform().
//
// `scan`:  invocation i scores logits [64i, 64i + 64) in order and writes its best; no
//           barriers, so a software adapter runs each workgroup as one loop.
//           Dispatch: ceil(V / 64 / 64) workgroups of 64.
// `pick`:   one workgroup of 64 reduces the ceil(V / 64) strip bests (a strided share
//           each, then a tree through workgroup memory), records the token and advances
//           the state (the position of the token fed next). Dispatch: 1.
// `noise`:  u and Gumbel noise for every token id at (seed, pos); used by the tests.

override V: u32;

@group(0) @binding(0) var<storage, read_write> state: State;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> best: array<vec2u>;  // (score bits, index) per workgroup
@group(0) @binding(3) var<storage, read_write> tokens: array<u32>;  // token chosen at each step

const WG = 64u;
const STRIP = 64u;  // logits per scan invocation
var<workgroup> bv: array<f32, WG>;
var<workgroup> bi: array<u32, WG>;

fn lowbias32(v: u32) -> u32 {
  var x = v;
  x ^= x >> 16u;
  x *= 0x7feb352du;
  x ^= x >> 15u;
  x *= 0x846ca68bu;
  x ^= x >> 16u;
  return x;
}

fn uniform01(seed: u32, pos: u32, id: u32) -> f32 {
  let h = lowbias32(lowbias32(lowbias32(seed) + pos) + id);
  return (f32(h >> 9u) * 2.0 + 1.0) / 16777216.0;
}

// -log(-log(u)). Near u = 1, log(u) would lose everything to WGSL's absolute error bound
// (2^-21 on [0.5, 2]) and could even return 0 (an infinite draw), so -log(u) comes from the
// series of -log(1 - v), v = 1 - u exact, where v is small.
fn gumbel(u: f32) -> f32 {
  let v = 1.0 - u;
  var e = -log(u);
  if (v < 0.015625) { e = v * (1.0 + v * (0.5 + v * (1.0 / 3.0 + v * 0.25))); }
  return -log(e);
}

// Keep (v, i) in slot `a` if it beats slot a's entry: higher score, or equal and lower index.
fn better(v: f32, i: u32, w: f32, j: u32) -> bool {
  return v > w || (v == w && i < j);
}

fn reduce(lid: u32) {
  for (var s = WG / 2u; s > 0u; s /= 2u) {
    workgroupBarrier();
    if (lid < s && better(bv[lid + s], bi[lid + s], bv[lid], bi[lid])) {
      bv[lid] = bv[lid + s];
      bi[lid] = bi[lid + s];
    }
  }
  workgroupBarrier();
}

@compute @workgroup_size(WG)
fn scan(@builtin(global_invocation_id) gid: vec3u) {
  let first = gid.x * STRIP;
  if (first >= V) { return; }
  let t = state.temperature;
  let pos = state.pos + 1u;  // the position of the token being chosen
  var v = -3.0e38;
  var idx = 0xFFFFFFFFu;
  for (var i = first; i < min(first + STRIP, V); i++) {
    var s = logits[i];
    if (t > 0.0) { s = s / t + gumbel(uniform01(state.seed, pos, i)); }
    if (s > v) { v = s; idx = i; }
  }
  best[gid.x] = vec2u(bitcast<u32>(v), idx);
}

@compute @workgroup_size(WG)
fn pick(@builtin(local_invocation_index) lid: u32) {
  let parts = (V + STRIP - 1u) / STRIP;
  var v = -3.0e38;
  var idx = 0xFFFFFFFFu;
  for (var k = lid; k < parts; k += WG) {
    let b = best[k];
    if (better(bitcast<f32>(b.x), b.y, v, idx)) { v = bitcast<f32>(b.x); idx = b.y; }
  }
  bv[lid] = v;
  bi[lid] = idx;
  reduce(lid);
  if (lid == 0u) {
    let token = select(bi[0], 0u, bi[0] >= V);  // only if every logit was NaN
    tokens[state.step] = token;
    state.token = token;
    state.pos += 1u;
    state.step += 1u;
  }
}

@compute @workgroup_size(WG)
fn noise(@builtin(global_invocation_id) gid: vec3u) {
  let i = gid.x;
  if (i >= V) { return; }
  let u = uniform01(state.seed, state.pos, i);
  best[i] = vec2u(bitcast<u32>(u), bitcast<u32>(gumbel(u)));
}
