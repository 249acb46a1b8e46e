// Second half of hologram decompression: rebuild one layer's keys or values of a segment into
// the KV cache. Exact head/tail tokens are copied from f16; a coded middle token m of block
// (l, g) is x = step * codes[:, m] @ B + mean with B from holo_basis.wgsl, and keys are
// rotated back to their true positions. Layout: protocol/SPEC.md, "Conversation hologram".
// Python reference: server/spectral.py decode().
//
// Workgroup: 64 invocations; invocation t * Dh/8 + j of workgroup row g writes dimensions
// 4j..4j+3 and the same + Dh/2 (their RoPE partners) of segment token t, KV head g, as
// vec4s. Dispatch: (ceil(T * Dh/8 / 64), G) per layer and kind.

override DH: u32;
override G: u32;

struct Params {
  layer: u32,
  start: u32,    // position of the segment's first token
  head: u32,     // s: exact tokens at the start of the segment
  tail: u32,     // t: exact tokens at its end
  total: u32,    // T: tokens in the segment
  is_key: u32,
  tail_at: u32,  // offset (in halves) of the tail tensor in f16s
  mean_at: u32,  // offset (in floats) of mean in calib
}

struct Block { codes_at: u32, rank: u32, step: f32, basis: u32, svd_row: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> f16s: array<u32>;   // head [L,G,s,Dh] | tail [L,G,t,Dh] | svd_vt
@group(0) @binding(2) var<storage, read> codes: array<u32>;  // i8, four per word
@group(0) @binding(3) var<storage, read> blocks: array<Block>;
@group(0) @binding(4) var<storage, read> calib: array<vec4f>;
@group(0) @binding(5) var<storage, read> basis: array<vec4f>;  // holo_basis.wgsl's B per block
@group(0) @binding(6) var<storage, read> rope: array<vec2f>;   // [position][Dh/2] (cos, sin)
@group(0) @binding(7) var<storage, read_write> cache: array<vec4f>;  // [capacity, G, Dh]

// Four f16 values from half index i (even).
fn halves(i: u32) -> vec4f {
  return vec4f(unpack2x16float(f16s[i >> 1u]), unpack2x16float(f16s[(i >> 1u) + 1u]));
}

fn code_at(byte: u32) -> f32 {
  return f32(unpack4xI8(codes[byte >> 2u])[byte & 3u]);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3u) {
  let hd = DH / 2u;
  let t = gid.x / (hd / 4u);
  let i = 4u * (gid.x % (hd / 4u));
  let g = gid.y;
  if (t >= p.total) { return; }
  let lg = p.layer * G + g;
  let out = ((p.start + t) * G * DH + g * DH + i) / 4u;
  let o2 = out + hd / 4u;
  let mid = p.total - p.head - p.tail;
  if (t < p.head) {
    let at = (lg * p.head + t) * DH + i;
    cache[out] = halves(at);
    cache[o2] = halves(at + hd);
    return;
  }
  if (t >= p.head + mid) {
    let at = p.tail_at + (lg * p.tail + t - p.head - mid) * DH + i;
    cache[out] = halves(at);
    cache[o2] = halves(at + hd);
    return;
  }
  let m = t - p.head;
  let blk = blocks[lg];
  let b = (lg * DH * DH + i) / 4u;
  let row = DH / 4u;
  var a = vec4f(0.0);
  var c = vec4f(0.0);
  for (var r = 0u; r < blk.rank; r++) {
    let code = code_at(blk.codes_at + r * mid + m);
    a += code * basis[b + r * row];
    c += code * basis[b + r * row + hd / 4u];
  }
  let mean = (p.mean_at + lg * DH + i) / 4u;
  a = a * blk.step + calib[mean];
  c = c * blk.step + calib[mean + hd / 4u];
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
  cache[out] = a;
  cache[o2] = c;
}
