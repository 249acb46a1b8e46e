"""The benchmarks' own parts, no model: the KV compression baselines (bench/baselines.py),
the corpus loader (bench/corpus.py) and the fidelity metrics (bench/fidelity.py)."""

import json
import math

import pytest
import torch

from bench import baselines as bl
from bench import corpus

L, G, T, Dh = 2, 3, 100, 64
S, R = bl.SINK, bl.RECENT
M = T - S - R  # middle tokens


@pytest.fixture
def kv():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(L, G, T, Dh, generator=g) * 2 + torch.linspace(-3, 3, Dh)  # channel offsets, like keys
    values = torch.randn(L, G, T, Dh, generator=g)
    return keys, values


def _ends_exact(x, x_hat):
    f16 = x.half().float()
    assert torch.equal(x_hat[:, :, :S], f16[:, :, :S])
    assert torch.equal(x_hat[:, :, T - R:], f16[:, :, T - R:])


def test_fp16(kv):
    k, v = kv
    kh, vh, keep, n = bl.fp16(k, v)
    assert keep is None and kh.shape == k.shape and vh.shape == v.shape
    assert n == 2 * 2 * L * G * T * Dh
    assert torch.equal(kh, k.half().float())


def test_int8_bytes_and_error(kv):
    k, v = kv
    kh, vh, keep, n = bl.int8(k, v)
    assert keep is None and kh.shape == k.shape
    exact = 2 * 2 * L * G * (S + R) * Dh
    assert n == exact + 2 * L * G * (M * Dh + 2 * M)  # K and V: int8 codes + fp16 scale per token
    for x, xh in ((k, kh), (v, vh)):
        _ends_exact(x, xh)
        mid, mid_h = x[:, :, S:T - R], xh[:, :, S:T - R]
        bound = mid.abs().amax(-1, keepdim=True) / 127 * 0.5 * 1.01 + 1e-6  # half a step (fp16 scale)
        assert ((mid - mid_h).abs() <= bound).all()


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_bytes_and_error(kv, bits):
    k, v = kv
    kh, vh, keep, n = bl.kivi(k, v, bits)
    assert keep is None and kh.shape == k.shape and vh.shape == v.shape
    exact = 2 * 2 * L * G * (S + R) * Dh
    key_groups = math.ceil(M / 32) * Dh  # per channel, groups of 32 tokens
    value_groups = M * math.ceil(Dh / 32)  # per token, groups of 32 channels
    codes = math.ceil(M * Dh * bits / 8)
    assert n == exact + L * G * (2 * codes + 4 * (key_groups + value_groups))
    levels = (1 << bits) - 1
    for x, xh, per_channel in ((k, kh, True), (v, vh, False)):
        _ends_exact(x, xh)
        mid, mid_h = x[:, :, S:T - R], xh[:, :, S:T - R]
        err = (mid - mid_h).abs()
        if per_channel:  # step = group range / levels, per channel per token group
            for a in range(0, M, 32):
                blk = mid[:, :, a:a + 32]
                step = (blk.amax(2, keepdim=True) - blk.amin(2, keepdim=True)) / levels
                assert (err[:, :, a:a + 32] <= step * 0.5 * 1.01 + 2e-3).all()
        else:
            for a in range(0, Dh, 32):
                blk = mid[..., a:a + 32]
                step = (blk.amax(-1, keepdim=True) - blk.amin(-1, keepdim=True)) / levels
                assert (err[..., a:a + 32] <= step * 0.5 * 1.01 + 2e-3).all()


def test_kivi4_better_than_kivi2(kv):
    k, v = kv
    k4, v4, _, n4 = bl.kivi(k, v, 4)
    k2, v2, _, n2 = bl.kivi(k, v, 2)
    assert n2 < n4
    for x, a, b in ((k, k4, k2), (v, v4, v2)):
        assert (x - a).pow(2).mean() < (x - b).pow(2).mean() / 4


