"""The anchor's forward pass, batched: one forward over many sequences, each over its own KV.

Every choice the anchor makes comes from here: the logits after a prompt, verification of
drafts, plain anchor-only decoding. Sequences of different sessions share one forward: their
rows are stacked for the projections and the MLP (where the FLOPs are: a batch reads each
weight once for all its rows), and each sequence attends only to its own cache.

Exactness does not depend on the batch. A row's result must be the same bits whatever other
rows share its forward, or a session's verification could disagree with the same session
decoding alone:

- a matrix product gives each row the same bits whatever the row count: the kernels over a
  GGUF file's quantized blocks (server/quant.py, server/_kernels.c) fix one order of arithmetic
  per element; for fp32 weights, BLAS does so for row counts that are multiples of ROW_ALIGN
  (it picks other kernels for a few rows), so the rows are padded to one;
  `check_invariance` checks it on the machine at start;
- a generated token's row (verification, decoding) attends alone over exactly the positions
  before it and itself, the same computation whether it comes in a draft of sixteen or on
  its own (server/_kernels.c, one call for all sequences of a forward; torch where the kernel
  cannot serve the head size); prompt rows (prefill) attend in chunks at fixed absolute boundaries, so a prompt
  gives the same KV in a session and in an anchor-only completion.

Shapes: R rows (all sequences), n rows of one sequence, T its positions so far, H query heads,
G KV heads, Dh head dim, Dm model dim, F MLP dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hpi import kernels
from hpi.llama import rms_norm, weights_from_hf
from hpi.quant import QuantMatrix
from hpi.rope import rope_tables, rotate
from hpi.trail import TrailCache

ROW_ALIGN = 8
PREFILL_CHUNK = 256  # prompt rows attend in chunks starting at multiples of this position


class Dense:
    """An fp32 weight W [N, K]; `self(x)`: x [M, K] @ W^T, with the row count padded to ROW_ALIGN."""

    def __init__(self, w: torch.Tensor):
        self.w = w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return matmul_rows(x, self.w)


Product = Dense | QuantMatrix


@dataclass
class Layer:
    attn_norm: torch.Tensor  # [Dm]
    wqkv: Product  # [(H + 2G) Dh, Dm]: q, k and v projections in one product
    wo: Product  # [Dm, H Dh]
    mlp_norm: torch.Tensor  # [Dm]
    w_gate_up: Product  # [2F, Dm]
    w_down: Product  # [Dm, F]


@dataclass
class Seq:
    """Tokens to run after what `cache` holds. `generated`: rows of chosen tokens (each attends
    alone, see the module docstring), else prompt rows. `logits`: for every row, or the last."""
    cache: TrailCache
    ids: list[int]
    generated: bool
    all_logits: bool


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    extra = -x.shape[0] % ROW_ALIGN
    return x if not extra else torch.cat([x, x.new_zeros(extra, *x.shape[1:])])


def matmul_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [N, K] @ w[M, K]^T with the row count padded, so each row's bits do not depend on N."""
    return (_pad_rows(x) @ w.T)[:x.shape[0]]


