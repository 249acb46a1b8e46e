// Weight scheme Q4_1 (protocol/SPEC.md, "Model pack"): the planes of one matrix chunk, and the
// two reads every kernel needs. Prepended to a kernel's source by client_web/resonator.js;
// bindings 0..2 of group 0 are reserved for weight planes.
// Python reference: server/pack.py dequantize().

@group(0) @binding(0) var<storage, read> w_d: array<u32>;   // f16 scale per block, two per word
@group(0) @binding(1) var<storage, read> w_m: array<u32>;   // f16 minimum per block
@group(0) @binding(2) var<storage, read> w_qs: array<u32>;  // 16 bytes per block: byte j = q[j] | q[j+16] << 4

fn half_at(words: u32, i: u32) -> f32 {
  return unpack2x16float(words)[i & 1u];
}

// sum_j w[j] * x[j] over block `blk` (row-major block index) with xsum = sum_j x[j].
// w = d*q + m, so the sum is d * (q . x) + m * xsum: one multiply-add per weight.
fn block_dot(blk: u32, x: array<vec4f, 8>, xsum: f32) -> f32 {
  let d = half_at(w_d[blk >> 1u], blk);
  let m = half_at(w_m[blk >> 1u], blk);
  var acc = 0.0;
  for (var i = 0u; i < 4u; i++) {
    let w = w_qs[blk * 4u + i];
    let b = vec4u(w, w >> 8u, w >> 16u, w >> 24u);
    acc += dot(vec4f(b & vec4u(15u)), x[i]) + dot(vec4f((b >> vec4u(4u)) & vec4u(15u)), x[i + 4u]);
  }
  return d * acc + m * xsum;
}

// Weight j of block `blk`, exactly as the spec evaluates it.
fn weight(blk: u32, j: u32) -> f32 {
  let byte = (w_qs[blk * 4u + (j & 15u) / 4u] >> (8u * (j & 3u))) & 0xFFu;
  let q = select(byte & 15u, byte >> 4u, j >= 16u);
  return half_at(w_d[blk >> 1u], blk) * f32(q) + half_at(w_m[blk >> 1u], blk);
}
