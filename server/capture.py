"""State capture: the anchor model's forward pass written out, with every intermediate named.

The math is the model's own: its weights and biases, its RMSNorm epsilon, the cos/sin tables
of its own rotary embedding module (whatever RoPE type and scaling its config names),
grouped-query attention and the gated MLP. Each intermediate is handed to a recorder under
its TransformerLens hook-point name (`blocks.{l}.attn.hook_pattern`, `blocks.{l}.hook_resid_post`,
...), so a user of that library recognises every state; `STATES` lists them with shapes and
meanings (docs/capture.md renders the same table).

A capture keeps three things for a selection of layers, query heads and a token range:

- the raw states asked for, sliced to the selection (nothing else is kept, since attention
  patterns alone grow as layers x heads x T^2);
- aggregates, always: per token the attention it receives and its activation norm, the
  tokens at or above a percentile of each (peaks), and per layer and head a summary of
  the attention pattern;
- the trajectory: each component's operations in the order they ran, with the RMS of
  every state they produced.

Shapes: T context tokens, H query heads, G KV heads, Dh head dim, Dm model dim, F MLP dim,
V vocabulary. Raw states are per single sequence (no batch axis), token axis first where
TransformerLens puts it there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from hpi.protocol.holo import Holo, save_hologram
from hpi.errors import (BadPercentile, BadRange, UnknownActivation, UnknownHeads, UnknownLayers, UnknownStates, listed,
                        quoted)
from hpi.llama import head_dim
from hpi.models import LoadedModel
from hpi.rope import rotate

# Axis letters of a state's shape: "t" context token (a query, for attention), "k" key
# token, "h" query head, "g" KV head, and feature axes "d" (Dh), "m" (Dm), "f" (F), "v" (V).
AXIS_SYMBOL = {"t": "T", "k": "T", "h": "H", "g": "G", "d": "Dh", "m": "Dm", "f": "F", "v": "V"}


@dataclass(frozen=True)
class StateType:
    axes: str
    component: str  # "ln1", "attn", "ln2", "mlp", "" (the block's residual), or a model-level one
    operation: str  # the step of the trajectory that produces it
    meaning: str
    block: bool = True  # one per layer (else once per model)
    derived: bool = False  # computed from other states by the recorder, not by the forward
    masked: bool = False  # holds -inf where the causal mask hides a key

    @property
    def shape(self) -> str:
        return "[" + ", ".join(AXIS_SYMBOL[a] for a in self.axes) + "]"


_S = StateType
STATES: dict[str, StateType] = {
    "hook_embed": _S("tm", "embed", "token_embedding", "token embeddings: the residual stream before block 0", block=False),
    "hook_resid_pre": _S("tm", "", "input_reception", "residual stream entering the block"),
    "ln1.hook_scale": _S("t", "ln1", "rms_normalization", "RMS of the block input, sqrt(mean(x^2) + eps)"),
    "ln1.hook_normalized": _S("tm", "ln1", "rms_normalization", "block input divided by its RMS, before the norm's gain (the gain multiplies it into the Q/K/V input)"),
    "attn.hook_q": _S("thd", "attn", "qkv_projection", "queries, before RoPE (q_proj output)"),
    "attn.hook_k": _S("tgd", "attn", "qkv_projection", "keys, before RoPE (k_proj output); one per KV head"),
    "attn.hook_v": _S("tgd", "attn", "qkv_projection", "values (v_proj output); one per KV head"),
    "attn.hook_rot_q": _S("thd", "attn", "rotary_position_embedding", "queries after RoPE"),
    "attn.hook_rot_k": _S("tgd", "attn", "rotary_position_embedding", "keys after RoPE: what the KV cache holds"),
    "attn.hook_attn_scores": _S("htk", "attn", "attention_score_computation", "scaled scores q.k / sqrt(Dh) before softmax; -inf where the causal mask hides a key", masked=True),
    "attn.hook_pattern": _S("htk", "attn", "softmax", "attention weights: each query's softmax over its keys (rows sum to 1)"),
    "attn.hook_z": _S("thd", "attn", "value_aggregation", "attended values: pattern @ V per query head, before the output projection"),
    "attn.hook_result": _S("thm", "attn", "output_projection", "each head's contribution to the residual stream (z_h @ W_O[h]), without o_proj's bias; computed only when asked for"),
    "attn.result_norm": _S("th", "attn", "output_projection", "L2 norm of each head's contribution (of attn.hook_result, without computing it)"),
    "hook_attn_out": _S("tm", "attn", "output_projection", "attention output: o_proj of all heads"),
    "hook_resid_mid": _S("tm", "", "residual_addition", "residual stream after the attention: resid_pre + attn_out"),
    "ln2.hook_scale": _S("t", "ln2", "rms_normalization", "RMS of resid_mid"),
    "ln2.hook_normalized": _S("tm", "ln2", "rms_normalization", "resid_mid divided by its RMS, before the gain"),
    "mlp.hook_pre": _S("tf", "mlp", "gate_projection", "MLP gate pre-activation (gate_proj output)"),
    "mlp.hook_pre_linear": _S("tf", "mlp", "up_projection", "MLP linear branch (up_proj output)"),
    "mlp.hook_post": _S("tf", "mlp", "gated_activation", "MLP hidden activation: act(gate) * up, the down_proj input"),
    "hook_mlp_out": _S("tm", "mlp", "down_projection", "MLP output (down_proj)"),
    "hook_resid_post": _S("tm", "", "residual_addition", "residual stream leaving the block: resid_mid + mlp_out"),
    "attn.entropy": _S("ht", "attn", "", "entropy of each query's attention weights in nats (0: one key; log(q+1): uniform)", derived=True),
    "attn.received": _S("ht", "attn", "", "attention a token receives: the mean weight on it over the queries in the range that can see it", derived=True),
    "norm.resid_pre": _S("t", "", "", "L2 norm of hook_resid_pre per token", derived=True),
    "norm.attn_out": _S("t", "attn", "", "L2 norm of hook_attn_out per token", derived=True),
    "norm.resid_mid": _S("t", "", "", "L2 norm of hook_resid_mid per token", derived=True),
    "norm.mlp_post": _S("t", "mlp", "", "L2 norm of mlp.hook_post per token", derived=True),
    "norm.mlp_out": _S("t", "mlp", "", "L2 norm of hook_mlp_out per token", derived=True),
    "norm.resid_post": _S("t", "", "", "L2 norm of hook_resid_post per token", derived=True),
    "ln_final.hook_scale": _S("t", "ln_final", "rms_normalization", "RMS of the last block's output", block=False),
    "ln_final.hook_normalized": _S("tm", "ln_final", "rms_normalization", "final residual divided by its RMS, before the gain", block=False),
    "logits": _S("tv", "unembed", "unembedding", "next-token logits (computed only when asked for: the LM head is the largest matrix)", block=False),
}
# norm.* states: the L2 norm of which state
NORM_OF = {"norm.resid_pre": "hook_resid_pre", "norm.attn_out": "hook_attn_out", "norm.resid_mid": "hook_resid_mid",
           "norm.mlp_post": "mlp.hook_post", "norm.mlp_out": "hook_mlp_out", "norm.resid_post": "hook_resid_post"}
# States whose per-token L2 norm can rank tokens by activation (a token axis first, features after).
ACTIVATIONS = tuple(n for n, s in STATES.items()
                    if s.block and not s.derived and s.axes[0] == "t" and s.axes[-1] in "dmf")
# States the forward computes only when they are asked for: they cost memory (T x H x Dm,
# T x V) or time (the LM head) that nothing else needs.
ON_REQUEST = frozenset({"attn.hook_result", "logits"})
HEAD_SUMMARY = {
    "entropy": "mean entropy of the queries' attention weights (nats)",
    "max_weight": "mean largest weight of a query",
    "sink": "mean weight on position 0 (the attention sink)",
    "self": "mean weight of a query on itself",
    "previous": "mean weight on the previous token (queries after position 0)",
    "distance": "mean attended distance: sum over keys of weight x (query - key) positions",
    "out_norm": "mean L2 norm of the head's contribution to the residual (attn.result_norm)",
}


@dataclass(frozen=True)
class Dims:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    model: int
    mlp: int
    vocab: int

    @classmethod
    def of(cls, config) -> Dims:
        return cls(config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, head_dim(config),
                   config.hidden_size, config.intermediate_size, config.vocab_size)


@dataclass(frozen=True)
class Selection:
    """What to keep of a forward pass over `n_tokens` tokens; build it with `select`."""
    n_tokens: int
    layers: tuple[int, ...]
    heads: tuple[int, ...]  # query heads
    kv_heads: tuple[int, ...]  # the KV heads those query heads read
    states: tuple[str, ...]  # raw states to return
    start: int
    end: int
    percentile: float
    activation: str

    def extent(self, axis: str, dims: Dims) -> int:
        return {"t": self.end - self.start, "k": self.end, "h": len(self.heads), "g": len(self.kv_heads),
                "d": dims.head_dim, "m": dims.model, "f": dims.mlp, "v": dims.vocab}[axis]


def _ranges(values) -> str:
    return f"{values[0]}..{values[-1]}" if values else "none"


def select(dims: Dims, n_tokens: int, layers=None, heads=None, states=(), start: int = 0, end: int | None = None,
           percentile: float = 90.0, activation: str = "mlp.hook_post") -> Selection:
    """Validate a selection; unknown layers, heads or state types are 422 naming the valid ones."""
    all_layers, all_heads = list(range(dims.layers)), list(range(dims.heads))
    layers = sorted(set(all_layers if layers is None else layers))
    heads = sorted(set(all_heads if heads is None else heads))
    bad = [x for x in layers if x not in range(dims.layers)]
    if bad or not layers:
        raise UnknownLayers(f"unknown layers {listed(bad)}: the model has layers {_ranges(all_layers)}")
    bad = [x for x in heads if x not in range(dims.heads)]
    if bad or not heads:
        raise UnknownHeads(f"unknown heads {listed(bad)}: the model has query heads {_ranges(all_heads)} "
                           "(KV heads are chosen through them)")
    bad = [s for s in states if s not in STATES]
    if bad:
        raise UnknownStates(f"unknown state types {listed(bad)}; valid: {', '.join(STATES)}")
    if activation not in ACTIVATIONS:
        raise UnknownActivation(f"unknown activation {quoted(activation)}; valid: {', '.join(ACTIVATIONS)}")
    end = n_tokens if end is None else end
    if not 0 <= start < end <= n_tokens:
        raise BadRange(f"token range [{start}, {end}) is not inside the context's "
                       f"{n_tokens} tokens (0 <= start < end <= {n_tokens})")
    if not 0 <= percentile <= 100:
        raise BadPercentile(f"percentile {percentile} is not in [0, 100]")
    group = dims.heads // dims.kv_heads
    kv_heads = sorted({h // group for h in heads})
    return Selection(n_tokens, tuple(layers), tuple(heads), tuple(kv_heads), tuple(dict.fromkeys(states)),
                     start, end, float(percentile), activation)


def elements(dims: Dims, sel: Selection) -> dict[str, int]:
    """Element count of each raw state asked for, over all selected layers."""
    out = {}
    for name in sel.states:
        s = STATES[name]
        out[name] = math.prod(sel.extent(a, dims) for a in s.axes) * (len(sel.layers) if s.block else 1)
    return out


# Bytes per element of the answer: f32 in a .holo file; in JSON at most 17 characters
# (json_values: "-1.23456789e-05, ") and 4 of brackets when a row holds one element.
BYTES_PER_ELEMENT = {"holo": 4, "json": 21}


def estimate_bytes(dims: Dims, sel: Selection, fmt: str) -> int:
    """An upper estimate of the answer's size, known before the forward pass runs."""
    raw = sum(elements(dims, sel).values()) * BYTES_PER_ELEMENT[fmt]
    tokens = (sel.end - sel.start) * 200  # position, id, text piece, two aggregates, peaks
    heads = len(sel.layers) * len(sel.heads) * len(HEAD_SUMMARY) * 22
    trajectory = len(sel.layers) * (len(STATES) + 16) * 60
    return raw + tokens + heads + trajectory + 2048


