"""The model pack: everything the resonator needs to decode, in one `.holo` file (kind model_pack).

Weights travel at <= 8 bits. A GGUF checkpoint's quantized blocks are carried unchanged
(only re-laid out into planes so a GPU reads aligned words), so the resonator computes
with exactly the anchor's weights; other checkpoints are quantized to Q8_0 here.
The pack also carries the codec's calibrated bases, so holograms need only coefficients,
and the tokenizer's byte strings, so the page can show tokens without a tokenizer library.
Layout of every tensor: protocol/SPEC.md, "Model pack".
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from hpi.protocol.holo import Holo, load_hologram, save_hologram
from hpi.llama import LayerWeights, LlamaWeights, weights_from_hf
from hpi.models import LoadedModel
from hpi.rope import rope_tables, unrotate
from hpi.spectral import Basis, calibrate

BLOCK = 32  # weights per quantization block (GGUF Q4_1 / Q8_0)
FORMAT = "hpi.model_pack/1"
LINEAR = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
BASIS_PARTS = [f.name for f in fields(Basis)]
GGUF_NAMES = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
              "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}


@dataclass
class CodecBasis:
    keys: Basis
    values: Basis
    inv_freq: torch.Tensor  # [Dh/2]


# ---- quantized weight planes --------------------------------------------------------------

def q8_0_quantize(w: np.ndarray) -> dict[str, np.ndarray]:
    """Q8_0 planes of w [R, C]: d f16 [R, C/32], q i8 [R, C]; d = absmax/127 as in GGUF."""
    rows, cols = w.shape
    blocks = w.astype(np.float32).reshape(rows, cols // BLOCK, BLOCK)
    d = (np.abs(blocks).max(-1) / 127.0).astype(np.float16)
    inv = np.divide(1.0, d.astype(np.float32), out=np.zeros_like(d, np.float32), where=d != 0)
    q = np.clip(np.round(blocks * inv[..., None]), -127, 127).astype(np.int8)
    return {"d": d, "q": q.reshape(rows, cols)}


def dequantize(planes: dict[str, np.ndarray], scheme: str) -> np.ndarray:
    """fp32 weights [R, C] from planes; the arithmetic is GGUF's, so values match bit for bit."""
    d = planes["d"].astype(np.float32)[..., None]  # [R, C/32, 1]
    if scheme == "q8_0":
        q = planes["q"].astype(np.float32)
        return (q.reshape(*d.shape[:2], BLOCK) * d).reshape(q.shape)
    if scheme == "q4_1":
        qs = planes["qs"].reshape(*d.shape[:2], BLOCK // 2)  # byte j: low nibble = j, high = j + 16
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)
        return (d * q + planes["m"].astype(np.float32)[..., None]).reshape(d.shape[0], -1)
    if scheme == "f32":
        return planes["w"]
    raise ValueError(f"unknown weight scheme {scheme!r}")


def _gguf_planes(t) -> tuple[str, dict[str, np.ndarray]]:
    """Planes of a GGUF tensor's raw blocks (rows of bytes), without re-quantizing."""
    import gguf

    raw = np.asarray(t.data)
    rows = raw.shape[0]
    if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
        b = raw.reshape(rows, -1, 34)
        return "q8_0", {"d": b[..., :2].copy().view(np.float16)[..., 0],
                        "q": b[..., 2:].copy().view(np.int8).reshape(rows, -1)}
    if t.tensor_type == gguf.GGMLQuantizationType.Q4_1:
        b = raw.reshape(rows, -1, 20)
        return "q4_1", {"d": b[..., :2].copy().view(np.float16)[..., 0],
                        "m": b[..., 2:4].copy().view(np.float16)[..., 0],
                        "qs": b[..., 4:].reshape(rows, -1).copy()}
    if t.tensor_type == gguf.GGMLQuantizationType.F32:
        return "f32", {"w": raw.astype(np.float32)}
    raise ValueError(f"GGUF tensor {t.name} has type {t.tensor_type.name}; the pack supports Q4_1, Q8_0, F32")


def _unpermute_rows(planes: dict[str, np.ndarray], n_heads: int) -> dict[str, np.ndarray]:
    """llama.cpp stores q/k rows interleaved per head for its RoPE; restore the HF order."""
    rows = planes[next(iter(planes))].shape[0]
    perm = np.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).swapaxes(1, 2).reshape(-1)
    return {k: v[perm] for k, v in planes.items()}


