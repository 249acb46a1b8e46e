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

from server.rope import rope_tables, rotate, unrotate

BASES = ("raw", "pca", "svd")  # index = the basis code stored per block


@dataclass(frozen=True)
class CodecParams:
    sink: int = 4  # exact tokens at the start of the conversation
    recent: int = 32  # exact newest tokens of each segment
    key_step: float = 0.25  # quantization step for keys, relative to the block's whitened RMS
    value_step: float = 0.25
    max_rank: int = 1 << 16
    bases: tuple[str, ...] = BASES

    def to_meta(self) -> dict:
        d = asdict(self)
        d["bases"] = list(self.bases)
        return d

    @classmethod
    def from_meta(cls, d: dict) -> "CodecParams":
        return cls(**{**d, "bases": tuple(d["bases"])})


PRESETS: dict[str, CodecParams] = {
    "default": CodecParams(),
    "fine": CodecParams(key_step=0.15, value_step=0.15),
    "coarse": CodecParams(key_step=0.4, value_step=0.4),
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


def _code_bits(codes: torch.Tensor) -> float:
    """Estimated entropy-coded size in bits of codes [r, M] (empirical entropy per component)."""
    if codes.numel() == 0:
        return 0.0
    r, m = codes.shape
    idx = (codes.long() + 128) + 256 * torch.arange(r)[:, None]
    counts = torch.bincount(idx.flatten(), minlength=256 * r).view(r, 256).double()
    p = counts / m
    return float(-(counts * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum())


def _quantize(c: torch.Tensor, step: float, max_rank: int) -> torch.Tensor:
    """int8 codes [r, M] of coefficients c [M, Dh], trailing all-zero components dropped."""
    q = torch.clamp(torch.round(c / step), -127, 127).to(torch.int8).T[:max_rank]
    nonzero = (q != 0).any(dim=1).nonzero()
    r = int(nonzero[-1]) + 1 if len(nonzero) else 0
    return q[:r]


def encode_block(xw: torch.Tensor, rel_step: float, pca: torch.Tensor,
                 p: CodecParams) -> tuple[int, float, torch.Tensor, torch.Tensor | None]:
    """Code one whitened middle block xw [M, Dh]: (basis code, step, codes [r, M], svd vt [r, Dh])."""
    # An orthonormal basis never yields a coefficient above the row's norm, so this step
    # keeps every code inside int8 whatever basis wins.
    step = max(rel_step * float(xw.pow(2).mean().sqrt()), float(xw.norm(dim=1).max()) / 127) or 1.0
    best = None
    for name in p.bases:
        vt, extra_bits = None, 0.0
        if name == "raw":
            codes = _quantize(xw, step, p.max_rank)
        elif name == "pca":
            codes = _quantize(xw @ pca, step, p.max_rank)
        else:
            vt = torch.linalg.svd(xw, full_matrices=False)[2].half().float()  # [Dh, Dh], as stored
            codes = _quantize(xw @ vt.T, step, p.max_rank)
            vt = vt[:codes.shape[0]]
            extra_bits = 16.0 * vt.numel()
        bits = _code_bits(codes) + extra_bits
        if best is None or bits < best[0]:
            best = (bits, BASES.index(name), codes, vt)
    _, code, codes, vt = best
    return code, step, codes, vt


def _reconstruct(code: int, step: float, codes: torch.Tensor, pca: torch.Tensor,
                 svd_vt: torch.Tensor | None) -> torch.Tensor:
    """Whitened middle block [M, Dh] from its codes [r, M]."""
    c = codes.float().T * step  # [M, r]
    r = c.shape[1]
    if BASES[code] == "raw":
        return torch.nn.functional.pad(c, (0, pca.shape[0] - r))
    if BASES[code] == "pca":
        return c @ pca[:, :r].T
    return c @ svd_vt


def encode(x: torch.Tensor, start: int, is_key: bool, basis: Basis, inv_freq: torch.Tensor,
           p: CodecParams) -> Encoded:
    """Compress x [L, G, T, Dh] (keys post-RoPE, or values) for positions start..start+T-1."""
    L, G, T, Dh = x.shape
    s, t = split(start, T, p)
    mid = x[:, :, s:T - t]
    if is_key:
        cos, sin = rope_tables(torch.arange(start + s, start + T - t), inv_freq)
        mid = unrotate(mid, cos, sin)
    xw = (mid - basis.mean[:, :, None]) @ basis.whiten  # [L, G, M, Dh]
    codes, vts = [], []
    ranks, steps = np.zeros((L, G), np.uint16), np.zeros((L, G), np.float32)
    kinds = np.zeros((L, G), np.uint8)
    rel = p.key_step if is_key else p.value_step
    for layer in range(L):
        for g in range(G):
            if xw.shape[2] == 0:
                continue
            code, step, c, vt = encode_block(xw[layer, g], rel, basis.pca[layer, g], p)
            codes.append(c.flatten())
            ranks[layer, g], steps[layer, g], kinds[layer, g] = c.shape[0], step, code
            if vt is not None:
                vts.append(vt)
    return Encoded(head=x[:, :, :s].half().numpy(), tail=x[:, :, T - t:].half().numpy(),
                   codes=(torch.cat(codes) if codes else torch.zeros(0, dtype=torch.int8)).numpy(),
                   rank=ranks, step=steps, basis=kinds,
                   svd_vt=(torch.cat(vts) if vts else torch.zeros(0, Dh)).half().numpy())


def decode(e: Encoded, start: int, T: int, is_key: bool, basis: Basis, inv_freq: torch.Tensor,
           p: CodecParams) -> torch.Tensor:
    """Rebuild x [L, G, T, Dh] (keys post-RoPE at their true positions, or values)."""
    L, G = e.rank.shape
    Dh = basis.mean.shape[-1]
    s, t = split(start, T, p)
    m = T - s - t
    xw = torch.zeros(L, G, m, Dh)
    f32 = lambda a: torch.from_numpy(np.array(a)).float()  # noqa: E731  (copy: loaded arrays are read-only)
    codes, svd_vt = torch.from_numpy(np.array(e.codes)), f32(e.svd_vt)
    off = svd_row = 0
    for layer in range(L):
        for g in range(G):
            if m == 0:
                continue
            r, code = int(e.rank[layer, g]), int(e.basis[layer, g])
            block = codes[off:off + r * m].view(r, m)
            off += r * m
            vt = None
            if BASES[code] == "svd":
                vt, svd_row = svd_vt[svd_row:svd_row + r], svd_row + r
            xw[layer, g] = _reconstruct(code, float(e.step[layer, g]), block, basis.pca[layer, g], vt)
    mid = xw @ basis.unwhiten + basis.mean[:, :, None]
    if is_key:
        cos, sin = rope_tables(torch.arange(start + s, start + T - t), inv_freq)
        mid = rotate(mid, cos, sin)
    return torch.cat([f32(e.head), mid, f32(e.tail)], dim=2)
