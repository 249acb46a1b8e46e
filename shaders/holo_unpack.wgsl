// Second half of hologram decompression: rebuild one layer's keys or values of a segment into
// the KV cache. Exact head/tail tokens are copied from f16; a coded middle token m of block
// (l, g) is x = step * codes[:, m] @ B + mean with B from holo_basis.wgsl, and keys are
// rotated back to their true positions. Layout: protocol/SPEC.md, "Conversation hologram".
// Python reference: server/spectral.py decode().
//
// Workgroup: 64 invocations; invocation t * Dh/2 + i of workgroup row g writes dimensions
// i and i + Dh/2 (a RoPE pair) of segment token t, KV head g. Dispatch: (ceil(T * Dh/2 / 64), G)
// per layer and kind.

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
@group(0) @binding(4) var<storage, read> calib: array<f32>;
@group(0) @binding(5) var<storage, read> basis: array<f32>;  // holo_basis.wgsl's B per block
@group(0) @binding(6) var<storage, read> rope: array<vec2f>;  // [position][Dh/2] (cos, sin)
@group(0) @binding(7) var<storage, read_write> cache: array<f32>;  // [capacity, G, Dh]

fn half_at(i: u32) -> f32 {
  return unpack2x16float(f16s[i >> 1u])[i & 1u];
}

fn code_at(byte: u32) -> f32 {
  return f32(unpack4xI8(codes[byte >> 2u])[byte & 3u]);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3u) {
  let hd = DH / 2u;
  let t = gid.x / hd;
  let i = gid.x % hd;
  let g = gid.y;
  if (t >= p.total) { return; }
  let lg = p.layer * G + g;
  let out = (p.start + t) * G * DH + g * DH + i;
  let mid = p.total - p.head - p.tail;
  if (t < p.head) {
    let at = (lg * p.head + t) * DH + i;
    cache[out] = half_at(at);
    cache[out + hd] = half_at(at + hd);
    return;
  }
  if (t >= p.head + mid) {
    let at = p.tail_at + (lg * p.tail + t - p.head - mid) * DH + i;
    cache[out] = half_at(at);
    cache[out + hd] = half_at(at + hd);
    return;
  }
  let m = t - p.head;
  let blk = blocks[lg];
  let b = lg * DH * DH;
  var a = 0.0;
  var c = 0.0;
  for (var r = 0u; r < blk.rank; r++) {
    let code = code_at(blk.codes_at + r * mid + m);
    a += code * basis[b + r * DH + i];
    c += code * basis[b + r * DH + i + hd];
  }
  a = a * blk.step + calib[p.mean_at + lg * DH + i];
  c = c * blk.step + calib[p.mean_at + lg * DH + i + hd];
  if (p.is_key == 1u) {
    let cs = rope[(p.start + t) * hd + i];
    let ra = a * cs.x - c * cs.y;
    c = c * cs.x + a * cs.y;
    a = ra;
  }
  cache[out] = a;
  cache[out + hd] = c;
}
