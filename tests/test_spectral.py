"""The spectral codec on synthetic K/V: exact parts stay exact, the rest within its step."""

import numpy as np
import pytest
import torch

from hpi.rope import inv_freq_default, rope_tables, rotate, unrotate
from hpi.spectral import BASES, CodecParams, calibrate, decode, encode, split

L, G, DH = 2, 2, 16
INV_FREQ = inv_freq_default(DH, 10000.0).float()


def low_rank(n, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(L, G, n, rank, generator=g)
    b = torch.randn(L, G, rank, DH, generator=g)
    return a @ b + 0.5  # [L, G, n, DH], off-centre on purpose


def with_rope(x, start):
    cos, sin = rope_tables(torch.arange(start, start + x.shape[2]), INV_FREQ)
    return rotate(x, cos, sin)


def test_rope_unrotate_inverts_rotate():
    x = torch.randn(3, 40, DH)
    cos, sin = rope_tables(torch.arange(100, 140), INV_FREQ)
    assert torch.allclose(unrotate(rotate(x, cos, sin), cos, sin), x, atol=1e-5)


def test_calibration_whitening_is_consistent():
    x = low_rank(300, 6)
    metric = torch.diag_embed(torch.rand(L, G, DH) + 0.1)
    b = calibrate(x, metric)
    eye = torch.eye(DH).expand(L, G, DH, DH)
    assert torch.allclose(b.whiten @ b.unwhiten, eye, atol=1e-4)
    assert torch.allclose(b.pca.transpose(-1, -2) @ b.pca, eye, atol=1e-4)
    # components come out by decreasing energy in the whitened space
    xw = (x - b.mean[:, :, None]) @ b.whiten @ b.pca
    var = xw.var(dim=2)
    assert (var[..., :-1] >= var[..., 1:] - 1e-4).all()


def test_split_keeps_sink_only_at_the_start():
    p = CodecParams(sink=4, recent=8)
    assert split(0, 100, p) == (4, 8)
    assert split(2, 100, p) == (2, 8)
    assert split(50, 100, p) == (0, 8)
    assert split(0, 5, p) == (4, 1)


@pytest.mark.parametrize("start", [0, 37])
@pytest.mark.parametrize("bases", [("pca",), ("svd",), ("raw",), BASES])
def test_roundtrip_error_follows_the_step(start, bases):
    pre = low_rank(200, 5, seed=1)
    basis = calibrate(low_rank(400, 5, seed=2))
    keys = with_rope(pre, start)
    fine, coarse = (CodecParams(sink=4, recent=8, key_step=s, value_step=s, bases=bases) for s in (0.05, 0.3))
    errs = []
    for p in (fine, coarse):
        for x, is_key in ((keys, True), (pre, False)):
            e = encode(x, start, is_key, basis, INV_FREQ, p)
            y = decode(e, start, x.shape[2], is_key, basis, INV_FREQ, p)
            s, t = split(start, x.shape[2], p)
            assert torch.equal(y[:, :, :s], x[:, :, :s].half().float())  # sink: exact fp16
            assert torch.equal(y[:, :, x.shape[2] - t:], x[:, :, x.shape[2] - t:].half().float())
            errs.append(float((y - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt()))
    assert max(errs[:2]) < 0.04  # fine step: nearly lossless
    assert max(errs[2:]) < 0.25
    assert min(errs[2:]) > max(errs[:2])


def test_rank_follows_the_spectrum():
    x = low_rank(300, 3, seed=3)
    basis = calibrate(x)
    e = encode(x, 0, False, basis, INV_FREQ, CodecParams(sink=0, recent=0, value_step=0.05, bases=("pca",)))
    assert (e.rank <= 4).all() and (e.rank >= 3).all()
    e = encode(x, 0, False, basis, INV_FREQ, CodecParams(sink=0, recent=0, value_step=0.05, bases=("pca",),
                                                          max_rank=2))
    assert (e.rank == 2).all()


def test_smallest_basis_wins():
    # data the calibration never saw: a block-specific SVD or raw rows must beat the stale PCA
    basis = calibrate(low_rank(400, 5, seed=4))
    x = torch.zeros(L, G, 300, DH)
    x[..., 3] = torch.randn(L, G, 300)  # one live channel: raw rows code it in one component
    e = encode(x, 0, False, basis, INV_FREQ, CodecParams(sink=0, recent=0, value_step=0.1))
    assert {BASES[c] for c in e.basis.flatten()} <= {"raw", "svd"}
    y = decode(e, 0, 300, False, basis, INV_FREQ, CodecParams(sink=0, recent=0, value_step=0.1))
    assert float((y - x).abs().max()) < 0.1 * float(x.abs().max())


def test_empty_middle_and_empty_segment():
    basis = calibrate(low_rank(100, 4))
    p = CodecParams(sink=4, recent=32)
    for T in (0, 3, 30):
        x = low_rank(T, 4) if T else torch.zeros(L, G, 0, DH)
        e = encode(x, 0, True, basis, INV_FREQ, p)
        assert e.codes.size == 0
        y = decode(e, 0, T, True, basis, INV_FREQ, p)
        assert y.shape == x.shape and torch.equal(y, x.half().float())
    assert np.all(encode(low_rank(3, 2), 10, False, basis, INV_FREQ, p).rank == 0)


@pytest.mark.parametrize("bases", [("svd",), BASES])
def test_middle_shorter_than_head_dim(bases):
    x = low_rank(DH - 3, 2, seed=5)
    basis = calibrate(low_rank(100, 4))
    p = CodecParams(sink=0, recent=0, value_step=0.05, bases=bases)
    y = decode(encode(x, 0, False, basis, INV_FREQ, p), 0, x.shape[2], False, basis, INV_FREQ, p)
    assert float((y - x).pow(2).mean().sqrt()) < 0.05 * float(x.pow(2).mean().sqrt())