def _linear_planes(lm: LoadedModel, w: LlamaWeights) -> dict[str, tuple[str, dict[str, np.ndarray]]]:
    """Every weight matrix by pack name -> (scheme, planes)."""
    out = {}
    if lm.path.suffix == ".gguf":
        import gguf

        tensors = {t.name: t for t in gguf.GGUFReader(str(lm.path)).tensors}
        out["embed"] = _gguf_planes(tensors["token_embd.weight"])
        if "output.weight" in tensors:
            out["lm_head"] = _gguf_planes(tensors["output.weight"])
        for i in range(len(w.layers)):
            for name in LINEAR:
                scheme, planes = _gguf_planes(tensors[f"blk.{i}.{GGUF_NAMES[name]}.weight"])
                if name in ("wq", "wk"):
                    planes = _unpermute_rows(planes, w.n_heads if name == "wq" else w.n_kv_heads)
                out[f"layers.{i}.{name}"] = (scheme, planes)
        return out
    out["embed"] = ("q8_0", q8_0_quantize(w.embed.numpy()))
    if w.lm_head.data_ptr() != w.embed.data_ptr():
        out["lm_head"] = ("q8_0", q8_0_quantize(w.lm_head.numpy()))
    for i, lw in enumerate(w.layers):
        for name in LINEAR:
            out[f"layers.{i}.{name}"] = ("q8_0", q8_0_quantize(getattr(lw, name).numpy()))
    return out


# ---- tokenizer bytes ----------------------------------------------------------------------

def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode, which byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def vocab_bytes(tok) -> tuple[np.ndarray, np.ndarray]:
    """(bytes u8 [total], offsets u32 [V+1]): the raw bytes each token id stands for."""
    dec = byte_decoder()
    special = set(tok.all_special_tokens) | set(getattr(tok, "added_tokens_encoder", {}))
    pieces = []
    for t in tok.convert_ids_to_tokens(list(range(len(tok)))):
        t = t or ""
        if t in special or any(ch not in dec for ch in t):
            pieces.append(t.encode())
        else:
            pieces.append(bytes(dec[ch] for ch in t))
    offsets = np.zeros(len(pieces) + 1, np.uint32)
    offsets[1:] = np.cumsum([len(p) for p in pieces])
    return np.frombuffer(b"".join(pieces), np.uint8).copy(), offsets


# ---- calibration --------------------------------------------------------------------------