class Engine:
    def __init__(self, model, blocks: dict[str, QuantMatrix] | None = None):
        """Over a transformers LlamaForCausalLM's weights. `blocks` (server/quant.py): the
        modules whose weights are also held as quantized blocks, by module name; their products
        run over the blocks, the others over fp32. The projections that share an input are fused
        into one matrix each (fp32 ones become the storage the model's own parameters view, so the
        weights are held once)."""
        blocks = blocks or {}
        w = weights_from_hf(model)
        self.n_heads, self.n_kv_heads, self.head_dim, self.eps = w.n_heads, w.n_kv_heads, w.head_dim, w.eps
        self.inv_freq, self.embed, self.norm = w.inv_freq, w.embed, w.norm
        self.lm_head = blocks.get("lm_head") or Dense(w.lm_head)
        self.layers = []
        for i, (lw, hf) in enumerate(zip(w.layers, model.model.layers)):
            a, m = hf.self_attn, hf.mlp
            name = f"model.layers.{i}."

            def product(*parts: str) -> Product:
                if all(name + p in blocks for p in parts):
                    return QuantMatrix.stack([blocks[name + p] for p in parts])
                params = [hf.get_submodule(p).weight for p in parts]
                return Dense(_fuse(*params) if len(params) > 1 else params[0].detach().float())

            self.layers.append(Layer(lw.attn_norm, product("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                     product("self_attn.o_proj"), lw.mlp_norm,
                                     product("mlp.gate_proj", "mlp.up_proj"), product("mlp.down_proj")))
        products = [p for l in self.layers for p in (l.wqkv, l.wo, l.w_gate_up, l.w_down)] + [self.lm_head]
        self.kernel_attention = kernels.can_attend(self.head_dim)
        self.all_kernels = all(isinstance(p, QuantMatrix) for p in products) and self.kernel_attention
        self.ffn = w.layers[0].w_gate.shape[0] if w.layers else 0
        self.scale = 1.0 / math.sqrt(self.head_dim)

    @torch.no_grad()
    def forward(self, seqs: list[Seq]) -> list[torch.Tensor]:
        """Run every sequence's ids into its cache; per sequence the logits [n, V] of its rows
        (or [1, V], the last, unless `all_logits`)."""
        H, G, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        starts = [s.cache.get_seq_length() for s in seqs]
        spans, r = [], 0
        for s in seqs:
            spans.append((r, r + len(s.ids)))
            r += len(s.ids)
        ids = torch.tensor([t for s in seqs for t in s.ids])  # [R]
        positions = torch.cat([torch.arange(p, p + len(s.ids)) for p, s in zip(starts, seqs)])  # [R]
        cos, sin = rope_tables(positions, self.inv_freq)  # [R, Dh]
        x = self.embed[ids]  # [R, Dm]
        for i, lw in enumerate(self.layers):
            h = rms_norm(x, lw.attn_norm, self.eps)
            qkv = lw.wqkv(h)  # [R, (H + 2G) Dh]
            q = rotate(qkv[:, :H * Dh].view(-1, H, Dh).transpose(0, 1), cos, sin)  # [H, R, Dh]
            k = rotate(qkv[:, H * Dh:(H + G) * Dh].view(-1, G, Dh).transpose(0, 1), cos, sin)  # [G, R, Dh]
            v = qkv[:, (H + G) * Dh:].view(-1, G, Dh).transpose(0, 1)  # [G, R, Dh]
            out = torch.empty(x.shape[0], H * Dh)  # [R, H Dh]
            generated = []  # every sequence's generated rows, attended in one kernel call
            for s, p, (a, b) in zip(seqs, starts, spans):
                keys, values = s.cache.layers[i].update(k[None, :, a:b], v[None, :, a:b])  # [1, G, T, Dh]
                if s.generated and self.kernel_attention:
                    generated.append(((q[:, a:b], keys[0], values[0], p), out[a:b]))
                else:
                    attend = self._attend_each if s.generated else self._attend_chunks
                    out[a:b] = attend(q[:, a:b], keys[0], values[0], p)
            if generated:
                kernels.attend([g for g, _ in generated], self.scale, out=[o for _, o in generated])
            x = x + lw.wo(out)
            h = rms_norm(x, lw.mlp_norm, self.eps)
            gate, up = lw.w_gate_up(h).split(self.ffn, dim=-1)  # [R, F] each
            x = x + lw.w_down(F.silu(gate) * up)
        rows = [torch.arange(a, b) if s.all_logits else torch.tensor([b - 1]) for s, (a, b) in zip(seqs, spans)]
        picked = torch.cat(rows)
        logits = self.lm_head(rms_norm(x[picked], self.norm, self.eps))  # [rows, V]
        return list(logits.split([len(r_) for r_ in rows]))

    def _attend_each(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        """Each query row j (position start + j) over positions [0, start + j], on its own (torch, where
        the kernels cannot: the same rule, its own bits)."""
        H, G, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        out = []
        for j in range(q.shape[1]):
            t = start + j + 1
            qj = q[:, j].reshape(G, H // G, Dh)  # [G, H/G, Dh]
            scores = (qj @ keys[:, :t].transpose(1, 2)) * self.scale  # [G, H/G, t]
            out.append((torch.softmax(scores, dim=-1) @ values[:, :t]).reshape(H * Dh))  # [H Dh]
        return torch.stack(out)  # [n, H Dh]

    def _attend_chunks(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        """Query rows in chunks between multiples of PREFILL_CHUNK, each chunk causally over its past."""
        H, G, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        n = q.shape[1]
        out = torch.empty(n, H * Dh)
        j = 0
        while j < n:
            p0 = start + j
            m = min(n - j, PREFILL_CHUNK - p0 % PREFILL_CHUNK)
            t = p0 + m
            qc = q[:, j:j + m].reshape(G, H // G, m, Dh)  # [G, H/G, m, Dh]
            scores = (qc @ keys[:, None, :t].transpose(-1, -2)) * self.scale  # [G, H/G, m, t]
            future = torch.arange(t)[None, :] > torch.arange(p0, t)[:, None]  # [m, t]
            scores = scores.masked_fill(future, float("-inf"))
            att = torch.softmax(scores, dim=-1) @ values[:, None, :t]  # [G, H/G, m, Dh]
            out[j:j + m] = att.reshape(H, m, Dh).transpose(0, 1).reshape(m, H * Dh)
            j += m
        return out


@torch.no_grad()
def _fuse(*params: torch.nn.Parameter) -> torch.Tensor:
    """One fp32 matrix of the parameters' rows; each parameter then views its rows of it."""
    fused = torch.cat([p.detach().float() for p in params]).contiguous()
    at = 0
    for p in params:
        if p.dtype == torch.float32:
            p.data = fused[at:at + p.shape[0]]
        at += p.shape[0]
    return fused


def check_invariance(engine: Engine, rows: int = 40) -> bool:
    """Whether a row's projection gives the same bits alone and among others on this machine."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, engine.embed.shape[1], generator=g)
    w = engine.layers[0].wqkv if engine.layers else engine.lm_head
    together = w(x)
    return all(torch.equal(w(x[:n]), together[:n]) for n in (1, 2, 3, 5, 9, 17, rows))