def test_packed_bytes():
    assert bl.packed_bytes(7, 2) == 2 and bl.packed_bytes(8, 4) == 4 and bl.packed_bytes(3, 4) == 2


@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_h2o_keeps_sink_recent_and_fraction(fraction):
    T = 200  # so that a quarter is more than sink + recent
    M = T - S - R
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(L, G, T, Dh, generator=g), torch.randn(L, G, T, Dh, generator=g)
    scores = torch.rand(L, G, T, generator=g)
    scores[0, 0, 50] = 100.0  # a heavy hitter must survive
    kh, vh, keep, n = bl.h2o(k, v, scores, fraction)
    assert keep.shape == (L, G, T) and keep.dtype == torch.bool
    assert keep[:, :, :S].all() and keep[:, :, T - R:].all()
    assert keep[0, 0, 50]
    assert (keep.sum(-1) == round(fraction * T)).all()
    # the kept middle tokens are the top scorers of the middle
    mid_keep, mid_scores = keep[..., S:T - R], scores[..., S:T - R]
    for layer in range(L):
        for g in range(G):
            kept, dropped = mid_scores[layer, g][mid_keep[layer, g]], mid_scores[layer, g][~mid_keep[layer, g]]
            assert kept.min() >= dropped.max()
    n_kept = round(fraction * T)
    assert n == L * G * (2 * 2 * n_kept * Dh + bl.index_bytes(M, n_kept - S - R))
    assert torch.equal(kh[keep], k.half().float()[keep]) and (kh[~keep] == 0).all()


def test_h2o_budget_never_below_sink_and_recent(kv):
    k, v = kv
    keep = bl.h2o_keep(torch.rand(L, G, T), 0.1)
    assert (keep.sum(-1) == S + R).all()


def test_short_segment_is_all_exact():
    k = torch.randn(1, 1, 20, 8)
    for fn in (lambda: bl.int8(k, k), lambda: bl.kivi(k, k, 2)):
        kh, vh, _, n = fn()
        assert torch.equal(kh, k.half().float()) and n == 2 * 2 * 20 * 8


def _write_list(tmp_path, entries):
    p = tmp_path / "corpus.json"
    p.write_text(json.dumps({"texts": entries}))
    return p


def test_corpus_loader_verifies_hashes(tmp_path):
    src = tmp_path / "doc.txt"
    src.write_text("Some real text.\n")
    good = {"id": "doc", "split": "dev", "kind": "file", "root": "/", "path": str(src),
            "sha256": corpus.sha256("Some real text.\n"), "source": "a test file"}
    texts = corpus.load("dev", _write_list(tmp_path, [good]))
    assert [t.text for t in texts] == ["Some real text.\n"]
    bad = dict(good, sha256="0" * 64)
    with pytest.raises(corpus.CorpusError, match=r"'doc'.*sha256.*differs"):
        corpus.load("all", _write_list(tmp_path, [bad]))
    missing = dict(good, path=str(tmp_path / "nope.txt"))
    with pytest.raises(corpus.CorpusError, match="not found"):
        corpus.load("all", _write_list(tmp_path, [missing]))


def test_corpus_list_is_well_formed():
    entries = corpus.load_list()
    assert len(entries) >= 24
    assert sum(e["split"] == "dev" for e in entries) == 4
    for e in entries:
        assert len(e["sha256"]) == 64 and e.get("licence") and e.get("source")
        assert "pydoc_data" not in e.get("path", "")


def test_fidelity_metrics_and_sweep():
    from bench import fidelity

    logits = torch.randn(5, 10, generator=torch.Generator().manual_seed(2))
    teacher = logits.argmax(-1).tolist()
    assert fidelity.compare(logits, logits, teacher) == (1.0, pytest.approx(0.0, abs=1e-9))
    other = logits.clone()
    other[0] = -other[0]
    agree, kl = fidelity.compare(logits, other, teacher)
    assert agree == pytest.approx(0.8) and kl > 0
    for quick in (False, True):
        names = [s.name for s in fidelity.codec_sweep(quick)]
        assert len(names) == len(set(names)) and all(n.startswith("codec/") for n in names)


