// Second half of hologram decompression: rebuild one layer's keys or values of a segment into
// the KV cache. Exact head/tail tokens are copied from f16; a coded middle token m of block
// (l, g) is x = step * codes[:, m] @ B + mean with B from holo_basis.wgsl, and keys are
// rotated back to their true positions. Layout: protocol/SPEC.md, "Conversation hologram".
// Python reference: server/spectral.py decode().
//
// `exact`: invocation e * Dh/8 + j of workgroup row g copies dimensions 4j..4j+3 and the
//          same + Dh/2 of the e-th exact token (head, then tail) of KV head g.
//          Dispatch: (ceil((s + t) * Dh/8 / 64), G) per layer and kind.
// `coded`: invocation q * Dh/8 + j of row g rebuilds the same dimensions (a RoPE pair of
//          vec4s) of coded tokens 4q..4q+3, so each basis row is loaded once for 4 tokens.
//          Dispatch: (ceil(ceil(M / 4) * Dh/8 / 64), G) per layer and kind.
// Workgroups of 64 invocations, no barriers.

override DH: u32;
override G: u32;

struct UnpackParams {
  layer: u32,
  start: u32,    // position of the segment's first token
  head: u32,     // s: exact tokens at the start of the segment
  tail: u32,     // t: exact tokens at its end
  total: u32,    // T: tokens in the segment
  is_key: u32,
  tail_at: u32,  // offset (in halves) of the tail tensor in f16s
  mean_at: u32,  // offset (in floats) of mean in calib
}

@group(0) @binding(0) var<uniform> p: UnpackParams;
@group(0) @binding(1) var<storage, read> f16s: array<u32>;   // head [L,G,s,Dh] | tail [L,G,t,Dh] | svd_vt
@group(0) @binding(2) var<storage, read> codes: array<u32>;  // i8, four per word, one spare word at the end
@group(0) @binding(3) var<storage, read> blocks: array<Block>;
@group(0) @binding(4) var<storage, read> calib: array<vec4f>;
@group(0) @binding(5) var<storage, read> basis: array<vec4f>;  // holo_basis.wgsl's B per block
@group(0) @binding(6) var<storage, read> rope: array<vec2f>;   // [position][Dh/2] (cos, sin)
@group(0) @binding(7) var<storage, read_write> cache: array<vec4f>;  // [capacity, G, Dh]

// Four f16 values from half index i (even).
fn halves(i: u32) -> vec4f {
  return vec4f(unpack2x16float(f16s[i >> 1u]), unpack2x16float(f16s[(i >> 1u) + 1u]));
}

// The four signed codes at bytes byte .. byte+3 (any alignment).
fn codes4(byte: u32) -> vec4f {
  let w = byte >> 2u;
  let sh = (byte & 3u) * 8u;
  let v = select((codes[w] >> sh) | (codes[w + 1u] << (32u - sh)), codes[w], sh == 0u);
  return vec4f(unpack4xI8(v));
}

// Cache index (in vec4s) of dimensions i..i+3 of segment token t, KV head g.
fn slot(t: u32, g: u32, i: u32) -> u32 {
  return ((p.start + t) * G * DH + g * DH + i) / 4u;
}

// Invocation x of either entry point: item x / (Dh/8), dimensions dim .. dim+3 and + Dh/2.
fn item(gid: vec3u) -> u32 {
  return gid.x / (DH / 8u);
}

fn dim(gid: vec3u) -> u32 {
  return 4u * (gid.x % (DH / 8u));
}

@compute @workgroup_size(64)
fn exact(@builtin(global_invocation_id) gid: vec3u) {
  let hd = DH / 2u;
  let e = item(gid);
  let i = dim(gid);
  let g = gid.y;
  if (e >= p.head + p.tail) { return; }
  let lg = p.layer * G + g;
  var at = (lg * p.head + e) * DH + i;
  var t = e;
  if (e >= p.head) {
    at = p.tail_at + (lg * p.tail + e - p.head) * DH + i;
    t = p.total - p.tail + e - p.head;
  }
  let o = slot(t, g, i);
  cache[o] = halves(at);
  cache[o + hd / 4u] = halves(at + hd);
}

// x = step * sum + mean for the RoPE pair (a: dims i..i+3, c: the same + Dh/2), rotated for keys.
fn finish(t: u32, g: u32, i: u32, blk: Block, a_sum: vec4f, c_sum: vec4f) {
  let hd = DH / 2u;
  let mean = (p.mean_at + (p.layer * G + g) * DH + i) / 4u;
  var a = a_sum * blk.step + calib[mean];
  var c = c_sum * blk.step + calib[mean + hd / 4u];
  if (p.is_key == 1u) {
    let at = (p.start + t) * hd + i;
    let r0 = rope[at];
    let r1 = rope[at + 1u];
    let r2 = rope[at + 2u];
    let r3 = rope[at + 3u];
    let cs = vec4f(r0.x, r1.x, r2.x, r3.x);
    let sn = vec4f(r0.y, r1.y, r2.y, r3.y);
    let ra = a * cs - c * sn;
    c = c * cs + a * sn;
    a = ra;
  }
  let o = slot(t, g, i);
  cache[o] = a;
  cache[o + hd / 4u] = c;
}

@compute @workgroup_size(64)
fn coded(@builtin(global_invocation_id) gid: vec3u) {
  let hd = DH / 2u;
  let q = item(gid);
  let i = dim(gid);
  let g = gid.y;
  let mid = p.total - p.head - p.tail;
  let m0 = 4u * q;
  if (m0 >= mid) { return; }
  let lg = p.layer * G + g;
  let blk = blocks[lg];
  let b = (lg * DH * DH + i) / 4u;
  let row = DH / 4u;
  var a0 = vec4f(0.0);
  var a1 = vec4f(0.0);
  var a2 = vec4f(0.0);
  var a3 = vec4f(0.0);
  var c0 = vec4f(0.0);
  var c1 = vec4f(0.0);
  var c2 = vec4f(0.0);
  var c3 = vec4f(0.0);
  for (var r = 0u; r < blk.rank; r++) {
    let k = codes4(blk.codes_at + r * mid + m0);  // codes past mid belong to the next row: unused
    let ba = basis[b + r * row];
    let bc = basis[b + r * row + hd / 4u];
    a0 += k.x * ba;
    c0 += k.x * bc;
    a1 += k.y * ba;
    c1 += k.y * bc;
    a2 += k.z * ba;
    c2 += k.z * bc;
    a3 += k.w * ba;
    c3 += k.w * bc;
  }
  let t0 = p.head + m0;
  finish(t0, g, i, blk, a0, c0);
  if (m0 + 1u < mid) { finish(t0 + 1u, g, i, blk, a1, c1); }
  if (m0 + 2u < mid) { finish(t0 + 2u, g, i, blk, a2, c2); }
  if (m0 + 3u < mid) { finish(t0 + 3u, g, i, blk, a3, c3); }
}
