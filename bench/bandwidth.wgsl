// Streaming-bandwidth probe for bench/resonator.py: the memory rate a plain WGSL kernel gets
// on the adapter, to bound the decode step (bytes of weights per token / best rate).
//
// Two entry points, each with its own bindings (a pipeline per entry, layout 'auto'):
//
//   copy   dst[i] = src[i] over array<vec4<f32>>.
//          @workgroup_size(256, 1, 1); ONE invocation per vec4 (16 bytes), no loop:
//          dispatch ceil(n / 256) workgroups along x (n = vec4 count; the bench keeps it
//          under 65,535 * 256). Traffic per dispatch = 2 * bytes (read + write, as STREAM's copy).
//
//   gemv   y[r] = dot(W[r, :], x) with W [rows, 4 * K4] f32 row-major, x [4 * K4] f32.
//          @workgroup_size(64, 1, 1); ONE invocation per output row, which walks its row in
//          vec4 steps (the naive GEMV of /work/shared/peers/web/gpu_probe.html): dispatch
//          ceil(rows / 64) workgroups along x. Traffic per dispatch = W + x + y bytes.
//
// No shared memory, no subgroups, f32 only: what any WebGPU adapter runs.

// ---- copy ------------------------------------------------------------------------------------

@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(256, 1, 1)
fn copy(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.x;
  if (i < arrayLength(&dst)) {
    dst[i] = src[i];
  }
}

// ---- gemv ------------------------------------------------------------------------------------

override K4: u32 = 144u;  // columns / 4 (576 / 4 for SmolLM2's hidden size)

@group(0) @binding(2) var<storage, read> W: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn gemv(@builtin(global_invocation_id) gid: vec3<u32>) {
  let r = gid.x;
  if (r >= arrayLength(&y)) {
    return;
  }
  let base = r * K4;
  var acc = 0.0;
  for (var k = 0u; k < K4; k++) {
    acc += dot(W[base + k], x[k]);
  }
  y[r] = acc;
}
