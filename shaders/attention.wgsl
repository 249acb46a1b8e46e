// Attention of the new token's query heads over one chunk of the KV cache (positions
// 0..state.pos), grouped-query: one workgroup serves the H/G query heads that read KV head g,
// so each key and value is read once per group. Writes per (chunk, head) the chunk's running
// max m, its sum of exp(score - m) l, and the unnormalized output acc [Dh];
// attn_combine.wgsl merges the chunks (flash-decoding).
// Python reference: server/llama.py forward() (scores / sqrt(Dh), softmax, @ v).
//
// Workgroup: 64 invocations; workgroup (c, g) covers positions [c*CHUNK, (c+1)*CHUNK) of KV
// head g. Scores: one invocation per key; max/sum: one invocation per query head; output:
// one invocation per head dimension. Dispatch: (ceil((pos+1) / CHUNK), G).

override H: u32;
override G: u32;
override DH: u32;
override CHUNK: u32 = 256u;
override SCALE: f32;  // 1/sqrt(Dh), rounded to f32 on the CPU

struct State { pos: u32, token: u32, step: u32, seed: u32, temperature: f32 }

@group(0) @binding(0) var<storage, read> state: State;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> k_cache: array<f32>;  // [capacity, G, Dh]
@group(0) @binding(3) var<storage, read> v_cache: array<f32>;
@group(0) @binding(4) var<storage, read_write> part: array<f32>;  // [chunk][H][2 + Dh]

const WG = 64u;
var<workgroup> q_s: array<f32, (H / G) * DH>;
var<workgroup> sc: array<f32, (H / G) * CHUNK>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3u) {
  let hg = H / G;
  let g = wid.y;
  let t0 = wid.x * CHUNK;
  let n = min(CHUNK, state.pos + 1u - t0);
  for (var i = lid; i < hg * DH; i += WG) { q_s[i] = qkv[g * hg * DH + i]; }
  workgroupBarrier();

  for (var t = lid; t < n; t += WG) {
    let kb = ((t0 + t) * G + g) * DH;
    for (var h = 0u; h < hg; h++) {
      var s = 0.0;
      for (var d = 0u; d < DH; d++) { s += q_s[h * DH + d] * k_cache[kb + d]; }
      sc[h * CHUNK + t] = s * SCALE;
    }
  }
  workgroupBarrier();

  if (lid < hg) {
    var m = sc[lid * CHUNK];
    for (var t = 1u; t < n; t++) { m = max(m, sc[lid * CHUNK + t]); }
    var l = 0.0;
    for (var t = 0u; t < n; t++) {
      let e = exp(sc[lid * CHUNK + t] - m);
      sc[lid * CHUNK + t] = e;
      l += e;
    }
    let o = (wid.x * H + g * hg + lid) * (2u + DH);
    part[o] = m;
    part[o + 1u] = l;
  }
  workgroupBarrier();

  for (var d = lid; d < DH; d += WG) {
    for (var h = 0u; h < hg; h++) {
      var acc = 0.0;
      for (var t = 0u; t < n; t++) { acc += sc[h * CHUNK + t] * v_cache[((t0 + t) * G + g) * DH + d]; }
      part[(wid.x * H + g * hg + h) * (2u + DH) + 2u + d] = acc;
    }
  }
}
