"""The WGSL resonator in real headless Chromium (WebGPU on SwiftShader) against the Python one.

Both decode from the same model pack and hologram served by the real anchor app. Tokens
must be equal; logits are compared with a tolerance (LOGIT_TOL) because the two sum in
different orders: every f32 dot product differs in its last bits, and 2 (tiny) or 30
(SmolLM2) layers carry that forward. The kernels' own math is checked piece by piece too:
hologram decompression against server/spectral.py, the sampling hash bit for bit against
server/sampling.py.

The parity tests run both kernel layouts (client_web/resonator.js): 'cpu' (gemv.wgsl and
attn_scores/softmax/values.wgsl, which the engine picks on a software adapter such as
SwiftShader) and 'gpu' (gemv_wg.wgsl and attn_wg.wgsl, workgroups that reduce across their
lanes, picked on real GPUs); they sum in different orders, so each is held to the same bar:
equal tokens, logits within LOGIT_TOL. The 'gpu' layout's reductions shuffle within subgroups
where the adapter has them (SwiftShader does, 4 wide) and go through workgroup memory
otherwise; the two add in the same order, so their logits must be equal to the bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpi.protocol.holo import load_hologram
from hpi import hologram
from hpi.resonator import Resonator
from hpi.sampling import Sampling, uniform

pytestmark = pytest.mark.browser

PROMPT = [{"role": "user", "content": "Explain in two sentences what a key-value cache keeps and why it helps."}]

# Logit tolerance, relative to the largest |logit|. Two correct f32 implementations of the
# same network differ by accumulated rounding (~1e-7 relative per dot product, carried
# through the layers); measured here: 1.3e-6 on both the tiny model (4.6e-6 at max |logit|
# 3.6) and SmolLM2 (4.7e-5 at 35.7). 1e-4 leaves a 75x margin, while a wrong kernel (a
# dropped block, a misplaced RoPE pair, a stale KV row) moves logits by 1e-2 and more.
LOGIT_TOL = 1e-4

ENGINE = """async ([sid, token, opts, runs]) => {
  const { Resonator } = await import('/client/resonator.js');
  const m = (await (await fetch('/v1/models')).json()).models[0];
  const r = await Resonator.create(opts);
  await r.loadPack(await (await fetch(m.pack_url)).arrayBuffer(), m.pack_hash);
  const holo = await (await fetch(`/v1/sessions/${sid}/hologram`,
                                  { headers: { Authorization: `Bearer ${token}` } })).arrayBuffer();
  const meta = await r.addHologram(holo);
  const kv0 = await r.readKV(0);
  const out = { start: meta.start, end: meta.end, k0: Array.from(kv0.k), v0: Array.from(kv0.v), runs: [] };
  for (const run of runs) {
    r.rewind(meta.end, meta.next_id);
    const first = await r.generate(1, run);
    const logits = Array.from(await r.readLogits());
    const rest = await r.generate(run.n - 1, run);
    out.runs.push({ tokens: [...first, ...rest], logits });
  }
  out.chunks = { embed: r.embed.chunks.length, lm_head: r.lmHead.chunks.length };
  out.layout = r.layout;
  out.subgroups = r.subgroups;
  r.destroy();
  return out;
}"""


def new_session(base: str, messages=PROMPT) -> dict:
    import httpx
    r = httpx.post(f"{base}/v1/sessions", json={"messages": messages}, timeout=120)
    assert r.status_code == 201, r.text
    return r.json()


def session_hologram(base: str, s: dict) -> bytes:
    import httpx
    r = httpx.get(f"{base}{s['hologram_url']}", headers={"Authorization": f"Bearer {s['token']}"}, timeout=60)
    assert r.status_code == 200
    return r.content


def run_engine(browser, base: str, s: dict, runs: list[dict], **opts) -> dict:
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        page.goto(f"{base}/client/README.md")
        out = page.evaluate(ENGINE, [s["session_id"], s["token"], opts, runs])
    finally:
        page.close()
    assert not errors, errors
    return out


def reference(anchor, holo: bytes, run: dict) -> tuple[list[int], np.ndarray]:
    """The Python resonator's tokens and first-step logits for one run."""
    res = Resonator(anchor.pack_bytes)
    res.add_hologram(holo)
    logits = res.step(res.next_id).numpy()
    res = Resonator(anchor.pack_bytes)
    res.add_hologram(holo)
    tokens = res.generate(run["n"], Sampling(run.get("temperature", 0.0), run.get("seed", 0)), stop_at_eos=False)
    return tokens, logits


def check_parity(anchor, holo: bytes, out: dict, runs: list[dict]) -> None:
    seg = hologram.read(holo, anchor.basis)
    G, Dh = seg.keys.shape[1], seg.keys.shape[3]
    for name, want in (("k0", seg.keys[0]), ("v0", seg.values[0])):
        got = torch.tensor(out[name]).view(-1, G, Dh).transpose(0, 1)  # [G, T, Dh]
        err = float((got - want).abs().max())
        assert err <= 1e-4 * max(1.0, float(want.abs().max())), f"{name}: max error {err}"
    for run, got in zip(runs, out["runs"]):
        tokens, logits = reference(anchor, holo, run)
        diff = float(np.abs(np.array(got["logits"], np.float32) - logits).max())
        scale = max(1.0, float(np.abs(logits).max()))
        assert diff <= LOGIT_TOL * scale, f"{run}: logits differ by {diff:.3g} (scale {scale:.3g})"
        assert got["tokens"] == tokens, f"{run}: WGSL {got['tokens']} vs Python {tokens} (logit diff {diff:.3g})"


