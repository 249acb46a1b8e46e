// Weight scheme Q8_0 (protocol/SPEC.md, "Model pack"): the planes of one matrix chunk, and the
// two reads every kernel needs. Prepended to a kernel's source by client_web/resonator.js;
// bindings 0..2 of group 0 are reserved for weight planes. On the GPU a block's f16 scale
// has its own word and its 32 bytes are two vec4<u32>.
// Python reference: server/pack.py dequantize().

@group(0) @binding(0) var<storage, read> w_d: array<u32>;    // per block: f16 d in the low half
@group(0) @binding(1) var<storage, read> w_q: array<vec4u>;  // per block: 32 signed bytes

// x in gemv.wgsl's interleaved order (see q4_1.wgsl): byte k of the four words of a 16-byte
// half lines up with column k of xl (first half) or xh (second half).
fn block_dot(blk: u32, xl: mat4x4f, xh: mat4x4f, xsum: f32) -> f32 {
  let lo = bitcast<vec4i>(w_q[2u * blk]);
  let hi = bitcast<vec4i>(w_q[2u * blk + 1u]);
  let s = dot(vec4f(extractBits(lo, 0u, 8u)), xl[0]) + dot(vec4f(extractBits(lo, 8u, 8u)), xl[1])
        + dot(vec4f(extractBits(lo, 16u, 8u)), xl[2]) + dot(vec4f(lo >> vec4u(24u)), xl[3])
        + dot(vec4f(extractBits(hi, 0u, 8u)), xh[0]) + dot(vec4f(extractBits(hi, 8u, 8u)), xh[1])
        + dot(vec4f(extractBits(hi, 16u, 8u)), xh[2]) + dot(vec4f(hi >> vec4u(24u)), xh[3]);
  return unpack2x16float(w_d[blk]).x * s;
}

// Bytes are moved down before use, so the staged x is not scaled.
fn x_scale(k: u32) -> f32 {
  return 1.0;
}

fn weight(blk: u32, j: u32) -> f32 {
  let q = unpack4xI8(w_q[2u * blk + j / 16u][(j & 15u) / 4u])[j & 3u];
  return unpack2x16float(w_d[blk]).x * f32(q);
}
