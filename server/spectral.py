"""The spectral KV codec: compress one model's K/V for a span of positions, and rebuild it.

Per layer and KV head, a segment of T tokens splits into
  head   the attention-sink tokens (positions < sink), kept exact (fp16, post-RoPE);
  tail   the `recent` newest tokens, kept exact;
  middle the rest, coded in a spectral basis.
Keys in the middle are un-rotated to pre-RoPE first, so tokens at different positions
share one basis (RoPE spins each pair of dimensions at its own rate and would smear any
fixed basis).

Errors are measured where they matter, not in raw K/V units: a key error e moves the
attention logits by q.e, a value error moves the head's output by W_o.e. Calibration
(server/pack.py) gives per layer and head a metric M (E[q q^T] for keys, W_o^T W_o for
values) and the codec works in the whitened space x_w = (x - mean) @ M^(1/2), where plain
squared error is the error that reaches the model. There each middle block [M, Dh] is
projected on an orthonormal basis ordered by energy and the coefficients are quantized
with one uniform step for the block. With entropy coding (DEFLATE over the int8 codes) a
common step is close to the rate-distortion optimum for Gaussian sources (reverse
water-filling): low-energy components round to zero and cost almost nothing, so the
retained rank falls out of the spectrum instead of being fixed. Trailing all-zero
components are dropped; that count is the block's rank (capped by `max_rank`).

Three bases compete per block and the smallest estimated size wins (same step, so about
the same error):
  pca  calibrated once per model and shipped in the model pack, so the hologram carries
       only coefficients;
  svd  the block's own truncated SVD; its factors (mean + rank x Dh) travel as fp16;
  raw  the identity: plain quantized (whitened) rows, for blocks no basis helps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from hpi.rope import rope_tables, rotate, unrotate

BASES = ("raw", "pca", "svd")  # index = the basis code stored per block


@dataclass(frozen=True)
class CodecParams:
    sink: int = 4  # exact tokens at the start of the conversation
    recent: int = 16  # exact newest tokens of each segment
    key_step: float = 0.25  # quantization step for keys, relative to the block's whitened RMS
    value_step: float = 0.25
    max_rank: int = 1 << 16
    # "svd" never beat "pca" on SmolLM2 and costs a batched SVD per segment; it stays
    # available for models the calibration fits less well.
    bases: tuple[str, ...] = ("raw", "pca")

    def to_meta(self) -> dict:
        d = asdict(self)
        d["bases"] = list(self.bases)
        return d

    @classmethod
    def from_meta(cls, d: dict) -> "CodecParams":
        return cls(**{**d, "bases": tuple(d["bases"])})


# The default is the setting with the best mean agreement on the benchmark's dev texts
# among those at least 4x smaller than fp16 (bench/fidelity.py, docs/fidelity.md).
PRESETS: dict[str, CodecParams] = {
    "default": CodecParams(),
    "fine": CodecParams(recent=32, key_step=0.15, value_step=0.075),
    "coarse": CodecParams(recent=0, key_step=0.5, value_step=0.25),
}


@dataclass
class Basis:
    """Calibration of one kind (keys or values), per layer and KV head."""
    mean: torch.Tensor  # [L, G, Dh]
    whiten: torch.Tensor  # [L, G, Dh, Dh]  M^(1/2)
    unwhiten: torch.Tensor  # [L, G, Dh, Dh]  its inverse
    pca: torch.Tensor  # [L, G, Dh, Dh]  columns: whitened components by decreasing variance


def calibrate(x: torch.Tensor, metric: torch.Tensor | None = None, floor: float = 0.05) -> Basis:
    """Bases from calibration vectors x [L, G, N, Dh] (keys pre-RoPE) and a metric [L, G, Dh, Dh].

    The metric's eigenvalues are floored at `floor` times their mean: it is an average
    over calibration text, and a direction it calls unread must not get errors amplified
    without bound when some query does read it.
    """
    x = x.double()
    L, G, _, Dh = x.shape
    if metric is None:
        metric = torch.eye(Dh, dtype=torch.float64).expand(L, G, Dh, Dh)
    m = metric.double()
    m = m / (m.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None])  # scale is irrelevant
    ev, U = torch.linalg.eigh(m)
    ev = ev.clamp_min(floor)
    whiten = U @ torch.diag_embed(ev.sqrt()) @ U.transpose(-1, -2)
    unwhiten = U @ torch.diag_embed(ev.rsqrt()) @ U.transpose(-1, -2)
    mean = x.mean(dim=2)  # [L, G, Dh]
    xw = (x - mean[:, :, None]) @ whiten
    cov = xw.transpose(-1, -2) @ xw / x.shape[2]  # [L, G, Dh, Dh]
    _, evecs = torch.linalg.eigh(cov)  # ascending
    return Basis(mean.float(), whiten.float(), unwhiten.float(), evecs.flip(-1).float())


@dataclass
class Encoded:
    """One kind (keys or values) of one segment, as stored in the hologram."""
    head: np.ndarray  # f16 [L, G, s, Dh] post-RoPE
    tail: np.ndarray  # f16 [L, G, t, Dh]
    codes: np.ndarray  # i8 [sum of rank * M], block after block, each [rank, M]
    rank: np.ndarray  # u16 [L, G]
    step: np.ndarray  # f32 [L, G]
    basis: np.ndarray  # u8 [L, G], index into BASES
    svd_vt: np.ndarray  # f16 [sum of rank over svd blocks, Dh]  (whitened space)


def split(start: int, T: int, p: CodecParams) -> tuple[int, int]:
    """(s, t): exact head and tail lengths of a segment of T tokens starting at `start`."""
    s = min(max(p.sink - start, 0), T)
    return s, min(p.recent, T - s)


def _quantize(coef: torch.Tensor, step: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [B, Dh, M] of coefficients [B, M, Dh], and each block's rank [B].

    The rank is one past the last component with a nonzero code (capped by max_rank).
    """
    q = torch.clamp(torch.round(coef / step[:, None, None]), -127, 127).to(torch.int8).transpose(1, 2)
    dh = q.shape[1]
    nonzero = (q != 0).any(dim=2)  # [B, Dh]
    last = dh - torch.flip(nonzero, dims=[1]).to(torch.int8).argmax(dim=1)
    rank = torch.where(nonzero.any(dim=1), last, torch.zeros_like(last)).clamp(max=max_rank)
    return q, rank


