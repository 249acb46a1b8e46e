// Weight scheme Q4_1 (protocol/SPEC.md, "Model pack"): the planes of one matrix chunk, and the
// two reads every kernel needs. Prepended to a kernel's source by client_web/resonator.js;
// bindings 0..2 of group 0 are reserved for weight planes. On the GPU a block's f16 scale and
// minimum share one word, and its 16 bytes of nibbles are one vec4<u32>: one load each.
// Python reference: server/pack.py dequantize().

@group(0) @binding(0) var<storage, read> w_dm: array<u32>;    // per block: f16 d | f16 m << 16
@group(0) @binding(1) var<storage, read> w_qs: array<vec4u>;  // per block: byte j = q[j] | q[j+16] << 4

// sum_j w[j] x[j] over block `blk` (row-major block index), with x given in the interleaved
// order gemv.wgsl stages it in: column k of xl is (x[k], x[k+4], x[k+8], x[k+12]), column k
// of xh the same 16 further on, so byte k of the four words lines up with column k.
// w = d*q + m, so the sum is d * (q . x) + m * xsum: one multiply-add per weight.
fn block_dot(blk: u32, xl: mat4x4f, xh: mat4x4f, xsum: f32) -> f32 {
  let dm = unpack2x16float(w_dm[blk]);
  let q = w_qs[blk];
  let n = vec4u(15u);
  let s = dot(vec4f(q & n), xl[0]) + dot(vec4f((q >> vec4u(8u)) & n), xl[1])
        + dot(vec4f((q >> vec4u(16u)) & n), xl[2]) + dot(vec4f((q >> vec4u(24u)) & n), xl[3])
        + dot(vec4f((q >> vec4u(4u)) & n), xh[0]) + dot(vec4f((q >> vec4u(12u)) & n), xh[1])
        + dot(vec4f((q >> vec4u(20u)) & n), xh[2]) + dot(vec4f(q >> vec4u(28u)), xh[3]);
  return dm.x * s + dm.y * xsum;
}

// Weight j of block `blk`, exactly as the spec evaluates it.
fn weight(blk: u32, j: u32) -> f32 {
  let dm = unpack2x16float(w_dm[blk]);
  let byte = (w_qs[blk][(j & 15u) / 4u] >> (8u * (j & 3u))) & 0xFFu;
  return dm.x * f32(select(byte & 15u, byte >> 4u, j >= 16u)) + dm.y;
}
