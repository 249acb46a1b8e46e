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
// A nibble is used where it lies, masked but not shifted down: as a float it is q * 2^s
// (exact), and the staged x carries the matching 2^-s (x_scale), so the products are exactly
// q * x with one operation per weight fewer. w = d*q + m, so the sum is d * (q . x) + m * xsum.
fn block_dot(blk: u32, xl: mat4x4f, xh: mat4x4f, xsum: f32) -> f32 {
  let dm = unpack2x16float(w_dm[blk]);
  let q = w_qs[blk];
  let s = dot(vec4f(q & vec4u(0xFu)), xl[0]) + dot(vec4f(q & vec4u(0xF00u)), xl[1])
        + dot(vec4f(q & vec4u(0xF0000u)), xl[2]) + dot(vec4f(q & vec4u(0xF000000u)), xl[3])
        + dot(vec4f(q & vec4u(0xF0u)), xh[0]) + dot(vec4f(q & vec4u(0xF000u)), xh[1])
        + dot(vec4f(q & vec4u(0xF00000u)), xh[2]) + dot(vec4f(q & vec4u(0xF0000000u)), xh[3]);
  return dm.x * s + dm.y * xsum;
}

// The factor gemv.wgsl's stage applies to staged column k (0..7) of a block: 2^-(bit offset).
fn x_scale(k: u32) -> f32 {
  return exp2(-f32(8u * (k % 4u) + 4u * (k / 4u)));
}

// Weight j of block `blk`, exactly as the spec evaluates it.
fn weight(blk: u32, j: u32) -> f32 {
  let dm = unpack2x16float(w_dm[blk]);
  let byte = (w_qs[blk][(j & 15u) / 4u] >> (8u * (j & 3u))) & 0xFFu;
  return dm.x * f32(select(byte & 15u, byte >> 4u, j >= 16u)) + dm.y;
}
