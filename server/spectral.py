"""The spectral KV codec: compress one model's K/V for a span of positions, and rebuild it.

Per layer and KV head, a segment of T tokens splits into
  head   the attention-sink tokens (positions < sink), kept exact (fp16, post-RoPE);
  tail   the `recent` newest tokens, kept exact;
  middle the rest, coded in a spectral basis.
Keys in the middle are un-rotated to pre-RoPE first, so tokens at different positions
share one basis (RoPE spins each pair of dimensions at its own rate and would smear any
fixed basis). Each middle block X [M, Dh] is centred, projected on an orthonormal basis
B [Dh, Dh] whose columns are ordered by energy, and the coefficients are quantized with
one uniform step for the whole block. With entropy coding (DEFLATE over the int8 codes)
a common step is close to the rate-distortion optimum for Gaussian sources (reverse
water-filling): low-energy components round to zero and cost almost nothing, so the
retained rank falls out of the spectrum instead of being fixed. Trailing all-zero
components are dropped; that count is the block's rank (capped by `max_rank`).

Three bases compete per block and the smallest estimated size wins (same step, so about
the same error):
  pca  calibrated once per model (server/pack.py) and shipped in the model pack, so the
       hologram carries only coefficients;
  svd  the block's own truncated SVD; its factors (mean + rank x Dh) travel as fp16;
  raw  the identity: plain quantized rows, for blocks no basis helps.
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
    key_step: float = 0.25  # quantization step for keys, relative to the block's RMS deviation
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
    """Calibrated bases of one kind (keys or values): mean [L, G, Dh], basis [L, G, Dh, Dh]."""
    mean: torch.Tensor
    basis: torch.Tensor  # columns are components, by decreasing calibration variance


def calibrate(x: torch.Tensor) -> Basis:
    """PCA per layer and head of calibration vectors x [L, G, N, Dh] (keys pre-RoPE)."""
    x = x.double()
    mean = x.mean(dim=2)  # [L, G, Dh]
    xc = x - mean[:, :, None]
    cov = xc.transpose(-1, -2) @ xc / x.shape[2]  # [L, G, Dh, Dh]
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    return Basis(mean.float(), evecs.flip(-1).float())


@dataclass
class Encoded:
    """One kind (keys or values) of one segment, as stored in the hologram."""
    head: np.ndarray  # f16 [L, G, s, Dh] post-RoPE
    tail: np.ndarray  # f16 [L, G, t, Dh]
    codes: np.ndarray  # i8 [sum of rank * M], block after block, each [rank, M]
    rank: np.ndarray  # u16 [L, G]
    step: np.ndarray  # f32 [L, G]
    basis: np.ndarray  # u8 [L, G], index into BASES
    svd_mean: np.ndarray  # f16 [n_svd_blocks, Dh]
    svd_vt: np.ndarray  # f16 [sum of rank over svd blocks, Dh]


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


def encode_block(x: torch.Tensor, rel_step: float, pca_mean: torch.Tensor, pca_basis: torch.Tensor,
                 p: CodecParams) -> tuple[int, float, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Code one middle block x [M, Dh]: (basis code, step, codes [r, M], svd mean, svd vt)."""
    dh = x.shape[1]
    dev = x - x.mean(0)
    step = rel_step * float(dev.pow(2).mean().sqrt()) or 1.0
    best = None
    for name in p.bases:
        extra_bits = 0.0
        mean, vt = None, None
        if name == "raw":
            codes = _quantize(x - pca_mean, step, p.max_rank)
        elif name == "pca":
            codes = _quantize((x - pca_mean) @ pca_basis, step, p.max_rank)
        else:
            mean = x.mean(0).half().float()
            _, _, vt_full = torch.linalg.svd(x - mean, full_matrices=False)  # [Dh, Dh]
            codes = _quantize((x - mean) @ vt_full.half().float().T, step, p.max_rank)
            vt = vt_full[:codes.shape[0]]
            extra_bits = 16.0 * dh * (1 + codes.shape[0])
        bits = _code_bits(codes) + extra_bits
        if best is None or bits < best[0]:
            best = (bits, BASES.index(name), codes, mean, vt)
    _, code, codes, mean, vt = best
    return code, step, codes, mean, vt


