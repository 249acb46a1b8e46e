"""A plain Llama forward pass in torch: the reference math for the resonator and the codec bench.

It takes its weights from anywhere (a transformers model, a model pack) and attends over
a given past K/V, optionally with some past entries masked out per layer and KV head, so
compressed or evicted caches can be evaluated with the same code that decodes.

Shapes: N new tokens, P past tokens, H query heads, G KV heads, Dh head dim, Dm model dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hpi.rope import rope_tables, rotate

KV = tuple[torch.Tensor, torch.Tensor]  # keys (post-RoPE), values: [G, T, Dh] each


def head_dim(config) -> int:
    """Dh of a transformers Llama config: configs written before `head_dim` existed imply it."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [Dm]
    wq: torch.Tensor  # [H*Dh, Dm]
    wk: torch.Tensor  # [G*Dh, Dm]
    wv: torch.Tensor  # [G*Dh, Dm]
    wo: torch.Tensor  # [Dm, H*Dh]
    mlp_norm: torch.Tensor  # [Dm]
    w_gate: torch.Tensor  # [F, Dm]
    w_up: torch.Tensor  # [F, Dm]
    w_down: torch.Tensor  # [Dm, F]


@dataclass
class LlamaWeights:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    inv_freq: torch.Tensor  # [Dh/2]
    embed: torch.Tensor  # [V, Dm]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [Dm]
    lm_head: torch.Tensor  # [V, Dm]; the same tensor as embed when tied


def weights_from_hf(model) -> LlamaWeights:
    """View a transformers LlamaForCausalLM's parameters as LlamaWeights (fp32, no copy on CPU)."""
    cfg = model.config
    f = lambda t: t.detach().float()  # noqa: E731
    layers = [LayerWeights(f(l.input_layernorm.weight), f(l.self_attn.q_proj.weight),
                           f(l.self_attn.k_proj.weight), f(l.self_attn.v_proj.weight),
                           f(l.self_attn.o_proj.weight), f(l.post_attention_layernorm.weight),
                           f(l.mlp.gate_proj.weight), f(l.mlp.up_proj.weight), f(l.mlp.down_proj.weight))
              for l in model.model.layers]
    return LlamaWeights(cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg), cfg.rms_norm_eps,
                        f(model.model.rotary_emb.inv_freq), f(model.model.embed_tokens.weight), layers,
                        f(model.model.norm.weight), f(model.lm_head.weight))


def extend(past: list[KV] | None, new: list[KV]) -> list[KV]:
    """Per layer, `new` K/V appended after `past` along the token axis."""
    if past is None:
        return new
    return [(torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)) for (pk, pv), (k, v) in zip(past, new)]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@torch.no_grad()
def forward(w: LlamaWeights, ids: torch.Tensor, positions: torch.Tensor, past: list[KV] | None = None,
            past_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, list[KV]]:
    """Logits [N, V] for tokens `ids` [N] at `positions` [N], and their own K/V per layer.

    `past[l]` is layer l's K/V [G, P, Dh] for positions before `positions[0]`; `past_keep`
    [L, G, P] (bool) hides masked-out past entries, as an eviction policy would.
    """
    n = ids.shape[0]
    H, G, Dh = w.n_heads, w.n_kv_heads, w.head_dim
    cos, sin = rope_tables(positions, w.inv_freq)  # [N, Dh]
    causal = torch.ones(n, n, dtype=torch.bool).tril()  # [N, N]
    x = w.embed[ids]  # [N, Dm]
    new_kv: list[KV] = []
    for i, lw in enumerate(w.layers):
        h = rms_norm(x, lw.attn_norm, w.eps)
        q = (h @ lw.wq.T).view(n, H, Dh).transpose(0, 1)  # [H, N, Dh]
        k = (h @ lw.wk.T).view(n, G, Dh).transpose(0, 1)  # [G, N, Dh]
        v = (h @ lw.wv.T).view(n, G, Dh).transpose(0, 1)  # [G, N, Dh]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        new_kv.append((k, v))
        mask = causal.expand(G, n, n)  # [G, N, T]
        if past is not None:
            pk, pv = past[i]
            k, v = torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)
            keep = (past_keep[i] if past_keep is not None
                    else torch.ones(G, pk.shape[1], dtype=torch.bool))  # [G, P]
            mask = torch.cat([keep[:, None, :].expand(G, n, -1), mask], dim=-1)
        # grouped-query attention: query head j reads KV head j // (H/G)
        qg = q.view(G, H // G, n, Dh)  # [G, H/G, N, Dh]
        scores = qg @ k[:, None].transpose(-1, -2) / math.sqrt(Dh)  # [G, H/G, N, T]
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        attn = torch.softmax(scores, dim=-1) @ v[:, None]  # [G, H/G, N, Dh]
        x = x + attn.reshape(H, n, Dh).transpose(0, 1).reshape(n, H * Dh) @ lw.wo.T
        h = rms_norm(x, lw.mlp_norm, w.eps)
        x = x + (torch.nn.functional.silu(h @ lw.w_gate.T) * (h @ lw.w_up.T)) @ lw.w_down.T
    return rms_norm(x, w.norm, w.eps) @ w.lm_head.T, new_kv
