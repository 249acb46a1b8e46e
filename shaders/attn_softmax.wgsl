// Softmax numerators of each query head's scores over positions 0..state.pos, in place:
// e[h][t] = exp(s - max), zero for the padding up to a multiple of 4 positions (which
// attn_values.wgsl reads four at a time); their sum goes to sums[h].
// Python reference: torch.softmax in server/llama.py forward().
//
// Workgroup: 4 invocations (one SIMD group on a software adapter, so its barriers are
// cheap); workgroup h handles query head h, invocation k every 4th vec4 of positions.
// Dispatch: H.

override H: u32;

@group(0) @binding(0) var<storage, read> state: State;
@group(0) @binding(1) var<storage, read_write> scores: array<vec4f>;  // [H, capacity / 4]
@group(0) @binding(2) var<storage, read_write> sums: array<f32>;      // [H]

var<workgroup> part: array<f32, 4>;

@compute @workgroup_size(4)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) k: u32) {
  let n = state.pos + 1u;
  let n4 = (n + 3u) / 4u;
  let row = wid.x * (arrayLength(&scores) / H);
  let last = n - 4u * (n4 - 1u);  // live positions in the last vec4: 1..4
  let pad = vec4<bool>(false, last < 2u, last < 3u, last < 4u);
  var m = -3.0e38;
  for (var t = k; t < n4; t += 4u) {
    let s = select(scores[row + t], vec4f(-3.0e38), pad & vec4<bool>(t == n4 - 1u));
    m = max(m, max(max(s.x, s.y), max(s.z, s.w)));
  }
  part[k] = m;
  workgroupBarrier();
  m = max(max(part[0], part[1]), max(part[2], part[3]));
  workgroupBarrier();
  var l = 0.0;
  for (var t = k; t < n4; t += 4u) {
    let e = select(exp(scores[row + t] - m), vec4f(0.0), pad & vec4<bool>(t == n4 - 1u));
    scores[row + t] = e;
    l += (e.x + e.y) + (e.z + e.w);
  }
  part[k] = l;
  workgroupBarrier();
  if (k == 0u) { sums[wid.x] = (part[0] + part[1]) + (part[2] + part[3]); }
}