def _reconstruct(code: int, step: float, codes: torch.Tensor, pca_mean: torch.Tensor,
                 pca_basis: torch.Tensor, svd_mean: torch.Tensor | None, svd_vt: torch.Tensor | None) -> torch.Tensor:
    """Middle block [M, Dh] from its codes [r, M]."""
    c = codes.float().T * step  # [M, r]
    r = c.shape[1]
    if BASES[code] == "raw":
        dh = pca_mean.shape[0]
        return torch.nn.functional.pad(c, (0, dh - r)) + pca_mean
    if BASES[code] == "pca":
        return c @ pca_basis[:, :r].T + pca_mean
    return c @ svd_vt + svd_mean


def encode(x: torch.Tensor, start: int, is_key: bool, basis: Basis, inv_freq: torch.Tensor,
           p: CodecParams) -> Encoded:
    """Compress x [L, G, T, Dh] (keys post-RoPE, or values) for positions start..start+T-1."""
    L, G, T, Dh = x.shape
    s, t = split(start, T, p)
    mid = x[:, :, s:T - t]
    if is_key:
        cos, sin = rope_tables(torch.arange(start + s, start + T - t), inv_freq)
        mid = unrotate(mid, cos, sin)
    codes, ranks, steps, kinds, svd_means, svd_vts = [], np.zeros((L, G), np.uint16), \
        np.zeros((L, G), np.float32), np.zeros((L, G), np.uint8), [], []
    rel = p.key_step if is_key else p.value_step
    for layer in range(L):
        for g in range(G):
            if mid.shape[2] == 0:
                continue
            code, step, c, mean, vt = encode_block(mid[layer, g], rel, basis.mean[layer, g],
                                                   basis.basis[layer, g], p)
            codes.append(c.flatten())
            ranks[layer, g], steps[layer, g], kinds[layer, g] = c.shape[0], step, code
            if mean is not None:
                svd_means.append(mean)
                svd_vts.append(vt)
    f16 = lambda ts, w: (torch.cat(ts) if ts else torch.zeros(0, w)).half().numpy()  # noqa: E731
    return Encoded(head=x[:, :, :s].half().numpy(), tail=x[:, :, T - t:].half().numpy(),
                   codes=(torch.cat(codes) if codes else torch.zeros(0, dtype=torch.int8)).numpy(),
                   rank=ranks, step=steps, basis=kinds,
                   svd_mean=f16([m[None] for m in svd_means], Dh), svd_vt=f16(svd_vts, Dh))


def decode(e: Encoded, start: int, T: int, is_key: bool, basis: Basis, inv_freq: torch.Tensor,
           p: CodecParams) -> torch.Tensor:
    """Rebuild x [L, G, T, Dh] (keys post-RoPE at their true positions, or values)."""
    L, G = e.rank.shape
    Dh = basis.mean.shape[-1]
    s, t = split(start, T, p)
    m = T - s - t
    mid = torch.zeros(L, G, m, Dh)
    t = lambda a: torch.from_numpy(np.array(a)).float()  # noqa: E731  (copy: loaded arrays are read-only)
    codes = torch.from_numpy(np.array(e.codes))
    svd_mean, svd_vt = t(e.svd_mean), t(e.svd_vt)
    off = n_svd = svd_row = 0
    for layer in range(L):
        for g in range(G):
            if m == 0:
                continue
            r = int(e.rank[layer, g])
            block = codes[off:off + r * m].view(r, m)
            off += r * m
            code = int(e.basis[layer, g])
            mean = vt = None
            if BASES[code] == "svd":
                mean, vt = svd_mean[n_svd], svd_vt[svd_row:svd_row + r]
                n_svd, svd_row = n_svd + 1, svd_row + r
            mid[layer, g] = _reconstruct(code, float(e.step[layer, g]), block, basis.mean[layer, g],
                                         basis.basis[layer, g], mean, vt)
    if is_key:
        cos, sin = rope_tables(torch.arange(start + s, start + T - t), inv_freq)
        mid = rotate(mid, cos, sin)
    return torch.cat([t(e.head), mid, t(e.tail)], dim=2)
