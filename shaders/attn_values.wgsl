// Attention output: out[h] = sum_t e[h][t] * v_t / sums[h], in SLICES slices of the
// positions (summed by the o projection's gemv stage). Python reference:
// server/llama.py forward() (softmax @ v).
//
// Workgroup: 64 invocations; invocation g * Dh/4 + i of row s sums dimensions 4i..4i+3 of
// every query head reading KV head g (HG = H/G <= 4) over slice s of the positions, four
// positions at a time, so each value row is loaded once for all HG heads.
// Dispatch: (ceil(G * Dh / 4 / 64), SLICES).

override H: u32;
override G: u32;
override DH: u32;
override SLICES: u32;

@group(0) @binding(0) var<storage, read> state: State;
@group(0) @binding(1) var<storage, read> e: array<vec4f>;        // [H, capacity / 4], zero-padded
@group(0) @binding(2) var<storage, read> sums: array<f32>;       // [H]
@group(0) @binding(3) var<storage, read> v_cache: array<vec4f>;  // [capacity, G, Dh]
@group(0) @binding(4) var<storage, read_write> attn: array<vec4f>;  // [SLICES, H * Dh]

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3u) {
  let d4 = DH / 4u;
  if (gid.x >= G * d4) { return; }
  let hg = H / G;
  let g = gid.x / d4;
  let i = gid.x % d4;
  let n4 = (state.pos + 4u) / 4u;
  let cap4 = arrayLength(&e) / H;
  // rows of heads g*hg + j; heads past hg repeat the last one and are not written
  let h0 = g * hg;
  let rows = vec4u(h0, h0 + min(1u, hg - 1u), h0 + min(2u, hg - 1u), h0 + min(3u, hg - 1u)) * cap4;
  var a0 = vec4f(0.0);
  var a1 = vec4f(0.0);
  var a2 = vec4f(0.0);
  var a3 = vec4f(0.0);
  for (var t = n4 * gid.y / SLICES; t < n4 * (gid.y + 1u) / SLICES; t++) {
    let base = (4u * t * G + g) * d4 + i;
    let step = G * d4;
    let v = mat4x4f(v_cache[base], v_cache[base + step], v_cache[base + 2u * step], v_cache[base + 3u * step]);
    a0 += v * e[rows.x + t];
    if (hg > 1u) { a1 += v * e[rows.y + t]; }  // hg is a pipeline constant: dead heads cost nothing
    if (hg > 2u) { a2 += v * e[rows.z + t]; }
    if (hg > 3u) { a3 += v * e[rows.w + t]; }
  }
  let o = gid.y * H * d4 + h0 * d4 + i;
  attn[o] = a0 / sums[h0];
  if (hg > 1u) { attn[o + d4] = a1 / sums[h0 + 1u]; }
  if (hg > 2u) { attn[o + 2u * d4] = a2 / sums[h0 + 2u]; }
  if (hg > 3u) { attn[o + 3u * d4] = a3 / sums[h0 + 3u]; }
}
