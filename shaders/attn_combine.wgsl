// Merge attention.wgsl's per-chunk partial results into each query head's output:
// out = sum_c acc_c * exp(m_c - M) / sum_c l_c * exp(m_c - M), M = max_c m_c.
// Python reference: server/llama.py forward() (softmax over all positions, @ v).
//
// Workgroup: 64 invocations, one per head dimension (looping if Dh > 64); workgroup h is
// query head h. Dispatch: H workgroups.

override H: u32;
override DH: u32;
override CHUNK: u32 = 256u;

struct State { pos: u32, token: u32, step: u32, seed: u32, temperature: f32 }

@group(0) @binding(0) var<storage, read> state: State;
@group(0) @binding(1) var<storage, read> part: array<f32>;  // [chunk][H][2 + Dh]
@group(0) @binding(2) var<storage, read_write> attn: array<f32>;  // [H * Dh]

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3u) {
  let h = wid.x;
  let chunks = (state.pos + CHUNK) / CHUNK;
  let stride = H * (2u + DH);
  var mx = part[h * (2u + DH)];
  for (var c = 1u; c < chunks; c++) { mx = max(mx, part[c * stride + h * (2u + DH)]); }
  var l = 0.0;
  for (var c = 0u; c < chunks; c++) {
    let o = c * stride + h * (2u + DH);
    l += part[o + 1u] * exp(part[o] - mx);
  }
  for (var d = lid; d < DH; d += 64u) {
    var acc = 0.0;
    for (var c = 0u; c < chunks; c++) {
      let o = c * stride + h * (2u + DH);
      acc += part[o + 2u + d] * exp(part[o] - mx);
    }
    attn[h * DH + d] = acc / l;
  }
}
