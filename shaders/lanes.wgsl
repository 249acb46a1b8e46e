// Reductions across the invocations ("lanes") of a 'gpu'-layout workgroup (gemv_wg.wgsl,
// attn_wg.wgsl), prepended to those kernels by client_web/resonator.js after a `subgroup_xor`
// it writes: subgroupShuffleXor where the device has the `subgroups` feature (and then
// SUBGROUP_MIN is the adapter's smallest subgroup size), else a stub never reached (SUBGROUP_MIN
// stays 1).
//
// A reduction is a butterfly: at step k every lane adds the value of lane lid ^ k, for k from
// the largest bit down. The two addends of a pair are the same two floats on both lanes, so
// every lane of a group ends with the same bits, and those are the bits of the tree gemv_wg.wgsl
// used before (halves first): the subgroup and workgroup-memory exchanges agree exactly, and a
// lane never needs a broadcast of the result. Lanes closer than SUBGROUP_MIN swap by shuffle
// (subgroups are taken to be aligned runs of local_invocation_index, as every implementation
// lays out a one-dimensional workgroup); farther ones through workgroup memory.
// Call these in uniform control flow, with every lane of the workgroup.

const LANES: u32 = 64u;  // invocations of every kernel that reduces across lanes
override SUBGROUP_MIN: u32 = 1u;

// Two halves, used in turn, so that one barrier per exchange suffices: a lane can write the
// half of the next exchange only after all lanes have passed this exchange's barrier, hence
// after they read the other half.
var<workgroup> lanes_xch: array<vec4f, 2 * LANES>;
var<private> lanes_half: u32;

fn lane_xor(v: vec4f, lid: u32, k: u32) -> vec4f {
  if (k < SUBGROUP_MIN) { return subgroup_xor(v, k); }
  let at = lanes_half * LANES;
  lanes_half ^= 1u;
  lanes_xch[at + lid] = v;
  workgroupBarrier();
  return lanes_xch[at + (lid ^ k)];
}

// The sum of v over the lanes whose index differs from lid's only in bits first .. end/2
// (powers of two), at each of them.
fn lanes_sum(v: vec4f, lid: u32, first: u32, end: u32) -> vec4f {
  var s = v;
  for (var k = end / 2u; k >= first; k /= 2u) { s += lane_xor(s, lid, k); }
  return s;
}

// The maximum, likewise.
fn lanes_max(v: vec4f, lid: u32, first: u32, end: u32) -> vec4f {
  var m = v;
  for (var k = end / 2u; k >= first; k /= 2u) { m = max(m, lane_xor(m, lid, k)); }
  return m;
}