def calibration_text() -> list[str]:
    """Real prose that ships with every Python: the language reference's topic pages.

    The fidelity benchmark's texts come from other sources, so calibration never sees them.
    """
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _key_metric(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """E[q q^T] per KV group from pre-RoPE queries q [N, H, Dh], as a diagonal [G, Dh, Dh].

    A key at distance d from its query meets it rotated by d * inv_freq per dimension pair,
    so over many distances the cross terms average out and each pair sees the mean energy
    of its two dimensions.
    """
    n, H, Dh = q.shape
    e = q.double().pow(2).mean(0).view(n_kv, H // n_kv, Dh).sum(1)  # [G, Dh]
    e = (e + e.roll(Dh // 2, dims=-1)) / 2
    return torch.diag_embed(e)


def _value_metric(wo: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """W_o^T W_o per KV group [G, Dh, Dh]: how a value error reaches the residual stream."""
    dm = wo.shape[0]
    per_head = wo.double().view(dm, n_heads, -1).permute(1, 2, 0)  # [H, Dh, Dm]
    m = per_head @ per_head.transpose(1, 2)  # [H, Dh, Dh]
    return m.view(n_kv, n_heads // n_kv, *m.shape[1:]).sum(1)


@torch.no_grad()
def calibrate_model(lm: LoadedModel, n_tokens: int = 4096, chunk: int = 512, weighted: bool = True,
                    floor: float = 0.05) -> CodecBasis:
    """Codec bases of the model's pre-RoPE keys and values over chat-formatted calibration chunks.

    `weighted` measures errors by their effect on the model (server/spectral.py); without
    it the bases are plain PCA, as in published KV transform codecs.
    """
    from transformers import DynamicCache

    ids: list[int] = []
    for text in calibration_text():
        if len(ids) >= n_tokens:
            break
        ids += lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    w = weights_from_hf(lm.model)
    layers = lm.model.model.layers
    queries: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.self_attn.q_proj.register_forward_hook(
        lambda mod, inp, out, i=i: queries[i].append(out[0].float().cpu())) for i, layer in enumerate(layers)]
    keys, values = [], []
    try:
        for i in range(0, n_tokens, chunk):
            body = lm.tokenizer.decode(ids[i:i + chunk])
            chat = lm.chat_ids([{"role": "user", "content": body}])[:chunk]
            cache = DynamicCache(config=lm.config)
            lm.model(input_ids=torch.tensor([chat], device=lm.model.device), cache=cache, use_cache=True)
            cos, sin = rope_tables(torch.arange(len(chat)), w.inv_freq)
            keys.append(torch.stack([unrotate(layer.keys[0].float().cpu(), cos, sin) for layer in cache.layers]))
            values.append(torch.stack([layer.values[0].float().cpu() for layer in cache.layers]))
    finally:
        for h in hooks:
            h.remove()
    key_metric = value_metric = None
    if weighted:
        key_metric = torch.stack([_key_metric(torch.cat(q).view(-1, w.n_heads, w.head_dim), w.n_kv_heads)
                                  for q in queries])
        value_metric = torch.stack([_value_metric(lw.wo, w.n_heads, w.n_kv_heads) for lw in w.layers])
    return CodecBasis(calibrate(torch.cat(keys, dim=2), key_metric, floor),
                      calibrate(torch.cat(values, dim=2), value_metric, floor), w.inv_freq)


# ---- the pack -----------------------------------------------------------------------------

def build_pack(lm: LoadedModel, calibration_tokens: int = 4096) -> bytes:
    w = weights_from_hf(lm.model)
    cfg = lm.config
    tensors: dict[str, np.ndarray] = {}
    schemes: dict[str, str] = {}
    for name, (scheme, planes) in _linear_planes(lm, w).items():
        schemes[name] = scheme
        for plane, arr in planes.items():
            tensors[f"{name}.{plane}"] = arr
    for i, lw in enumerate(w.layers):
        tensors[f"layers.{i}.attn_norm"] = lw.attn_norm.numpy()
        tensors[f"layers.{i}.mlp_norm"] = lw.mlp_norm.numpy()
    tensors["norm"] = w.norm.numpy()
    tensors["rope.inv_freq"] = w.inv_freq.numpy()
    basis = calibrate_model(lm, calibration_tokens)
    for kind, b in (("k", basis.keys), ("v", basis.values)):
        for part in BASIS_PARTS:
            tensors[f"codec.{kind}.{part}"] = getattr(b, part).numpy()
    tensors["vocab.bytes"], tensors["vocab.offsets"] = vocab_bytes(lm.tokenizer)
    meta = {
        "format": FORMAT,
        "model_id": lm.model_id,
        "tokenizer_id": lm.tokenizer_id,
        "config": {"vocab": w.embed.shape[0], "hidden": w.embed.shape[1], "layers": len(w.layers),
                   "heads": w.n_heads, "kv_heads": w.n_kv_heads, "head_dim": w.head_dim,
                   "intermediate": w.layers[0].w_gate.shape[0], "eps": w.eps,
                   "tied": "lm_head" not in schemes},
        "rope": {"inv_freq": "rope.inv_freq", **{k: v for k, v in (cfg.rope_parameters or {}).items()
                                                 if isinstance(v, (int, float, str))}},
        "eos_ids": lm.eos_token_ids,
        "weights": schemes,
        "calibration": {"source": "pydoc_data.topics (Python language reference)",
                        "tokens": calibration_tokens},
    }
    return save_hologram(Holo("model_pack", meta, tensors))


def _check_pack(holo: Holo) -> None:
    if holo.kind != "model_pack" or holo.meta.get("format") != FORMAT:
        raise ValueError(f"not an {FORMAT} file (kind {holo.kind}, format {holo.meta.get('format')})")


def basis_from_pack(data: bytes | Holo) -> CodecBasis:
    holo = data if isinstance(data, Holo) else load_hologram(data)
    _check_pack(holo)
    t = lambda name: torch.from_numpy(np.array(holo.tensors[name]))  # noqa: E731
    return CodecBasis(*(Basis(*(t(f"codec.{kind}.{part}") for part in BASIS_PARTS)) for kind in "kv"),
                      t("rope.inv_freq"))


def weights_from_pack(holo: Holo) -> LlamaWeights:
    """Dequantized fp32 weights of a pack: exactly what a GGUF anchor computes with."""
    _check_pack(holo)
    c, schemes = holo.meta["config"], holo.meta["weights"]

    def mat(name: str) -> torch.Tensor:
        planes = {k.rsplit(".", 1)[1]: v for k, v in holo.tensors.items() if k.rsplit(".", 1)[0] == name}
        return torch.from_numpy(dequantize(planes, schemes[name]))

    vec = lambda name: torch.from_numpy(np.array(holo.tensors[name]))  # noqa: E731
    layers = [LayerWeights(vec(f"layers.{i}.attn_norm"), *(mat(f"layers.{i}.{n}") for n in LINEAR[:4]),
                           vec(f"layers.{i}.mlp_norm"), *(mat(f"layers.{i}.{n}") for n in LINEAR[4:]))
              for i in range(c["layers"])]
    embed = mat("embed")
    return LlamaWeights(c["heads"], c["kv_heads"], c["head_dim"], c["eps"], vec("rope.inv_freq"), embed,
                        layers, vec("norm"), embed if c["tied"] else mat("lm_head"))
