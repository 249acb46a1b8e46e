"""State capture (server/capture.py) against transformers' own forward, on the tiny model and SmolLM2."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from hpi.protocol.holo import load_hologram
from hpi.errors import ApiError
from hpi.capture import (ACTIVATIONS, BYTES_PER_ELEMENT, HEAD_SUMMARY, STATES, Dims, capture,
                            elements, estimate_bytes, forward, select)

TEXT = "The anchor keeps the exact KV cache; the page decodes from a hologram of it."


@contextmanager
def eager(lm):
    """The model with transformers' eager attention (the one that can return its weights)."""
    before = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        yield lm.model
    finally:
        lm.model.set_attn_implementation(before)


def ids_of(lm, text=TEXT):
    return lm.tokenizer(text)["input_ids"]


def capture_all(lm, ids, **kw):
    dims = Dims.of(lm.config)
    return capture(lm, ids, select(dims, len(ids), states=list(STATES), **kw))


def check_against_transformers(lm, ids, atol_logits):
    """Attention weights, Q/K/V, block inputs and logits equal the transformers model's own."""
    seen = {}
    hooks = []
    for i, layer in enumerate(lm.model.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            module = getattr(layer.self_attn, name)
            hooks.append(module.register_forward_hook(
                lambda m, args, out, key=(i, name): seen.__setitem__(key, (args[0][0], out[0]))))
    try:
        with eager(lm) as model, torch.no_grad():
            out = model(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    cap = capture_all(lm, ids)
    d = Dims.of(lm.config)
    T = len(ids)
    for i in range(d.layers):
        got = lambda name: torch.from_numpy(cap.tensors[f"blocks.{i}.{name}"])  # noqa: E731
        assert (got("attn.hook_pattern") - out.attentions[i][0]).abs().max() <= 1e-5
        assert torch.allclose(got("attn.hook_q"), seen[i, "q_proj"][1].view(T, d.heads, d.head_dim), atol=1e-5)
        assert torch.allclose(got("attn.hook_k"), seen[i, "k_proj"][1].view(T, d.kv_heads, d.head_dim), atol=1e-5)
        assert torch.allclose(got("attn.hook_v"), seen[i, "v_proj"][1].view(T, d.kv_heads, d.head_dim), atol=1e-5)
        assert torch.allclose(got("attn.hook_z").reshape(T, -1), seen[i, "o_proj"][0], atol=1e-5)
        assert torch.allclose(got("hook_attn_out"), seen[i, "o_proj"][1], atol=1e-5)
        assert torch.allclose(got("hook_resid_pre"), out.hidden_states[i][0], atol=1e-4)
    assert (torch.from_numpy(cap.tensors["logits"]) - out.logits[0]).abs().max() <= atol_logits
    return cap


def test_capture_equals_transformers_on_the_tiny_model(tiny):
    cap = check_against_transformers(tiny, ids_of(tiny), atol_logits=1e-4)
    # the last block's output, normalised, is what transformers' final norm sees
    assert np.isfinite(cap.tensors["ln_final.hook_normalized"]).all()


@pytest.mark.real_model
def test_capture_equals_transformers_on_smollm(smollm):
    ids = smollm.chat_ids([{"role": "user", "content": "Name three colours."}])
    check_against_transformers(smollm, ids, atol_logits=1e-3)


def test_every_state_type_is_recorded_with_its_documented_shape(tiny):
    d = Dims.of(tiny.config)
    ids = ids_of(tiny)
    T = len(ids)
    seen = []
    forward(tiny, ids, lambda layer, name, x: seen.append((layer, name, tuple(x.shape))),
            extra=frozenset({"attn.hook_result", "logits"}))
    extent = {"t": T, "k": T, "h": d.heads, "g": d.kv_heads, "d": d.head_dim, "m": d.model, "f": d.mlp,
              "v": d.vocab}
    computed = {name for _, name, _ in seen}
    assert computed == {n for n, s in STATES.items() if not s.derived}
    for layer, name, shape in seen:
        s = STATES[name]
        assert (layer is not None) == s.block, name
        assert shape == tuple(extent[a] for a in s.axes), name
    assert len(STATES) >= 20 and "hook_resid_post" in ACTIVATIONS
    # derived states come out of a capture, with their documented shapes too
    cap = capture_all(tiny, ids)
    for name, s in STATES.items():
        if s.derived:
            assert cap.tensors[f"blocks.1.{name}"].shape == tuple(extent[a] for a in s.axes), name


def test_derived_states_and_aggregates_follow_from_the_raw_ones(tiny):
    ids = ids_of(tiny)
    cap = capture_all(tiny, ids, start=3, end=20, heads=[1, 2], percentile=75)
    T = lambda name, layer=0: cap.tensors[f"blocks.{layer}.{name}"].astype(np.float64)  # noqa: E731
    p = T("attn.hook_pattern")  # [2 heads, 17 queries, 20 keys]
    assert p.shape == (2, 17, 20) and np.allclose(p.sum(-1), 1, atol=1e-5)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(p > 0, p * np.log(p), 0), axis=-1)
    assert np.allclose(T("attn.entropy"), entropy, atol=1e-5)
    q = np.arange(3, 20)
    received = np.array([[p[h, q >= k, k].mean() for k in range(3, 20)] for h in range(2)])
    assert np.allclose(T("attn.received"), received, atol=1e-6)
    assert np.allclose(T("attn.result_norm"), np.linalg.norm(T("attn.hook_result"), axis=-1), rtol=1e-4)
    for derived, source in [("norm.resid_post", "hook_resid_post"), ("norm.mlp_post", "mlp.hook_post")]:
        assert np.allclose(T(derived), np.linalg.norm(T(source), axis=-1), rtol=1e-5)
    # heads 1 and 2 read KV heads 0 and 1 (2 query heads per KV head)
    assert cap.sel.kv_heads == (0, 1) and T("attn.hook_k").shape == (17, 2, Dims.of(tiny.config).head_dim)
    # aggregates: means over the selected layers and heads
    both = [cap.tensors[f"blocks.{layer}.attn.received"] for layer in (0, 1)]
    assert np.allclose(cap.attention_received, np.mean(both, axis=(0, 1)), atol=1e-6)
    acts = [np.linalg.norm(cap.tensors[f"blocks.{layer}.mlp.hook_post"], axis=-1) for layer in (0, 1)]
    assert np.allclose(cap.activation_norm, np.mean(acts, axis=0), rtol=1e-5)
    assert np.allclose(cap.heads["entropy"][0], entropy.mean(1), atol=1e-5)
    assert np.allclose(cap.heads["sink"][0], p[:, :, 0].mean(1), atol=1e-6)
    assert np.allclose(cap.heads["self"][0], p[:, np.arange(17), q].mean(1), atol=1e-6)
    assert np.allclose(cap.heads["previous"][0], p[:, np.arange(17), q - 1].mean(1), atol=1e-6)
    assert set(cap.heads) == set(HEAD_SUMMARY) and cap.heads["out_norm"].shape == (2, 2)
    summary = cap.summary()
    peaks = summary["peaks"]["attention"]
    threshold = np.percentile(cap.attention_received, 75)
    assert peaks["threshold"] == pytest.approx(threshold)
    assert sorted(peaks["positions"]) == [3 + i for i, v in enumerate(cap.attention_received) if v >= threshold]
    values = [cap.attention_received[pos - 3] for pos in peaks["positions"]]
    assert values == sorted(values, reverse=True)


def test_a_selection_is_a_slice_of_the_full_capture(tiny):
    ids = ids_of(tiny)
    full = capture_all(tiny, ids)
    part = capture_all(tiny, ids, layers=[1], heads=[3], start=5, end=12)
    assert {k.split(".", 2)[1] for k in part.tensors if k.startswith("blocks.")} == {"1"}
    f = lambda name: full.tensors[f"blocks.1.{name}"]  # noqa: E731
    p = lambda name: part.tensors[f"blocks.1.{name}"]  # noqa: E731
    assert np.array_equal(p("attn.hook_pattern"), f("attn.hook_pattern")[[3], 5:12, :12])
    assert np.array_equal(p("attn.hook_q"), f("attn.hook_q")[5:12, [3]])
    assert np.array_equal(p("attn.hook_rot_k"), f("attn.hook_rot_k")[5:12, [1]])
    assert np.array_equal(p("hook_resid_post"), f("hook_resid_post")[5:12])
    assert np.array_equal(part.tensors["logits"], full.tensors["logits"][5:12])


def test_trajectory_lists_each_component_s_operations_in_order(tiny):
    ids = ids_of(tiny)
    cap = capture(tiny, ids, select(Dims.of(tiny.config), len(ids), layers=[0]))
    steps = [(t["component"], t["operation"]) for t in cap.trajectory]
    assert steps[:8] == [("embed", "token_embedding"), ("blocks.0", "input_reception"),
                         ("blocks.0.ln1", "rms_normalization"), ("blocks.0.attn", "qkv_projection"),
                         ("blocks.0.attn", "rotary_position_embedding"), ("blocks.0.attn", "attention_score_computation"),
                         ("blocks.0.attn", "softmax"), ("blocks.0.attn", "value_aggregation")]
    assert steps[-1] == ("blocks.0", "residual_addition")  # only block 0 was asked for: the forward stops there
    assert list(cap.trajectory[3]["rms"]) == ["blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v"]
    assert all(np.isfinite(v) and v > 0 for t in cap.trajectory for v in t["rms"].values())


def test_bad_selections_name_the_valid_choices(tiny):
    d = Dims.of(tiny.config)

    def fails(code, **kw):
        with pytest.raises(ApiError) as e:
            select(d, 10, **kw)
        assert e.value.status == 422 and e.value.code == code
        return str(e.value)

    assert "layers 0..1" in fails("unknown_layers", layers=[0, 2])
    assert "query heads 0..3" in fails("unknown_heads", heads=[4])
    msg = fails("unknown_states", states=["hook_pattern", "attn.hook_pattern"])
    assert "'hook_pattern'" in msg and "attn.hook_pattern" in msg and "hook_resid_post" in msg
    assert "mlp.hook_post" in fails("unknown_activation", activation="attn.hook_pattern")
    assert "10 tokens" in fails("bad_range", start=4, end=11)
    fails("bad_range", start=5, end=5)


def test_the_estimate_is_known_before_and_the_holo_carries_the_capture(tiny):
    ids = ids_of(tiny)
    d = Dims.of(tiny.config)
    sel = select(d, len(ids), states=["attn.hook_pattern", "hook_resid_post", "logits"], heads=[0], start=2)
    n = len(ids) - 2
    assert elements(d, sel) == {"attn.hook_pattern": 2 * 1 * n * len(ids), "hook_resid_post": 2 * n * d.model,
                                "logits": n * d.vocab}
    cap = capture(tiny, ids, sel)
    raw = sum(a.size for a in cap.tensors.values())
    assert raw == sum(elements(d, sel).values())
    data = cap.holo_bytes(tiny.model_id, tiny.tokenizer_id)
    assert len(data) <= estimate_bytes(d, sel, "holo")
    assert raw * BYTES_PER_ELEMENT["holo"] <= estimate_bytes(d, sel, "holo")
    holo = load_hologram(data)
    assert holo.kind == "captured_state" and holo.meta["format"] == "hpi.captured_state/1"
    assert holo.meta["range"] == [2, len(ids)] and holo.meta["heads"] == [0] and holo.meta["kv_heads"] == [0]
    for name, a in cap.tensors.items():
        assert np.array_equal(holo.tensors[name], a)
    assert holo.tensors["tokens.ids"].tolist() == ids[2:]
    assert np.array_equal(holo.tensors["tokens.attention_received"], cap.attention_received.astype(np.float32))
    assert holo.tensors["heads.entropy"].shape == (2, 1)
    assert holo.tensors["peaks.attention"].tolist() == cap.summary()["peaks"]["attention"]["positions"]
    assert holo.meta["trajectory"] == cap.trajectory


def test_docs_table_lists_every_state_with_its_shape():
    from pathlib import Path
    doc = (Path(__file__).resolve().parent.parent / "docs" / "capture.md").read_text()
    rows = {line.split("|")[1].strip().split()[0].strip("`"): line.split("|")[2].strip()
            for line in doc.splitlines() if line.startswith("| `")}
    for name, s in STATES.items():
        assert rows.get(name) == s.shape, name
