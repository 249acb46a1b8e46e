"""The anchor's weights in a GGUF file's own quantized blocks, for the kernels of server/_kernels.c.

transformers loads a GGUF model by dequantizing every block to fp32; those fp32 weights are the
model the anchor runs. The kernels read the blocks themselves (Q4_1: 5 bits a weight, Q8_0:
8.5) and dequantize them the same way on the fly, so the model is unchanged while a forward
reads about a sixth of the bytes. Before a tensor's blocks stand in for a weight they are
checked to dequantize to exactly that weight, row for row (transformers reorders the rows of
the query and key projections; the blocks are put in its order).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

from server import kernels


class QuantMatrix:
    """A weight W [N, K] as quantized blocks, one row of blocks per output feature.

    `self(x)` gives x [M, K] @ W^T in fp32, each row's bits independent of M (server/_kernels.c)."""

    def __init__(self, blocks: torch.Tensor, kind: str, k: int):
        self.blocks = blocks.contiguous()  # [N, K / 32 * bytes per block], uint8
        self.kind, self.k = kind, k
        self.shape = (blocks.shape[0], k)

    def __call__(self, x: torch.Tensor, portable: bool = False) -> torch.Tensor:
        return kernels.matmul_blocks(x, self.blocks, self.kind, self.k, portable)  # [M, N]

    @staticmethod
    def stack(parts: list[QuantMatrix]) -> QuantMatrix:
        """One matrix of the parts' rows (projections that share their input, fused)."""
        assert len({(p.kind, p.k) for p in parts}) == 1
        return QuantMatrix(torch.cat([p.blocks for p in parts]), parts[0].kind, parts[0].k)


# transformers' Llama modules, by the GGUF tensor each was loaded from
_LAYER_TENSORS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                  "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                  "ffn_down": "mlp.down_proj"}


def _module_names(reader) -> dict[str, str]:
    names = {t.name for t in reader.tensors}
    out = {}
    for name in names:
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_TENSORS:
            out[name] = f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    # tied embeddings: the token embedding is also the output head
    out["output.weight" if "output.weight" in names else "token_embd.weight"] = "lm_head"
    return out


def _row_order(dequantized: np.ndarray, weight: np.ndarray) -> np.ndarray | None:
    """Indices putting the GGUF rows in the model's order, if every model row is one of them exactly."""
    if dequantized.shape != weight.shape:
        return None
    if np.array_equal(dequantized, weight):
        return np.arange(weight.shape[0])
    where = {row.tobytes(): i for i, row in enumerate(dequantized)}
    order = [where.get(row.tobytes()) for row in weight]
    return None if None in order else np.array(order)


def gguf_blocks(path: Path, model) -> dict[str, QuantMatrix]:
    """Model module name -> its weight as blocks, for each linear weight of `model` (loaded by
    transformers from the GGUF file at `path`) stored in blocks the kernels read and proven to
    dequantize to exactly the module's weight. Empty when the kernels are not built."""
    if not kernels.available():
        log.warning("server/_kernels.c is not built (pip install -e .): the anchor runs fp32 weights")
        return {}
    import gguf
    from gguf import quants
    reader = gguf.GGUFReader(str(path))
    modules = dict(model.named_modules())
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for tname, mname in _module_names(reader).items():
        t, module = tensors.get(tname), modules.get(mname)
        if t is None or module is None or t.tensor_type.name not in kernels.KIND:
            continue
        blocks = np.asarray(t.data)  # [N, row bytes]
        weight = module.weight.detach().float().cpu().numpy()  # [N, K]
        order = _row_order(quants.dequantize(blocks, t.tensor_type), weight)
        if order is None:
            log.warning("%s does not dequantize to the model's %s: that product stays fp32", tname, mname)
            continue
        out[mname] = QuantMatrix(torch.from_numpy(blocks[order].copy()), t.tensor_type.name, weight.shape[1])
    return out
