// RoPE on the new token's q and k (half-split pairs: i with i + Dh/2), then k and v appended
// to this layer's KV cache at position state.pos. The cos/sin table is computed on the CPU in
// float64 and rounded to float32, as the Python side does.
// Python reference: server/rope.py rotate(), server/llama.py forward().
//
// Workgroup: 64 invocations; invocation i of the dispatch handles pair i of the
// (H + G) rotated heads, then value element i. Dispatch: ceil(max((H+G)*Dh/2, G*Dh) / 64).

override H: u32;
override G: u32;
override DH: u32;

@group(0) @binding(0) var<storage, read> state: State;
@group(0) @binding(1) var<storage, read> rope: array<vec2f>;        // [position][Dh/2] (cos, sin)
@group(0) @binding(2) var<storage, read_write> qkv: array<f32>;     // q [H*Dh], k [G*Dh], v [G*Dh]
@group(0) @binding(3) var<storage, read_write> k_cache: array<f32>;  // [capacity, G, Dh]
@group(0) @binding(4) var<storage, read_write> v_cache: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3u) {
  let i = gid.x;
  let hd = DH / 2u;
  let pos = state.pos;
  if (i < (H + G) * hd) {
    let head = i / hd;
    let j = i % hd;
    let cs = rope[pos * hd + j];
    let a = qkv[head * DH + j];
    let b = qkv[head * DH + j + hd];
    let ra = a * cs.x - b * cs.y;
    let rb = b * cs.x + a * cs.y;
    if (head < H) {
      qkv[head * DH + j] = ra;
      qkv[head * DH + j + hd] = rb;
    } else {
      let o = pos * G * DH + (head - H) * DH;
      k_cache[o + j] = ra;
      k_cache[o + j + hd] = rb;
    }
  }
  if (i < G * DH) {
    v_cache[pos * G * DH + i] = qkv[(H + G) * DH + i];
  }
}