Visit = Callable[[int | None, str, torch.Tensor], None]


def _rms_norm(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMS [T], x / RMS [T, Dm]), computed as transformers' LlamaRMSNorm does (x * rsqrt)."""
    inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # [T, 1]
    return 1.0 / inv[:, 0], x * inv


def _linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if module.bias is None else module.bias.float()
    return F.linear(x, module.weight.float(), bias)


@torch.no_grad()
def forward(lm: LoadedModel, ids: list[int], visit: Visit, depth: int | None = None,
            extra: frozenset[str] = frozenset()) -> None:
    """Run the model over `ids` from position 0, handing each named state to `visit(layer, name, x)`
    in the order it is computed (layer None for model-level states).

    `depth` blocks run (all by default) and the final norm only after the last block; states of
    ON_REQUEST are computed only when named in `extra`. Everything is float32, whatever the
    model's dtype.
    """
    model, cfg = lm.model, lm.model.config
    d = Dims.of(cfg)
    H, G, Dh, T = d.heads, d.kv_heads, d.head_dim, len(ids)
    group = H // G  # query heads per KV head: head j reads KV head j // group
    eps = cfg.rms_norm_eps
    act = ACT2FN[cfg.hidden_act]
    dev = model.device
    tokens = torch.tensor(ids, device=dev)
    positions = torch.arange(T, device=dev)

    x = model.model.embed_tokens.weight[tokens].float()  # [T, Dm]
    visit(None, "hook_embed", x)
    # The model's own rotary module knows its RoPE type, scaling and attention factor.
    cos, sin = model.model.rotary_emb(x[None], positions[None])  # [1, T, Dh] each
    cos, sin = cos[0].float(), sin[0].float()  # [T, Dh]
    hidden = torch.ones(T, T, dtype=torch.bool, device=dev).triu(1)  # [T, T]: key after query
    layers = model.model.layers[:d.layers if depth is None else depth]
    for i, layer in enumerate(layers):
        def at(name: str, value: torch.Tensor) -> None:
            visit(i, name, value)

        attn, mlp = layer.self_attn, layer.mlp
        at("hook_resid_pre", x)
        scale, normed = _rms_norm(x, eps)
        at("ln1.hook_scale", scale)
        at("ln1.hook_normalized", normed)
        h = layer.input_layernorm.weight.float() * normed  # [T, Dm]
        q = _linear(attn.q_proj, h).view(T, H, Dh)
        k = _linear(attn.k_proj, h).view(T, G, Dh)
        v = _linear(attn.v_proj, h).view(T, G, Dh)
        at("attn.hook_q", q)
        at("attn.hook_k", k)
        at("attn.hook_v", v)
        rq = rotate(q.transpose(0, 1), cos, sin)  # [H, T, Dh]
        rk = rotate(k.transpose(0, 1), cos, sin)  # [G, T, Dh]
        at("attn.hook_rot_q", rq.transpose(0, 1))
        at("attn.hook_rot_k", rk.transpose(0, 1))
        # Scale after the product, as transformers' eager attention does (same rounding).
        scores = (rq.view(G, group, T, Dh) @ rk[:, None].transpose(-1, -2)) * attn.scaling  # [G, H/G, T, T]
        scores = scores.reshape(H, T, T).masked_fill(hidden, float("-inf"))
        at("attn.hook_attn_scores", scores)
        pattern = torch.softmax(scores, dim=-1)  # [H, T, T]
        at("attn.hook_pattern", pattern)
        z = (pattern.view(G, group, T, T) @ v.transpose(0, 1)[:, None]).reshape(H, T, Dh).transpose(0, 1)  # [T, H, Dh]
        at("attn.hook_z", z)
        w_o = attn.o_proj.weight.float().view(d.model, H, Dh)  # [Dm, H, Dh]
        if "attn.hook_result" in extra:
            at("attn.hook_result", torch.einsum("thd,mhd->thm", z, w_o))  # [T, H, Dm]
        # |z_h W_O[h]^T|^2 = z_h^T (W_O[h]^T W_O[h]) z_h: the norms without the [T, H, Dm] tensor
        gram = torch.einsum("mhd,mhe->hde", w_o, w_o)  # [H, Dh, Dh]
        at("attn.result_norm", torch.einsum("thd,hde,the->th", z, gram, z).clamp(min=0).sqrt())  # [T, H]
        attn_out = _linear(attn.o_proj, z.reshape(T, H * Dh))  # [T, Dm]
        at("hook_attn_out", attn_out)
        x = x + attn_out
        at("hook_resid_mid", x)
        scale, normed = _rms_norm(x, eps)
        at("ln2.hook_scale", scale)
        at("ln2.hook_normalized", normed)
        h = layer.post_attention_layernorm.weight.float() * normed
        gate, up = _linear(mlp.gate_proj, h), _linear(mlp.up_proj, h)  # [T, F] each
        at("mlp.hook_pre", gate)
        at("mlp.hook_pre_linear", up)
        post = act(gate) * up  # [T, F]
        at("mlp.hook_post", post)
        mlp_out = _linear(mlp.down_proj, post)  # [T, Dm]
        at("hook_mlp_out", mlp_out)
        x = x + mlp_out
        at("hook_resid_post", x)
    if len(layers) < d.layers:
        return
    scale, normed = _rms_norm(x, eps)
    visit(None, "ln_final.hook_scale", scale)
    visit(None, "ln_final.hook_normalized", normed)
    if "logits" in extra:
        visit(None, "logits", _linear(model.lm_head, model.model.norm.weight.float() * normed))  # [T, V]