def _code_bits(q: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Estimated entropy-coded bits per block [B] of codes [B, Dh, M] up to each block's rank.

    Per component, the entropy of a quantized Gaussian of the codes' variance (in steps^2):
    only the ranking of candidate bases depends on it, and it costs one pass over the codes.
    """
    B, dh, m = q.shape
    sample = q[:, :, ::4]  # every 4th token estimates the variance well enough to rank bases
    var = sample.float().var(dim=2, correction=0) if m else torch.zeros(B, dh)
    bits = 0.5 * torch.log2(2 * torch.pi * torch.e * (var + 1 / 12)) * m  # [B, Dh]
    return (bits * (torch.arange(dh)[None] < rank[:, None])).sum(-1)


def encode(x: torch.Tensor, start: int, is_key: bool, basis: Basis, inv_freq: torch.Tensor,
           p: CodecParams) -> Encoded:
    """Compress x [L, G, T, Dh] (keys post-RoPE, or values) for positions start..start+T-1.

    All L*G blocks are coded at once; per block, the basis with the fewest estimated bits
    wins (the step is shared, so the error is about the same whichever wins).
    """
    L, G, T, Dh = x.shape
    s, t = split(start, T, p)
    mid = x[:, :, s:T - t]
    if is_key:
        cos, sin = rope_tables(torch.arange(start + s, start + T - t), inv_freq)
        mid = unrotate(mid, cos, sin)
    B, M = L * G, mid.shape[2]
    xw = ((mid - basis.mean[:, :, None]) @ basis.whiten).reshape(B, M, Dh)
    rel = p.key_step if is_key else p.value_step
    # An orthonormal basis never yields a coefficient above the row's norm, so this step
    # keeps every code inside int8 whatever basis wins.
    floor = xw.norm(dim=2).amax(dim=1) / 127 if M else torch.zeros(B)
    step = torch.maximum(rel * xw.pow(2).mean(dim=(1, 2)).sqrt(), floor)
    step = torch.where(step > 0, step, torch.ones_like(step))
    candidates = {}  # basis code -> (codes, rank, svd rows or None)
    for name in p.bases if M else ("raw",):  # an empty middle has nothing to choose
        vt = None
        if name == "raw":
            coef = xw
        elif name == "pca":
            coef = xw @ basis.pca.reshape(B, Dh, Dh)
        else:
            vt = torch.linalg.svd(xw, full_matrices=True)[2].half().float()  # [B, Dh, Dh] even if M < Dh
            coef = xw @ vt.transpose(1, 2)
        q, rank = _quantize(coef, step, p.max_rank)
        candidates[BASES.index(name)] = (q, rank, vt)
    order = sorted(candidates)
    if len(order) > 1:
        bits = [_code_bits(q, rank) + (16.0 * Dh * rank if BASES[c] == "svd" else 0.0)
                for c, (q, rank, _) in ((c, candidates[c]) for c in order)]
        choice = torch.stack(bits).argmin(dim=0)  # [B] index into order
    else:
        choice = torch.zeros(B, dtype=torch.long)
    codes, rank, _ = candidates[order[0]]
    for i, c in enumerate(order[1:], start=1):
        sel = choice == i
        codes = torch.where(sel[:, None, None], candidates[c][0], codes)
        rank = torch.where(sel, candidates[c][1], rank)
    kinds = torch.tensor(order)[choice]
    svd_rows = [candidates[BASES.index("svd")][2][b, :rank[b]]
                for b in (kinds == BASES.index("svd")).nonzero().flatten().tolist()]
    flat = [codes[b, :r].reshape(-1) for b, r in enumerate(rank.tolist())]  # each block [rank, M]
    return Encoded(head=x[:, :, :s].half().numpy(), tail=x[:, :, T - t:].half().numpy(),
                   codes=(torch.cat(flat) if flat else torch.zeros(0, dtype=torch.int8)).numpy(),
                   rank=rank.view(L, G).numpy().astype(np.uint16), step=step.view(L, G).numpy().astype(np.float32),
                   basis=kinds.view(L, G).numpy().astype(np.uint8),
                   svd_vt=(torch.cat(svd_rows) if svd_rows else torch.zeros(0, Dh)).half().numpy())


def decode(e: Encoded, start: int, T: int, is_key: bool, basis: Basis, inv_freq: torch.Tensor,
           p: CodecParams) -> torch.Tensor:
    """Rebuild x [L, G, T, Dh] (keys post-RoPE at their true positions, or values)."""
    L, G = e.rank.shape
    B, Dh = L * G, basis.mean.shape[-1]
    s, t = split(start, T, p)
    m = T - s - t
    f32 = lambda a: torch.from_numpy(np.array(a)).float()  # noqa: E731  (copy: loaded arrays are read-only)
    rank = torch.from_numpy(e.rank.astype(np.int64)).flatten()
    kinds = torch.from_numpy(e.basis.astype(np.int64)).flatten()
    # every block's codes zero-padded to Dh components, and its basis as Dh rows
    keep = (torch.arange(Dh)[None, :, None] < rank[:, None, None]).expand(B, Dh, m)
    codes = torch.zeros(B, Dh, m)
    codes[keep] = f32(e.codes)
    rows = torch.eye(Dh).repeat(B, 1, 1)  # raw
    pca = basis.pca.reshape(B, Dh, Dh).transpose(1, 2)
    rows[kinds == BASES.index("pca")] = pca[kinds == BASES.index("pca")]
    svd_vt, at = f32(e.svd_vt), 0
    for b in (kinds == BASES.index("svd")).nonzero().flatten().tolist():
        r = int(rank[b])
        rows[b] = 0
        rows[b, :r] = svd_vt[at:at + r]
        at += r
    xw = (codes.transpose(1, 2) * f32(e.step).reshape(B, 1, 1)) @ rows  # [B, M, Dh]
    mid = xw.reshape(L, G, m, Dh) @ basis.unwhiten + basis.mean[:, :, None]
    if is_key:
        cos, sin = rope_tables(torch.arange(start + s, start + T - t), inv_freq)
        mid = rotate(mid, cos, sin)
    return torch.cat([f32(e.head), mid, f32(e.tail)], dim=2)