RUNS = [{"n": 32, "stopAtEos": False}, {"n": 32, "temperature": 0.8, "seed": 1234, "stopAtEos": False}]
LAYOUTS = ("cpu", "gpu")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiny_model_parity_greedy_and_sampled(browser, tiny_server, layout):
    base, anchor = tiny_server
    s = new_session(base)
    out = run_engine(browser, base, s, RUNS, layout=layout)
    assert out["layout"] == layout
    check_parity(anchor, session_hologram(base, s), out, RUNS)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_buffers_split_to_the_binding_limit_give_the_same_tokens(browser, tiny_server, layout):
    base, anchor = tiny_server
    s = new_session(base)
    small = run_engine(browser, base, s, RUNS[:1], maxWeightBytes=4096, layout=layout)
    assert small["chunks"]["embed"] > 1 and small["chunks"]["lm_head"] > 1
    check_parity(anchor, session_hologram(base, s), small, RUNS[:1])


def test_gpu_layout_is_the_same_with_and_without_subgroups(browser, tiny_server):
    base, anchor = tiny_server
    s = new_session(base)
    on = run_engine(browser, base, s, RUNS, layout="gpu")
    off = run_engine(browser, base, s, RUNS, layout="gpu", subgroups=False)
    if not on["subgroups"]:
        pytest.skip("this adapter has no subgroups: only the workgroup-memory reductions ran")
    assert off["subgroups"] == 0
    for a, b in zip(on["runs"], off["runs"]):
        assert a["tokens"] == b["tokens"]
        assert np.array_equal(np.array(a["logits"], np.float32), np.array(b["logits"], np.float32))
    check_parity(anchor, session_hologram(base, s), off, RUNS)


def test_layout_is_picked_from_the_adapter(browser, tiny_server):
    page = browser.new_page()
    try:
        page.goto(f"{tiny_server[0]}/client/README.md")
        out = page.evaluate("""async () => {
          const { Resonator, isSoftwareAdapter } = await import('/client/resonator.js');
          const r = await Resonator.create();
          const a = await navigator.gpu.requestAdapter();
          const fake = (info, fallback = false) => isSoftwareAdapter({ info, isFallbackAdapter: fallback });
          const out = { picked: r.layout, software: isSoftwareAdapter(a), info: { ...a.info },
            nvidia: fake({ vendor: 'nvidia', architecture: 'hopper' }),
            llvmpipe: fake({ vendor: 'mesa', architecture: '', device: 'llvmpipe (LLVM 15.0.6, 256 bits)' }),
            fallback: fake({ vendor: 'apple', architecture: 'metal-3' }, true) };
          r.destroy();
          let refused = null;
          try { await Resonator.create({ layout: 'tpu' }); } catch (e) { refused = e.name; }
          return { ...out, refused };
        }""")
    finally:
        page.close()
    # SwiftShader, what Chromium runs WebGPU on here, is a software adapter: the 'cpu' layout.
    assert out["software"] and out["picked"] == "cpu", out["info"]
    assert (out["nvidia"], out["llvmpipe"], out["fallback"]) == (False, True, True)
    assert out["refused"] == "TypeError"


def test_sampling_noise_is_bit_identical(browser, tiny_server):
    base, anchor = tiny_server
    page = browser.new_page()
    try:
        page.goto(f"{base}/client/README.md")
        bits = page.evaluate("""async () => {
          const { Resonator } = await import('/client/resonator.js');
          const m = (await (await fetch('/v1/models')).json()).models[0];
          const r = await Resonator.create();
          await r.loadPack(await (await fetch(m.pack_url)).arrayBuffer(), m.pack_hash);
          const out = [];
          for (const [seed, pos] of [[0, 0], [1234, 17], [4294967295, 123456]]) out.push(Array.from(await r.noise(seed, pos)));
          r.destroy();
          return out;
        }""")
    finally:
        page.close()
    V = load_hologram(anchor.pack_bytes).meta["config"]["vocab"]
    for (seed, pos), got in zip([(0, 0), (1234, 17), (4294967295, 123456)], bits):
        got = np.array(got, np.uint32).reshape(V, 2)
        u = uniform(seed, pos, np.arange(V, dtype=np.uint32))
        assert np.array_equal(got[:, 0], u.view(np.uint32))
        g = -np.log(-np.log(u))
        assert np.abs(got[:, 1].view(np.float32) - g).max() < 1e-5 * (1 + np.abs(g).max())


@pytest.mark.real_model
@pytest.mark.parametrize("layout", LAYOUTS)
def test_smollm2_parity(browser, smollm_server, layout):
    base, anchor = smollm_server
    s = new_session(base)
    # SwiftShader runs the 'gpu' layout's kernels (barriers) as coroutines, 10x slower: fewer tokens there.
    n, sampled = (32, 8) if layout == "cpu" else (4, 2)
    runs = [{"n": n, "stopAtEos": False}, {"n": sampled, "temperature": 0.7, "seed": 7, "stopAtEos": False}]
    out = run_engine(browser, base, s, runs, batch=8, layout=layout)
    assert out["layout"] == layout
    check_parity(anchor, session_hologram(base, s), out, runs)
