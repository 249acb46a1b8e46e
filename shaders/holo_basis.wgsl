// First half of hologram decompression: per coded block (layer, KV head), the product of its
// basis rows and the un-whitening matrix, B = rows[:rank] @ unwhiten [rank, Dh], so that
// holo_unpack.wgsl rebuilds a token as step * codes @ B + mean in one pass. rows are the
// identity (raw), the calibrated PCA columns (pca) or the block's own f16 rows (svd).
// Layout and formulas: protocol/SPEC.md, "Conversation hologram".
// Python reference: server/spectral.py decode().
//
// Workgroup: 64 invocations; invocation r * Dh + i of workgroup row y computes B[r][i] of
// block y. Dispatch: (ceil(Dh * Dh / 64), L * G).

override DH: u32;

struct BasisParams {
  svd_at: u32,       // offset (in halves) of svd_vt in f16s
  unwhiten_at: u32,  // offset (in floats) of unwhiten in calib
  _pad0: u32,
  _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: BasisParams;
@group(0) @binding(1) var<storage, read> f16s: array<u32>;   // head | tail | svd_vt, f16 pairs
@group(0) @binding(2) var<storage, read> blocks: array<Block>;
@group(0) @binding(3) var<storage, read> calib: array<f32>;  // pca [L,G,Dh,Dh] | unwhiten [L,G,Dh,Dh] | mean
@group(0) @binding(4) var<storage, read_write> basis: array<f32>;  // [L*G, Dh, Dh], rows < rank used

fn half_at(i: u32) -> f32 {
  return unpack2x16float(f16s[i >> 1u])[i & 1u];
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3u) {
  let lg = gid.y;
  let r = gid.x / DH;
  let i = gid.x % DH;
  let blk = blocks[lg];
  if (r >= blk.rank) { return; }
  let m = lg * DH * DH;
  let uw = p.unwhiten_at + m;
  var s = 0.0;
  switch blk.basis {
    case 0u: { s = calib[uw + r * DH + i]; }  // identity rows
    case 1u: {
      for (var j = 0u; j < DH; j++) { s += calib[m + j * DH + r] * calib[uw + j * DH + i]; }
    }
    default: {
      let at = p.svd_at + (blk.svd_row + r) * DH;
      for (var j = 0u; j < DH; j++) { s += half_at(at + j) * calib[uw + j * DH + i]; }
    }
  }
  basis[m + r * DH + i] = s;
}
