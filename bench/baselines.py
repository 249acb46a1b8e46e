"""KV-cache compression baselines the spectral codec is measured against.

Every baseline takes the exact keys (post-RoPE) and values [L, G, T, Dh] of a prompt and
returns (keys_hat, values_hat, keep, nbytes):
  keys_hat, values_hat  fp32 [L, G, T, Dh], what a decoder would attend over;
  keep                  bool [L, G, T] for eviction methods (False = entry dropped), else None;
  nbytes                the exact storage cost of everything the decoder needs.

Like the codec (server/spectral.py, CodecParams.sink/recent), every baseline keeps the first
`sink` tokens and the last `recent` tokens exact in fp16, so only the coding of the middle
differs; those fp16 bytes are counted. Scales and minima are stored as fp16 and are rounded
to fp16 before use, so the reconstruction is exactly what the stored bytes give. Integer
codes are bit-packed: a block of n codes of b bits costs ceil(n * b / 8) bytes, with one
block per (layer, KV head, keys|values).

  fp16     2 bytes per element (the reference size).
  int8     symmetric per token and head: int8 codes + one fp16 scale (absmax / 127).
  KIVI-b   (Liu et al. 2024) asymmetric b-bit: keys per channel in groups of `group` tokens,
           values per token in groups of `group` channels; fp16 scale and min per group.
           A partial last group is its own (smaller) group, also with scale and min.
  H2O      (Zhang et al. 2023) heavy-hitter eviction: per layer and KV head keep the
           middle tokens with the largest attention accumulated over the prompt's queries
           (summed over the query heads of that KV group), so that sink + recent + heavy
           hitters = `fraction` of the T tokens; kept entries fp16, plus the index of kept
           middle tokens (a bitmap or u16 positions, whichever is smaller).
"""

from __future__ import annotations

import math

import torch

SINK = 4
RECENT = 32
Result = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", int]


def split(T: int, sink: int = SINK, recent: int = RECENT) -> tuple[int, int]:
    """(s, t): exact head and tail lengths, as hpi.spectral.split for a segment at start 0."""
    s = min(sink, T)
    return s, min(recent, T - s)


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def _exact_bytes(L: int, G: int, n: int, Dh: int) -> int:
    """fp16 bytes of n exact tokens of keys and values."""
    return 2 * 2 * L * G * n * Dh


def packed_bytes(n_codes: int, bits: int) -> int:
    return math.ceil(n_codes * bits / 8)


def _with_exact_ends(x: torch.Tensor, mid_hat: torch.Tensor, s: int, t: int) -> torch.Tensor:
    T = x.shape[2]
    return torch.cat([_f16(x[:, :, :s]), mid_hat, _f16(x[:, :, T - t:])], dim=2)


# ---- fp16 -----------------------------------------------------------------------------------

def fp16(keys: torch.Tensor, values: torch.Tensor) -> Result:
    L, G, T, Dh = keys.shape
    return _f16(keys), _f16(values), None, _exact_bytes(L, G, T, Dh)


# ---- int8 per token -------------------------------------------------------------------------

def int8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Symmetric int8 per row of x [..., M, Dh] with an fp16 scale per row: (x_hat, bytes)."""
    scale = _f16(x.abs().amax(-1, keepdim=True) / 127.0)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(x / safe), -127, 127)
    n_rows = x[..., 0].numel()
    return q * scale, x.numel() + 2 * n_rows


def int8(keys: torch.Tensor, values: torch.Tensor, sink: int = SINK, recent: int = RECENT) -> Result:
    L, G, T, Dh = keys.shape
    s, t = split(T, sink, recent)
    out, nbytes = [], _exact_bytes(L, G, s + t, Dh)
    for x in (keys, values):
        mid_hat, b = int8_quantize(x[:, :, s:T - t].float())
        out.append(_with_exact_ends(x, mid_hat, s, t))
        nbytes += b
    return out[0], out[1], None, nbytes


# ---- KIVI -----------------------------------------------------------------------------------

def _asym_quantize(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric b-bit quantization of x with one (fp16 scale, fp16 min) per slice along `dim`."""
    lo = _f16(x.amin(dim, keepdim=True))
    hi = x.amax(dim, keepdim=True)
    levels = (1 << bits) - 1
    scale = _f16((hi - lo) / levels)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((x - lo) / safe), 0, levels)
    return q * scale + lo


