// Declarations several kernels share, prepended to every kernel by client_web/resonator.js
// (before the weight scheme, if the kernel takes one), so that each layout is written once.
// The JS side reads every struct's layout from the WGSL (structLayouts in resonator.js) and
// writes fields by name, so a field is placed only here: keep fields 4-byte scalars.

// The decode state, on the GPU so a batch of steps needs no writes between them: the position
// of the token fed, that token, the step of the batch (sample.wgsl's `pick` records the chosen
// token at it and advances pos, token and step), and the sampling seed and temperature.
struct State { pos: u32, token: u32, step: u32, seed: u32, temperature: f32 }

// A coded block of a hologram (one per layer and KV head, layer-major): byte offset of its
// codes, rank, quantization step, basis code (0 raw, 1 pca, 2 svd), first row of its svd basis.
struct Block { codes_at: u32, rank: u32, step: f32, basis: u32, svd_row: u32 }

// A gemv dispatch (gemv.wgsl, gemv_wg.wgsl): the rows it computes (for MODE 2: gate rows; up
// rows follow them), the index in y of its first row, and MODE 2's offset of the up rows in W.
struct GemvParams { rows: u32, y0: u32, up: u32, _pad: u32 }
