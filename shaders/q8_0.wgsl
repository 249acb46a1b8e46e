// Weight scheme Q8_0 (protocol/SPEC.md, "Model pack"): the planes of one matrix chunk, and the
// reads every kernel needs. Prepended to a kernel's source by client_web/resonator.js;
// bindings 0..2 of group 0 are reserved for weight planes. On the GPU a block's f16 scale
// has its own word and its 32 bytes are two vec4<u32>, stored as q + 128 (offset binary) so
// that a byte can be used where it lies, masked but not shifted or sign-extended.
// Python reference: server/pack.py dequantize().

@group(0) @binding(0) var<storage, read> w_d: array<u32>;    // per block: f16 d in the low half
@group(0) @binding(1) var<storage, read> w_q: array<vec4u>;  // per block: 32 bytes q + 128

// sum_j w[j] x[j] over block `blk`, x interleaved and scaled as for q4_1.wgsl: byte k of the
// four words of a 16-byte half lines up with column k of xl (first half) or xh (second), and
// as a float a masked byte is (q + 128) * 2^(8k), exactly, against x * 2^-(8k).
// w = d*q, so the sum is d * ((q + 128) . x - 128 * xsum).
fn block_dot(blk: u32, xl: mat4x4f, xh: mat4x4f, xsum: f32) -> f32 {
  let lo = w_q[2u * blk];
  let hi = w_q[2u * blk + 1u];
  let s = dot(vec4f(lo & vec4u(0xFFu)), xl[0]) + dot(vec4f(lo & vec4u(0xFF00u)), xl[1])
        + dot(vec4f(lo & vec4u(0xFF0000u)), xl[2]) + dot(vec4f(lo & vec4u(0xFF000000u)), xl[3])
        + dot(vec4f(hi & vec4u(0xFFu)), xh[0]) + dot(vec4f(hi & vec4u(0xFF00u)), xh[1])
        + dot(vec4f(hi & vec4u(0xFF0000u)), xh[2]) + dot(vec4f(hi & vec4u(0xFF000000u)), xh[3]);
  return unpack2x16float(w_d[blk]).x * (s - 128.0 * xsum);
}

// The factor gemv.wgsl's stage applies to staged column k (0..7) of a block: 2^-(bit offset).
fn x_scale(k: u32) -> f32 {
  return exp2(-f32(8u * (k % 4u)));
}

// Weight j of block `blk`, exactly as the spec evaluates it.
fn weight(blk: u32, j: u32) -> f32 {
  let byte = (w_q[2u * blk + j / 16u][(j & 15u) / 4u] >> (8u * (j & 3u))) & 0xFFu;
  return unpack2x16float(w_d[blk]).x * f32(i32(byte) - 128);
}
