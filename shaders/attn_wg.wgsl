// Attention of the new token in the 'gpu' layout: attn_scores, attn_softmax and attn_values
// (the 'cpu' layout, one invocation per few positions) as workgroups of LANES (lanes.wgsl)
// that cooperate over the positions, 0..state.pos (the hologram's and the tokens since).
// Grouped-query: query heads g*HG .. g*HG+HG-1 read KV head g (HG = H/G <= 4).
// Python reference: server/llama.py forward() (q k^T / sqrt(Dh), torch.softmax, @ v).
//
// A cached row (Dh/4 vec4 of one position and KV head) is read by KL consecutive lanes, one
// vec4 each (KL: the power of two >= Dh/4; lanes past Dh/4 read a valid vec4 and add zero),
// so a row is one contiguous load across them and LANES / KL rows are read at once.
//
// `qk`:      workgroup (x, g) scores positions KEYS*x .. KEYS*x+KEYS-1 against KV head g, for
//            its HG heads together: per row, a vec4 (one component per head) of partial dot
//            products summed over the row's KL lanes. Dispatch: (ceil((pos+1) / KEYS), G).
// `softmax`: workgroup h: max and sum of exp over the positions, each lane every LANES-th,
//            then across lanes; e = exp(s - max) in place, the sum to sums[h]. Dispatch: H.
// `pv`:      workgroup (g, s) sums e[h][t] * v_t over slice s of the positions for the HG
//            heads of KV head g, LANES / KL positions at once, then across them; out to slice s
//            of attn (summed by the o projection's gemv stage). Dispatch: (G, SLICES).

override H: u32;
override G: u32;
override DH: u32;
override KL: u32;       // lanes per cached row
override SCALE: f32;    // 1/sqrt(Dh), rounded to f32 on the CPU
override KEYS: u32;     // positions per `scores` workgroup, a multiple of LANES / KL
override SLICES: u32;

@group(0) @binding(0) var<storage, read> state: State;
@group(0) @binding(1) var<storage, read> qkv: array<vec4f>;
@group(0) @binding(2) var<storage, read> k_cache: array<vec4f>;  // [capacity, G, Dh]
@group(0) @binding(3) var<storage, read> v_cache: array<vec4f>;  // [capacity, G, Dh]
@group(0) @binding(4) var<storage, read_write> scores: array<f32>;  // [H, capacity]: scores, then e
@group(0) @binding(5) var<storage, read_write> sums: array<f32>;    // [H]
@group(0) @binding(6) var<storage, read_write> attn: array<vec4f>;  // [SLICES, H * Dh]

// Row h of `scores` for the HG heads of KV head g (heads past HG repeat the last; not written).
fn head_rows(g: u32) -> vec4u {
  let hg = H / G;
  let h0 = g * hg;
  return vec4u(h0, h0 + min(1u, hg - 1u), h0 + min(2u, hg - 1u), h0 + min(3u, hg - 1u));
}

@compute @workgroup_size(LANES)
fn qk(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3u) {
  let d4 = DH / 4u;
  let g = wid.y;
  let n = state.pos + 1u;
  let i = lid % KL;
  let d = min(i, d4 - 1u);
  let live = select(0.0, 1.0, i < d4);
  let h = head_rows(g) * d4 + vec4u(d);
  let q = mat4x4f(qkv[h.x], qkv[h.y], qkv[h.z], qkv[h.w]);  // column j: head j
  let cap = arrayLength(&scores) / H;
  for (var t0 = wid.x * KEYS; t0 < wid.x * KEYS + KEYS; t0 += LANES / KL) {
    let t = t0 + lid / KL;
    let k = k_cache[(min(t, n - 1u) * G + g) * d4 + d] * live;
    let s = lanes_sum(k * q, lid, 1u, KL);  // component j: head j
    if (i == 0u && t < n) {
      for (var j = 0u; j < H / G; j++) { scores[head_rows(g)[j] * cap + t] = s[j] * SCALE; }
    }
  }
}

@compute @workgroup_size(LANES)
fn softmax(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3u) {
  let n = state.pos + 1u;
  let row = wid.x * (arrayLength(&scores) / H);
  var m = -3.0e38;
  for (var t = lid; t < n; t += LANES) { m = max(m, scores[row + t]); }
  m = lanes_max(vec4f(m), lid, 1u, LANES).x;
  var l = 0.0;
  for (var t = lid; t < n; t += LANES) {
    let e = exp(scores[row + t] - m);
    scores[row + t] = e;
    l += e;
  }
  l = lanes_sum(vec4f(l), lid, 1u, LANES).x;
  if (lid == 0u) { sums[wid.x] = l; }
}

@compute @workgroup_size(LANES)
fn pv(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3u) {
  let d4 = DH / 4u;
  let g = wid.x;
  let n = state.pos + 1u;
  let i = lid % KL;
  let d = min(i, d4 - 1u);
  let rows = head_rows(g) * (arrayLength(&scores) / H);
  var a = mat4x4f();  // column j: head j
  for (var t = n * wid.y / SLICES + lid / KL; t < n * (wid.y + 1u) / SLICES; t += LANES / KL) {
    let e = vec4f(scores[rows.x + t], scores[rows.y + t], scores[rows.z + t], scores[rows.w + t]);
    let v = v_cache[(t * G + g) * d4 + d];
    a += mat4x4f(v * e.x, v * e.y, v * e.z, v * e.w);
  }
  let o = wid.y * H * d4 + d;
  for (var j = 0u; j < H / G; j++) {
    let s = lanes_sum(a[j], lid, KL, LANES);
    let h = head_rows(g)[j];
    if (lid < d4) { attn[o + h * d4] = s / sums[h]; }
  }
}
