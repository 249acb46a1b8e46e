// Rebuild one layer's keys or values of a conversation hologram segment into the KV cache:
// exact head/tail tokens are copied from f16; coded middle tokens are rebuilt from their
// int8 codes in the block's basis (raw, pca or svd), un-whitened, mean added, and keys
// rotated back to their true positions. Layout and formulas: protocol/SPEC.md,
// "Conversation hologram". Python reference: server/spectral.py decode().
//
// Workgroup: 64 invocations, one per head dimension (Dh <= 64); workgroup (t, g) rebuilds
// segment token t of KV head g. Dispatch: (T, G) per layer and kind.

override DH: u32;
override G: u32;

struct Params {
  layer: u32,
  start: u32,     // position of the segment's first token
  head: u32,      // s: exact tokens at the start of the segment
  tail: u32,      // t: exact tokens at its end
  total: u32,     // T: tokens in the segment
  is_key: u32,
  tail_at: u32,   // offset (in halves) of the tail tensor in f16s
  svd_at: u32,    // offset (in halves) of svd_vt in f16s
  unwhiten_at: u32,  // offsets (in floats) in calib
  mean_at: u32,
  _pad0: u32,
  _pad1: u32,
}

// Per block (layer-major, then head): byte offset of its codes, rank, step bits, basis code,
// first svd row.
struct Block { codes_at: u32, rank: u32, step: f32, basis: u32, svd_row: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> f16s: array<u32>;    // head [L,G,s,Dh] | tail | svd_vt, f16 pairs
@group(0) @binding(2) var<storage, read> codes: array<u32>;   // i8, four per word
@group(0) @binding(3) var<storage, read> blocks: array<Block>;
@group(0) @binding(4) var<storage, read> calib: array<f32>;   // pca [L,G,Dh,Dh] | unwhiten [L,G,Dh,Dh] | mean [L,G,Dh]
@group(0) @binding(5) var<storage, read> rope: array<vec2f>;  // [position][Dh/2] (cos, sin)
@group(0) @binding(6) var<storage, read_write> cache: array<f32>;  // [capacity, G, Dh]

var<workgroup> a: array<f32, 64>;
var<workgroup> b: array<f32, 64>;

fn half_at(i: u32) -> f32 {
  return unpack2x16float(f16s[i >> 1u])[i & 1u];
}

fn code_at(byte: u32) -> f32 {
  return f32(unpack4xI8(codes[byte >> 2u])[byte & 3u]);
}

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) i: u32, @builtin(workgroup_id) wid: vec3u) {
  let t = wid.x;
  let g = wid.y;
  let lg = p.layer * G + g;
  let out = (p.start + t) * G * DH + g * DH + i;
  let m_count = p.total - p.head - p.tail;
  if (t < p.head) {
    if (i < DH) { cache[out] = half_at((lg * p.head + t) * DH + i); }
    return;
  }
  if (t >= p.head + m_count) {
    if (i < DH) { cache[out] = half_at(p.tail_at + (lg * p.tail + t - p.head - m_count) * DH + i); }
    return;
  }
  let m = t - p.head;
  let blk = blocks[lg];
  let dd = DH * DH;
  // whitened row: xw[i] = step * sum_r code[r, m] * basis_r[i]
  var xw = 0.0;
  if (i < DH) {
    if (blk.basis == 0u) {
      if (i < blk.rank) { xw = code_at(blk.codes_at + i * m_count + m); }
    } else {
      for (var r = 0u; r < blk.rank; r++) {
        let c = code_at(blk.codes_at + r * m_count + m);
        if (blk.basis == 1u) {
          xw += c * calib[lg * dd + i * DH + r];  // pca column r
        } else {
          xw += c * half_at(p.svd_at + (blk.svd_row + r) * DH + i);
        }
      }
    }
  }
  a[i] = xw * blk.step;
  workgroupBarrier();
  // x = xw @ unwhiten + mean
  var x = 0.0;
  if (i < DH) {
    for (var j = 0u; j < DH; j++) { x += a[j] * calib[p.unwhiten_at + lg * dd + j * DH + i]; }
    x += calib[p.mean_at + lg * DH + i];
  }
  b[i] = x;
  workgroupBarrier();
  if (i >= DH) { return; }
  if (p.is_key == 1u) {
    let hd = DH / 2u;
    let cs = rope[(p.start + t) * hd + i % hd];
    if (i < hd) { x = x * cs.x - b[i + hd] * cs.y; } else { x = x * cs.x + b[i - hd] * cs.y; }
  }
  cache[out] = x;
}