def _runner_result():
    """A bench/gpu/gpu_kernels.mjs result of the shape bench/layouts.py reads (SmolLM2's shape)."""
    cfg = {"V": 49152, "DM": 576, "L": 30, "H": 9, "G": 3, "DH": 64, "F": 1536, "eps": 1e-5}
    ctx = {"positions": 256, "tokS": 2.0, "msPerToken": 500.0, "dispatchesPerToken": 365,
           "profile": {"kernels": {"qkv": 50, "down": 100.5, "attn_scores": 20.0, "embed": 0.5, "sample": 1.0}}}
    return {"bandwidth": {"gbS": 2.0},
            "layouts": [{"layout": "cpu", "cfg": cfg, "bytesPerToken": 100_000_000, "contexts": {"256": ctx}},
                        {"layout": "gpu", "cfg": cfg, "bytesPerToken": 100_000_000,
                         "contexts": {"256": {**ctx, "profile": None}}}]}


def test_layouts_bytes_and_bound_ratio():
    from bench import layouts
    cfg = _runner_result()["layouts"][0]["cfg"]
    assert layouts.kv_bytes(cfg, 257) == 2 * 30 * 257 * 3 * 64 * 4  # K and V, f32, every layer
    assert layouts.bound_ratio(100.0, 2e8, 2.0) == pytest.approx(1.0)  # 200 MB at 2 GB/s = 100 ms
    assert layouts.bound_ratio(400.0, 2e8, 2.0) == pytest.approx(4.0)

    cpu, gpu = layouts.cells(_runner_result())
    kv = 2 * 30 * 257 * 3 * 64 * 4
    assert (cpu["layout"], cpu["context"], cpu["dispatches"]) == ("cpu", 256, 365)
    assert cpu["kvBytes"] == kv and cpu["bytes"] == 100_000_000 + kv
    assert cpu["boundMs"] == pytest.approx((1e8 + kv) / 2e9 * 1e3)
    assert cpu["boundRatio"] == pytest.approx(500.0 / cpu["boundMs"])
    assert cpu["groups"] == {"gemv": 150.5, "attention": 20.0, "other": 1.5}
    assert gpu["groups"] is None and gpu["kernels"] == {}


def test_layouts_regression_ratio():
    from bench import layouts
    r = layouts.regression([2.0, 1.0, 3.0], [2.0, 2.5, 2.2])
    assert (r["headMedian"], r["baseMedian"]) == (2.0, 2.2)
    assert r["ratio"] == pytest.approx(2.0 / 2.2) and not r["ok"]  # 0.909 < 0.95
    assert layouts.regression([1.9, 1.95], [2.0, 2.0])["ok"]  # 0.9625
    assert layouts.regression([1.9], [2.0])["ok"]  # exactly 0.95 meets the target


def test_layouts_tables_align():
    from bench import layouts
    rows = layouts.cells(_runner_result())
    text = layouts.cell_table(rows)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].startswith("layout  context")
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule as wide as each other
    assert lines[2].split()[:4] == ["cpu", "256", "2.00", "500.00"] and lines[3].split()[-3:] == ["–"] * 3
    assert lines[0].index("tok/s") + len("tok/s") == lines[2].index("2.00") + len("2.00")  # numbers to the right
    kernels = layouts.kernel_table(rows).splitlines()
    assert len(kernels) == 3  # the gpu row has no profile
    assert kernels[0].split()[2:7] == ["qkv", "wo", "gate_up", "down", "lm_head"]
    assert kernels[2].split()[2] == "50.00"
    assert layouts.format_table(["a", "n"], [["x", 1234], ["yy", 5]]).splitlines()[2:] == ["x   1,234", "yy      5"]
