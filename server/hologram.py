"""Conversation holograms: a span of one model's KV cache, coded by server/spectral.py, in `.holo`.

A hologram covers KV positions [start, end) of a conversation; `next_id` is the token at
position `end`, which the resonator feeds first. Segments tile a conversation: a new turn
sends only [previous end, new end). Layout: protocol/SPEC.md, "Conversation hologram".
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, fields

import torch

from hpi.protocol.holo import Holo, load_hologram, save_hologram
from hpi.pack import CodecBasis
from hpi.spectral import BASES, CodecParams, Encoded, decode, encode

FORMAT = "hpi.conversation/1"
PARTS = [f.name for f in fields(Encoded)]


def build(keys: torch.Tensor, values: torch.Tensor, *, start: int, next_id: int, basis: CodecBasis,
          params: CodecParams, model_id: str, tokenizer_id: str, pack_hash: str) -> bytes:
    """Encode keys/values [L, G, T, Dh] (keys post-RoPE) of positions [start, start + T)."""
    L, G, T, Dh = keys.shape
    tensors = {}
    for kind, x in (("k", keys), ("v", values)):
        enc = encode(x, start, kind == "k", basis.keys if kind == "k" else basis.values, basis.inv_freq, params)
        for part in PARTS:
            tensors[f"{kind}.{part}"] = getattr(enc, part)
    meta = {"format": FORMAT, "model_id": model_id, "tokenizer_id": tokenizer_id, "pack_hash": pack_hash,
            "start": start, "end": start + T, "next_id": int(next_id),
            "layers": L, "kv_heads": G, "head_dim": Dh,
            "rope": {"inv_freq": "pack:rope.inv_freq", "positions": [start, start + T]},
            "codec": {**params.to_meta(), "basis_codes": list(BASES)}}
    # Codes are near-independent symbols: LZ77 matching only disturbs the entropy coder, so
    # Huffman-only DEFLATE is both smaller (11% on SmolLM2 keys) and ~60x faster than level 9.
    return save_hologram(Holo("conversation", meta, tensors), deflate={"k.codes", "v.codes"},
                         strategy=zlib.Z_HUFFMAN_ONLY)


@dataclass
class Segment:
    meta: dict
    keys: torch.Tensor  # [L, G, T, Dh] post-RoPE
    values: torch.Tensor

    @property
    def start(self) -> int:
        return self.meta["start"]

    @property
    def end(self) -> int:
        return self.meta["end"]


def read(data: bytes | Holo, basis: CodecBasis, pack_hash: str | None = None) -> Segment:
    """Decode a conversation hologram to K/V; `pack_hash` checks it belongs to that pack."""
    holo = data if isinstance(data, Holo) else load_hologram(data)
    if holo.kind != "conversation" or holo.meta.get("format") != FORMAT:
        raise ValueError(f"not an {FORMAT} file (kind {holo.kind}, format {holo.meta.get('format')})")
    meta = holo.meta
    if pack_hash is not None and meta["pack_hash"] != pack_hash:
        raise ValueError(f"hologram was built for pack {meta['pack_hash'][:16]}, not {pack_hash[:16]}")
    params = CodecParams.from_meta({k: v for k, v in meta["codec"].items() if k != "basis_codes"})
    T = meta["end"] - meta["start"]
    out = []
    for kind in ("k", "v"):
        enc = Encoded(**{part: holo.tensors[f"{kind}.{part}"] for part in PARTS})
        out.append(decode(enc, meta["start"], T, kind == "k", basis.keys if kind == "k" else basis.values,
                          basis.inv_freq, params))
    return Segment(meta, out[0], out[1])