@dataclass
class Capture:
    """What a capture keeps (see the module docstring); arrays are numpy, positions absolute."""
    ids: list[int]
    sel: Selection
    tensors: dict[str, np.ndarray]  # raw states by TransformerLens name, e.g. "blocks.3.attn.hook_z"
    attention_received: np.ndarray  # [end - start], mean over the selected layers and heads
    activation_norm: np.ndarray  # [end - start], mean over the selected layers
    heads: dict[str, np.ndarray]  # HEAD_SUMMARY key -> [layers, heads]
    trajectory: list[dict] = field(default_factory=list)

    def peaks(self, values: np.ndarray) -> tuple[float, list[int]]:
        """The percentile threshold and the positions at or above it, strongest first."""
        threshold = float(np.percentile(values, self.sel.percentile))
        order = np.argsort(-values, kind="stable")
        return threshold, [int(self.sel.start + i) for i in order if values[i] >= threshold]

    def summary(self) -> dict:
        """The aggregates as JSON-ready values (no raw tensors)."""
        s = self.sel
        a_thr, a_pos = self.peaks(self.attention_received)
        m_thr, m_pos = self.peaks(self.activation_norm)
        return {
            "n_tokens": s.n_tokens, "range": [s.start, s.end], "layers": list(s.layers), "heads": list(s.heads),
            "kv_heads": list(s.kv_heads),
            "tokens": {"positions": list(range(s.start, s.end)), "ids": self.ids[s.start:s.end],
                       "attention_received": self.attention_received.tolist(),
                       "activation_norm": self.activation_norm.tolist()},
            "peaks": {"percentile": s.percentile,
                      "attention": {"threshold": a_thr, "positions": a_pos},
                      "activation": {"state": s.activation, "threshold": m_thr, "positions": m_pos}},
            "head_summary": {k: json_values(v) for k, v in self.heads.items()},
            "trajectory": self.trajectory,
        }

    def holo_bytes(self, model_id: str, tokenizer_id: str) -> bytes:
        """The capture as a `.holo` container of kind captured_state (protocol/SPEC.md, kind 3)."""
        s = self.sel
        a_thr, a_pos = self.peaks(self.attention_received)
        m_thr, m_pos = self.peaks(self.activation_norm)
        meta = {"format": "hpi.captured_state/1", "model_id": model_id, "tokenizer_id": tokenizer_id,
                "n_tokens": s.n_tokens, "range": [s.start, s.end], "layers": list(s.layers),
                "heads": list(s.heads), "kv_heads": list(s.kv_heads), "states": list(s.states),
                "percentile": s.percentile, "activation": s.activation,
                "thresholds": {"attention": a_thr, "activation": m_thr}, "trajectory": self.trajectory}
        tensors = {"tokens.ids": np.asarray(self.ids[s.start:s.end], dtype="<i4"),
                   "tokens.attention_received": self.attention_received.astype("<f4"),
                   "tokens.activation_norm": self.activation_norm.astype("<f4"),
                   "peaks.attention": np.asarray(a_pos, dtype="<i4"),
                   "peaks.activation": np.asarray(m_pos, dtype="<i4"),
                   **{f"heads.{k}": v.astype("<f4") for k, v in self.heads.items()},
                   **{k: v.astype("<f4") for k, v in self.tensors.items()}}
        return save_hologram(Holo("captured_state", meta, tensors))


