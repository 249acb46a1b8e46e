// Weight scheme Q8_0 (protocol/SPEC.md, "Model pack"): the planes of one matrix chunk, and the
// two reads every kernel needs. Prepended to a kernel's source by client_web/resonator.js;
// bindings 0..2 of group 0 are reserved for weight planes.
// Python reference: server/pack.py dequantize().

@group(0) @binding(0) var<storage, read> w_d: array<u32>;  // f16 scale per block, two per word
@group(0) @binding(1) var<storage, read> w_q: array<u32>;  // 32 signed bytes per block

fn half_at(words: u32, i: u32) -> f32 {
  return unpack2x16float(words)[i & 1u];
}

fn block_dot(blk: u32, x: array<vec4f, 8>, xsum: f32) -> f32 {
  var acc = 0.0;
  for (var i = 0u; i < 8u; i++) {
    acc += dot(vec4f(unpack4xI8(w_q[blk * 8u + i])), x[i]);
  }
  return half_at(w_d[blk >> 1u], blk) * acc;
}

fn weight(blk: u32, j: u32) -> f32 {
  let q = unpack4xI8(w_q[blk * 8u + j / 4u])[j & 3u];
  return half_at(w_d[blk >> 1u], blk) * f32(q);
}
