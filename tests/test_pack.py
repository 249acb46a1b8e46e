"""The model pack: quantized planes decode exactly as GGUF does, and the pack decodes like the model."""

import gguf
import numpy as np
import torch

from hpi.protocol.holo import load_hologram
from hpi.llama import forward, weights_from_hf
from hpi.pack import (BLOCK, _gguf_planes, _unpermute_rows, basis_from_pack, build_pack, dequantize,
                         q8_0_quantize, vocab_bytes, weights_from_pack)


class FakeTensor:
    """The two attributes of a gguf ReaderTensor that the pack reads."""

    def __init__(self, data, tensor_type, name="t"):
        self.data, self.tensor_type, self.name = data, tensor_type, name


def random_blocks(rows, cols, bytes_per_block, seed=0):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // BLOCK, bytes_per_block), dtype=np.uint8)
    raw[..., :4] = np.frombuffer(rng.normal(0, 0.05, size=rows * cols // BLOCK * 2).astype(np.float16).tobytes(),
                                 np.uint8).reshape(rows, cols // BLOCK, 4)  # finite scales (and minimums)
    return raw.reshape(rows, -1)


def test_q4_1_planes_dequantize_exactly_like_gguf():
    raw = random_blocks(6, 128, 20)
    scheme, planes = _gguf_planes(FakeTensor(raw, gguf.GGMLQuantizationType.Q4_1))
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1)
    assert scheme == "q4_1" and np.array_equal(dequantize(planes, scheme), want)


def test_q8_0_planes_dequantize_exactly_like_gguf():
    raw = random_blocks(5, 64, 34, seed=1)
    scheme, planes = _gguf_planes(FakeTensor(raw, gguf.GGMLQuantizationType.Q8_0))
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)
    assert scheme == "q8_0" and np.array_equal(dequantize(planes, scheme), want)


def test_q8_0_quantize_error_is_half_a_step():
    w = np.random.default_rng(2).normal(size=(8, 96)).astype(np.float32)
    planes = q8_0_quantize(w)
    err = np.abs(dequantize(planes, "q8_0") - w).reshape(8, 3, BLOCK).max(-1)
    assert (err <= planes["d"].astype(np.float32) * 0.5 + 1e-3 * np.abs(w).max()).all()


def test_unpermute_rows_matches_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)  # 4 heads of 8 rows
    want = LlamaTensorProcessor()._reverse_permute_weights(w, 4)
    assert np.array_equal(_unpermute_rows({"w": w}, 4)["w"], want)


def test_vocab_bytes_spell_the_tokens(tiny):
    data, offsets = vocab_bytes(tiny.tokenizer)
    text = "Hello, wörld — 你好!\n  indented"
    ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(data[offsets[i]:offsets[i + 1]].tobytes() for i in ids).decode() == text
    im_end = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert data[offsets[im_end]:offsets[im_end + 1]].tobytes() == b"<|im_end|>"


def test_pack_decodes_like_the_model(tiny):
    holo = load_hologram(build_pack(tiny, calibration_tokens=256))
    assert holo.kind == "model_pack" and holo.meta["config"]["layers"] == tiny.config.num_hidden_layers
    assert all(s == "q8_0" for s in holo.meta["weights"].values())  # an HF folder is quantized here
    packed, exact = weights_from_pack(holo), weights_from_hf(tiny.model)
    ids = torch.tensor(tiny.chat_ids([{"role": "user", "content": "pack the model, then decode with it"}]))
    pos = torch.arange(len(ids))
    lp, _ = forward(packed, ids, pos)
    le, _ = forward(exact, ids, pos)
    err = float((lp - le).abs().max())
    assert err < 0.1 * float(le.abs().max())  # Q8_0: about 0.4% per weight
    # Wherever the exact model's choice leads by more than twice the error, the pack chooses the same.
    top2 = le.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err
    assert bool(clear.any()) and bool((lp.argmax(-1) == le.argmax(-1))[clear].all())
    b = basis_from_pack(holo)
    assert b.keys.pca.shape == (tiny.config.num_hidden_layers, tiny.config.num_key_value_heads, 16, 16)