def json_values(a: np.ndarray) -> list:
    """Nested lists of float32 values for JSON: 9 significant digits (exactly the float32 again when
    read back, and at most 17 characters with the separator), null for NaN and infinities."""
    flat = [float(f"{v:.9g}") if math.isfinite(v) else None for v in np.asarray(a, dtype=np.float32).ravel().tolist()]
    return np.array(flat, dtype=object).reshape(np.shape(a)).tolist()


class _Recorder:
    """Receives the forward's states; keeps the selected raw ones and builds the aggregates."""

    def __init__(self, dims: Dims, sel: Selection, device: torch.device):
        self.dims, self.sel = dims, sel
        self.layer_row = {layer: r for r, layer in enumerate(sel.layers)}
        # None: every head is selected, and an index_select would only copy
        self.head_index = None if len(sel.heads) == dims.heads else torch.tensor(sel.heads, device=device)
        self.kv_index = None if len(sel.kv_heads) == dims.kv_heads else torch.tensor(sel.kv_heads, device=device)
        # entries of an [Hs, n, end] attention state that the causal mask leaves visible: query q sees q + 1 keys
        self.visible = len(sel.heads) * sum(q + 1 for q in range(sel.start, sel.end))
        n, L, Hs = sel.end - sel.start, len(sel.layers), len(sel.heads)
        self.q_pos = torch.arange(sel.start, sel.end, device=device)  # [n] query positions of the range
        self.wanted = set(sel.states)
        self.tensors: dict[str, np.ndarray] = {}
        self.received = torch.zeros(n, device=device)
        self.activation = torch.zeros(n, device=device)
        self.heads = {k: np.zeros((L, Hs), dtype=np.float32) for k in HEAD_SUMMARY}
        self.trajectory: list[dict] = []

    def _slice(self, spec: StateType, x: torch.Tensor) -> torch.Tensor:
        s = self.sel
        for axis, letter in enumerate(spec.axes):
            if letter == "t":
                x = x.narrow(axis, s.start, s.end - s.start)
            elif letter == "k":
                x = x.narrow(axis, 0, s.end)
            elif letter == "h" and self.head_index is not None:
                x = x.index_select(axis, self.head_index)
            elif letter == "g" and self.kv_index is not None:
                x = x.index_select(axis, self.kv_index)
        return x

    def _keep(self, layer: int | None, name: str, x: torch.Tensor) -> None:
        if name in self.wanted:
            key = name if layer is None else f"blocks.{layer}.{name}"
            self.tensors[key] = x.detach().float().cpu().numpy().copy()

    def _trace(self, layer: int | None, spec: StateType, name: str, x: torch.Tensor) -> None:
        """Extend the trajectory: consecutive states of one operation share an entry."""
        if spec.masked:  # over the visible entries only
            rms = torch.linalg.vector_norm(x.nan_to_num(neginf=0.0)) / math.sqrt(self.visible)
        else:
            rms = torch.linalg.vector_norm(x) / math.sqrt(x.numel())
        prefix = "" if layer is None else f"blocks.{layer}."
        component = (prefix + spec.component).rstrip(".")
        last = self.trajectory[-1] if self.trajectory else None
        if last is None or (last["component"], last["operation"]) != (component, spec.operation):
            last = {"component": component, "operation": spec.operation, "rms": {}}
            self.trajectory.append(last)
        last["rms"][prefix + name] = float(rms)

    def __call__(self, layer: int | None, name: str, x: torch.Tensor) -> None:
        if layer is not None and layer not in self.layer_row:
            return
        spec = STATES[name]
        x = self._slice(spec, x)
        self._trace(layer, spec, name, x)
        self._keep(layer, name, x)
        if layer is None:
            return
        row = self.layer_row[layer]
        for derived, source in NORM_OF.items():
            if source == name:
                self._keep(layer, derived, x.norm(dim=-1))  # [n]
        if name == self.sel.activation:
            self.activation += x.flatten(1).norm(dim=-1) / len(self.sel.layers)
        if name == "attn.hook_pattern":
            self._pattern(layer, row, x)
        elif name == "attn.result_norm":
            self.heads["out_norm"][row] = x.mean(0).cpu().numpy()

    def _pattern(self, layer: int, row: int, p: torch.Tensor) -> None:
        """Aggregates of one layer's attention weights p [Hs, n, end] (queries of the range)."""
        s, q = self.sel, self.q_pos
        n = s.end - s.start
        entropy = -torch.special.xlogy(p, p).sum(-1)  # [Hs, n]
        self._keep(layer, "attn.entropy", entropy)
        keys = torch.arange(s.end, device=p.device, dtype=p.dtype)
        distance = q - p @ keys  # [Hs, n]: sum_k p (q - k), as rows sum to 1
        rows = torch.arange(n, device=p.device)
        summary = {"entropy": entropy.mean(1), "max_weight": p.max(-1).values.mean(1), "sink": p[:, :, 0].mean(1),
                   "self": p[:, rows, q].mean(1), "distance": distance.mean(1)}
        after = q >= 1
        summary["previous"] = (p[:, rows[after], q[after] - 1].mean(1) if after.any()
                               else torch.full((p.shape[0],), float("nan"), device=p.device))
        for k, v in summary.items():
            self.heads[k][row] = v.cpu().numpy()
        # Key k in the range is seen by the range's queries q >= k: end - k of them.
        seen_by = (s.end - torch.arange(s.start, s.end, device=p.device)).float()  # [n]
        received = p[:, :, s.start:s.end].sum(1) / seen_by  # [Hs, n]
        self._keep(layer, "attn.received", received)
        self.received += received.mean(0) / len(s.layers)


def capture(lm: LoadedModel, ids: list[int], sel: Selection) -> Capture:
    """Run the forward over `ids` and keep what `sel` asks for (see the module docstring)."""
    dims = Dims.of(lm.model.config)
    rec = _Recorder(dims, sel, lm.model.device)
    model_level = any(not STATES[n].block for n in sel.states)
    depth = None if model_level else max(sel.layers) + 1  # later blocks cannot change what was asked
    forward(lm, ids, rec, depth=depth, extra=ON_REQUEST & set(sel.states))
    return Capture(list(ids), sel, rec.tensors, rec.received.cpu().numpy(), rec.activation.cpu().numpy(),
                   rec.heads, rec.trajectory)
