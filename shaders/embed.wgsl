// x = embedding row of the token to feed (state.token), dequantized. Needs a weight scheme
// prepended. The embedding may be split into row chunks (buffer size limits): each chunk's
// dispatch writes only if the token falls in its rows.
// Python reference: server/llama.py forward() (`w.embed[ids]`), server/pack.py dequantize().
//
// Workgroup: 64 invocations, each writes every 64th element of x. Dispatch: 1 workgroup.

override C: u32;  // model dim

struct Chunk { row0: u32, rows: u32 }

@group(0) @binding(3) var<storage, read> state: State;
@group(0) @binding(4) var<uniform> chunk: Chunk;
@group(0) @binding(5) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32) {
  let t = state.token;
  if (t < chunk.row0 || t >= chunk.row0 + chunk.rows) { return; }
  let blk0 = (t - chunk.row0) * (C / 32u);
  for (var i = lid; i < C; i += 64u) {
    x[i] = weight(blk0 + i / 32u, i % 32u);
  }
}
