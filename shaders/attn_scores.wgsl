// Attention scores of the new token's query heads against every cached key (positions
// 0..state.pos), grouped-query: query heads g*HG .. g*HG+HG-1 read KV head g (HG = H/G <= 4).
// scores[h][t] = q_h . k_t / sqrt(Dh). Python reference: server/llama.py forward().
//
// Workgroup: 64 invocations; invocation x of row g scores keys 4x .. 4x+3 of KV head g
// for all HG heads, loading each vec4 of a key once for them (no barriers: a software
// adapter runs a barrier-free workgroup as one loop). Dispatch: (ceil((pos+1) / 256), G).

override H: u32;
override G: u32;
override DH: u32;
override SCALE: f32;  // 1/sqrt(Dh), rounded to f32 on the CPU

@group(0) @binding(0) var<storage, read> state: State;
@group(0) @binding(1) var<storage, read> qkv: array<vec4f>;
@group(0) @binding(2) var<storage, read> k_cache: array<vec4f>;  // [capacity, G, Dh]
@group(0) @binding(3) var<storage, read_write> scores: array<f32>;  // [H, capacity]

// Column j of q against k, for the HG live heads only (HG is a pipeline constant, so the
// dead branches cost nothing).
fn heads_dot(q: mat4x4f, k: vec4f) -> vec4f {
  var s = vec4f(dot(q[0], k), 0.0, 0.0, 0.0);
  if (H / G > 1u) { s.y = dot(q[1], k); }
  if (H / G > 2u) { s.z = dot(q[2], k); }
  if (H / G > 3u) { s.w = dot(q[3], k); }
  return s;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3u) {
  let hg = H / G;
  let g = gid.y;
  let n = state.pos + 1u;
  let t0 = 4u * gid.x;
  if (t0 >= n) { return; }
  let d4 = DH / 4u;
  // Heads past HG and keys past n read valid rows and are not written.
  let q0 = g * hg * d4;
  let qs = vec4u(q0, q0 + min(1u, hg - 1u) * d4, q0 + min(2u, hg - 1u) * d4, q0 + min(3u, hg - 1u) * d4);
  let t = min(vec4u(t0, t0 + 1u, t0 + 2u, t0 + 3u), vec4u(n - 1u));
  let ks = (t * G + g) * d4;
  var s = mat4x4f();  // column c: key t0 + c, component j: head j
  for (var d = 0u; d < d4; d++) {
    let q = mat4x4f(qkv[qs.x + d], qkv[qs.y + d], qkv[qs.z + d], qkv[qs.w + d]);
    s[0] += heads_dot(q, k_cache[ks.x + d]);
    s[1] += heads_dot(q, k_cache[ks.y + d]);
    s[2] += heads_dot(q, k_cache[ks.z + d]);
    s[3] += heads_dot(q, k_cache[ks.w + d]);
  }
  let cap = arrayLength(&scores) / H;
  for (var c = 0u; c < 4u; c++) {
    if (t0 + c >= n) { break; }
    for (var j = 0u; j < hg; j++) { scores[(g * hg + j) * cap + t0 + c] = s[c][j] * SCALE; }
  }
}
