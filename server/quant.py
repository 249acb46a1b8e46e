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

from hpi import kernels


PANEL = 8  # output rows whose blocks the kernels read together


def to_panels(blocks: np.ndarray, kind: str) -> np.ndarray:
    """GGUF rows of blocks [N, K/32 * block bytes] regrouped into the kernels' panels of eight rows
    (layout in server/_kernels.c): [N/8, K/32 * 8 * block bytes], the same bytes in another order."""
    n = blocks.shape[0]
    b = blocks.reshape(n // PANEL, PANEL, -1, kernels.BLOCK_BYTES[kind]).transpose(0, 2, 1, 3)  # [P, nb, 8, bytes]
    d = b[..., 0:2].reshape(*b.shape[:2], 16)  # eight fp16 scales
    if kind == "Q4_1":
        m = b[..., 2:4].reshape(*b.shape[:2], 16)
        qs = b[..., 4:20]  # [P, nb, 8, 16]: element j low nibble of byte j, element j + 16 high
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [P, nb, 8 rows, 32 k]
        q = q.reshape(*q.shape[:3], 8, 4).transpose(0, 1, 3, 4, 2)  # [P, nb, quad, kk, row]
        quads = np.concatenate([q[..., 0, :] | (q[..., 1, :] << 4), q[..., 2, :] | (q[..., 3, :] << 4)], axis=-1)
        return np.concatenate([d, m, quads.reshape(*b.shape[:2], 128)], axis=-1).reshape(n // PANEL, -1)
    q = b[..., 2:34].reshape(*b.shape[:3], 8, 4).transpose(0, 1, 3, 4, 2)  # [P, nb, quad, kk, row]
    return np.concatenate([d, q.reshape(*b.shape[:2], 256)], axis=-1).reshape(n // PANEL, -1)


class QuantMatrix:
    """A weight W [N, K] as quantized blocks in panels of eight output rows (`to_panels`).

    `self(x)` gives x [M, K] @ W^T in fp32, each row's bits independent of M (server/_kernels.c)."""

    def __init__(self, panels: torch.Tensor, kind: str, n: int, k: int):
        self.panels = panels.contiguous()  # [N / 8, K / 32 * 8 * block bytes], uint8
        self.kind, self.shape, self.k = kind, (n, k), k

    @staticmethod
    def from_blocks(blocks: np.ndarray, kind: str, k: int) -> QuantMatrix:
        """From a GGUF tensor's rows of blocks [N, K / 32 * block bytes]; N a multiple of 8."""
        return QuantMatrix(torch.from_numpy(to_panels(np.ascontiguousarray(blocks), kind)), kind, blocks.shape[0], k)

    def __call__(self, x: torch.Tensor, portable: bool = False) -> torch.Tensor:
        return kernels.matmul_panels(x, self.panels, self.kind, self.shape[0], self.k, portable)  # [M, N]

    @staticmethod
    def stack(parts: list[QuantMatrix]) -> QuantMatrix:
        """One matrix of the parts' rows (projections that share their input, fused)."""
        assert len({(p.kind, p.k) for p in parts}) == 1
        return QuantMatrix(torch.cat([p.panels for p in parts]), parts[0].kind, sum(p.shape[0] for p in parts),
                           parts[0].k)


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
        if t is None or module is None or t.tensor_type.name not in kernels.KIND or t.data.shape[0] % PANEL:
            continue
        blocks = np.asarray(t.data)  # [N, row bytes]
        weight = module.weight.detach().float().cpu().numpy()  # [N, K]
        order = _row_order(quants.dequantize(blocks, t.tensor_type), weight)
        if order is None:
            log.warning("%s does not dequantize to the model's %s: that product stays fp32", tname, mname)
            continue
        out[mname] = QuantMatrix.from_blocks(blocks[order], t.tensor_type.name, weight.shape[1])
    return out