def kivi_quantize(x: torch.Tensor, bits: int, per_channel: bool, group: int = 32) -> tuple[torch.Tensor, int]:
    """KIVI coding of x [L, G, M, Dh]: (x_hat, bytes).

    per_channel (keys): groups of `group` consecutive tokens, one scale/min per channel per group.
    per token (values): groups of `group` consecutive channels, one scale/min per token per group.
    """
    L, G, M, Dh = x.shape
    x = x.float()
    out = torch.empty_like(x)
    n_groups = 0
    axis_len = M if per_channel else Dh
    for a in range(0, axis_len, group):
        b = min(a + group, axis_len)
        if per_channel:
            out[:, :, a:b] = _asym_quantize(x[:, :, a:b], bits, dim=2)
            n_groups += Dh  # one (scale, min) per channel for this token group
        else:
            out[..., a:b] = _asym_quantize(x[..., a:b], bits, dim=3)
            n_groups += M  # one (scale, min) per token for this channel group
    if M == 0:
        return out, 0
    per_block = packed_bytes(M * Dh, bits) + 4 * n_groups  # per (layer, head)
    return out, L * G * per_block


def kivi(keys: torch.Tensor, values: torch.Tensor, bits: int, group: int = 32,
         sink: int = SINK, recent: int = RECENT) -> Result:
    L, G, T, Dh = keys.shape
    s, t = split(T, sink, recent)
    nbytes = _exact_bytes(L, G, s + t, Dh)
    k_mid, kb = kivi_quantize(keys[:, :, s:T - t], bits, per_channel=True, group=group)
    v_mid, vb = kivi_quantize(values[:, :, s:T - t], bits, per_channel=False, group=group)
    return (_with_exact_ends(keys, k_mid, s, t), _with_exact_ends(values, v_mid, s, t), None,
            nbytes + kb + vb)


# ---- H2O ------------------------------------------------------------------------------------

def index_bytes(n_mid: int, n_kept: int) -> int:
    """Bytes to say which of n_mid middle tokens are kept: a bitmap or u16 positions."""
    return min(math.ceil(n_mid / 8), 2 * n_kept)


def h2o_keep(scores: torch.Tensor, fraction: float, sink: int = SINK, recent: int = RECENT) -> torch.Tensor:
    """Keep mask [L, G, T] from accumulated attention scores [L, G, T].

    round(fraction * T) tokens are kept per (layer, head), at least sink + recent: the exact
    ends plus the middle tokens with the largest scores (ties go to the earlier token).
    """
    L, G, T = scores.shape
    s, t = split(T, sink, recent)
    budget = min(T, max(s + t, round(fraction * T)))
    keep = torch.zeros(L, G, T, dtype=torch.bool)
    keep[:, :, :s] = True
    keep[:, :, T - t:] = True
    n_heavy = budget - s - t
    if n_heavy > 0:
        mid = scores[:, :, s:T - t].double()
        idx = torch.topk(mid, n_heavy, dim=-1, sorted=False).indices + s
        keep.scatter_(2, idx, True)
    return keep


def h2o(keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, fraction: float,
        sink: int = SINK, recent: int = RECENT) -> Result:
    """Heavy-hitter eviction; scores [L, G, T] is the attention each token received."""
    L, G, T, Dh = keys.shape
    keep = h2o_keep(scores, fraction, sink, recent)
    s, t = split(T, sink, recent)
    n_mid = T - s - t
    kept = keep.sum(-1)  # [L, G]
    nbytes = 0
    for n in kept.flatten().tolist():
        nbytes += _exact_bytes(1, 1, n, Dh) + index_bytes(n_mid, n - s - t)
    mask = keep[..., None].float()
    return _f16(keys) * mask, _f16(values) * mask, keep, nbytes


def attention_scores_hf(model, ids: torch.Tensor) -> torch.Tensor:
    """H2O scores [L, G, T] for a prompt ids [T]: attention received by each key, summed over
    all (causal) prompt queries and over the query heads that share its KV head.

    Runs the transformers model with eager attention and reduces each layer's attention
    weights as they are produced (a forward hook), so only one layer's [H, T, T] lives at once.
    """
    cfg = model.config
    H, G = cfg.num_attention_heads, cfg.num_key_value_heads
    layers = model.model.layers
    out: list[torch.Tensor | None] = [None] * len(layers)

    def hook(i):
        def f(_module, _args, result):
            w = result[1]  # [B, H, T, T]
            if w is None:
                raise RuntimeError("attention weights are not returned; eager attention is required")
            out[i] = w[0].float().sum(1).view(G, H // G, -1).sum(1).cpu()  # [G, T]
        return f

    old = cfg._attn_implementation
    handles = [layer.self_attn.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        cfg._attn_implementation = "eager"
        with torch.no_grad():
            model(input_ids=ids[None].to(model.device), use_cache=False)
    finally:
        cfg._attn_implementation = old
        for h in handles:
            h.remove()
    return torch.stack(out)
