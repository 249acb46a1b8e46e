"""The anchor's CPU kernels (server/_kernels.c): quantized products and generated rows' attention.

Each must give a row the same bits alone and among other rows, on one thread or several, in its
AVX2 code and its portable code; the products must use exactly the weights transformers
dequantizes from the GGUF file, and both must agree with torch's arithmetic to rounding."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from hpi import kernels
from hpi.quant import QuantMatrix, gguf_blocks


def test_the_kernels_are_built():
    assert kernels.available(), "server/_kernels.c is not built: pip install -e . builds it (needs gcc)"


def random_blocks(n: int, k: int, kind: str, seed: int = 0) -> np.ndarray:
    """Rows of `kind` blocks with random quants and finite, varied fp16 scales (and minimums)."""
    rng = np.random.default_rng(seed)
    qtype = GGMLQuantizationType[kind]
    per_block = kernels.BLOCK_BYTES[kind]
    raw = rng.integers(0, 256, size=(n, k // 32, per_block), dtype=np.uint8)
    raw[:, :, 0:2] = (rng.uniform(0.001, 0.05, size=(n, k // 32)).astype(np.float16)
                      .view(np.uint8).reshape(n, k // 32, 2))
    if qtype == GGMLQuantizationType.Q4_1:
        raw[:, :, 2:4] = (rng.uniform(-0.4, 0.0, size=(n, k // 32)).astype(np.float16)
                          .view(np.uint8).reshape(n, k // 32, 2))
    return raw.reshape(n, -1)


@pytest.fixture(autouse=True)
def two_threads():
    before = kernels.threads()
    kernels.set_threads(2)
    yield
    kernels.set_threads(before)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_a_product_reads_exactly_the_weights_gguf_dequantizes(kind):
    n, k = 40, 96
    blocks = random_blocks(n, k, kind)
    w = QuantMatrix.from_blocks(blocks, kind, k)
    dequantized = torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType[kind]))  # [N, K]
    assert torch.equal(w(torch.eye(k)), dequantized.T)  # one-hot rows pick single weights, exactly
    x = torch.randn(7, k)
    assert torch.allclose(w(x), x @ dequantized.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_a_row_of_a_product_has_the_same_bits_in_any_batch_thread_count_and_code_path(kind):
    n, k = 56, 160  # seven panels: a pair left over at the end of each thread's share, and a single
    w = QuantMatrix.from_blocks(random_blocks(n, k, kind, seed=1), kind, k)
    x = torch.randn(23, k)
    together = w(x)
    assert torch.equal(w(x, portable=True), together)
    for m in range(1, 23):  # one row, the weights unpacked in registers, and the rows against scratch
        assert torch.equal(w(x[:m]), together[:m])
        assert torch.equal(w(x[m - 1:m]), together[m - 1:m])
    kernels.set_threads(1)
    assert torch.equal(w(x), together)


def reference_attention(q, keys, values, start, scale):
    H, n, Dh = q.shape
    G = keys.shape[0]
    rows = []
    for j in range(n):
        t = start + j + 1
        scores = (q[:, j].reshape(G, H // G, Dh) @ keys[:, :t].transpose(1, 2)) * scale
        rows.append((torch.softmax(scores, -1) @ values[:, :t]).reshape(H * Dh))
    return torch.stack(rows)


@pytest.mark.parametrize("heads,kv_heads,head_dim,start,n", [(9, 3, 64, 0, 1), (9, 3, 64, 70, 17),
                                                             (4, 2, 16, 5, 6), (8, 8, 32, 130, 3)])
def test_attention_rows_are_exact_alone_and_together(heads, kv_heads, head_dim, start, n):
    q = torch.randn(heads, n, head_dim)
    # keys and values as a cache holds them: the start of a buffer with room to spare
    keys = torch.randn(kv_heads, start + n + 40, head_dim)[:, :start + n]
    values = torch.randn(kv_heads, start + n + 40, head_dim)[:, :start + n]
    scale = head_dim ** -0.5
    (together,) = kernels.attend([(q, keys, values, start)], scale)
    assert torch.equal(kernels.attend([(q, keys, values, start)], scale, portable=True)[0], together)
    # each row alone, all in one call as the engine batches sequences
    alone = kernels.attend([(q[:, j:j + 1], keys[:, :start + j + 1], values[:, :start + j + 1], start + j)
                            for j in range(n)], scale)
    assert torch.equal(torch.cat(alone), together)
    kernels.set_threads(1)
    assert torch.equal(kernels.attend([(q, keys, values, start)], scale)[0], together)
    assert torch.allclose(together, reference_attention(q, keys, values, start, scale), atol=2e-6)


def test_bad_arguments_are_refused():
    w = QuantMatrix.from_blocks(random_blocks(8, 64, "Q8_0"), "Q8_0", 64)
    with pytest.raises(ValueError):
        w(torch.randn(2, 32))
    with pytest.raises(ValueError):  # 3 rows, 2 positions
        kernels.attend([(torch.randn(4, 3, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16), 0)], 0.25)
    with pytest.raises(ValueError):  # head dim 12
        kernels.attend([(torch.randn(3, 1, 12), torch.randn(3, 1, 12), torch.randn(3, 1, 12), 0)], 0.25)
    with pytest.raises(ValueError):  # segments of different head counts
        kernels.attend([(torch.randn(4, 1, 16), torch.randn(2, 1, 16), torch.randn(2, 1, 16), 0),
                        (torch.randn(2, 1, 16), torch.randn(2, 1, 16), torch.randn(2, 1, 16), 0)], 0.25)


@pytest.mark.real_model
def test_the_real_model_runs_over_its_own_blocks(smollm):
    """Every projection and the output head of the packaged GGUF run over its blocks, which hold
    exactly transformers' weights; the engine's logits match the fp32 forward to rounding."""
    from hpi.engine import Seq
    from hpi.trail import TrailCache

    blocks = gguf_blocks(smollm.path, smollm.model)
    layers = smollm.config.num_hidden_layers
    assert len(blocks) == 7 * layers + 1 and "lm_head" in blocks
    engine = smollm.scheduler.engine
    assert engine.all_kernels
    modules = dict(smollm.model.named_modules())
    q_proj = blocks["model.layers.0.self_attn.q_proj"]  # rows reordered from the GGUF's
    assert torch.equal(q_proj(torch.eye(q_proj.k)), modules["model.layers.0.self_attn.q_proj"].weight.T)

    ids = smollm.chat_ids([{"role": "user", "content": "Which weights does the anchor read?"}])
    (got,) = engine.forward([Seq(TrailCache(smollm.config), ids, generated=False, all_logits=True)])
    with torch.no_grad():
        want = smollm.model(torch.tensor([ids])).logits[0]
    assert torch.allclose(got, want, atol=2e-3)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
