"""Decode speed of the WGSL resonator in the browser, against its bandwidth bound and CPU engines.

One run, one model (the anchor's: SmolLM2-135M-Instruct Q4_1 by default), the same prompts:
for each hologram size (--sizes, in prompt tokens) the prompt is the model's chat template
around a prefix of the corpus texts (bench/corpus.py, in list order), cut so the session's
n_tokens is the target. The real anchor app serves pack, sessions and holograms on a loopback
port; headless Chromium (WebGPU on SwiftShader here, server/headless.py) runs the engine.

  1. WGSL engine (client_web/resonator.js): pack fetch + loadPack once; per size the
     hologram fetch, its parse (holo.js) and addHologram (parse + GPU decompression), then
     --warmup greedy steps, a rewind, and --new timed greedy steps (no stop at EOS):
     ms/token and tok/s, and tok/s(largest) / tok/s(smallest).
  2. Per-kernel time of one step at each size: r.profile() (GPU timestamps where the adapter
     has them, else each kernel's dispatches of a step submitted alone, wall clock).
  3. Bandwidth bound, same page and device: a copy kernel and a naive f32 GEMV
     (bench/bandwidth.wgsl) stream ~113 MB; bound = r.bytesPerToken / the better rate.
  4. CPU engines on the same holograms/prompts: the Python reference resonator
     (server/resonator.py) and transformers' own `generate` (greedy; decode steps timed by
     a logits processor's timestamps, so the prefill is timed apart), --threads torch threads.
  5. --peers: onnxruntime-web WebGPU on the same model through /work/shared/peers
     (web/run_browser.py ort ep=webgpu model=q4 ...; its prompt has 224 tokens), run after
     everything else, and our tok/s at the smallest size / its decode tok/s.

Every engine does --warmup untimed steps first, then --new timed steps. Tables go to stdout
(and --md); the JSON to --out; --render [PNG] plots tok/s against hologram size.

    python -m bench.resonator --sizes 256 --new 4 --out /tmp/resonator.json      # a quick check
    python -m bench.resonator --peers --render                                  # the full run
    python -m bench.resonator --from docs/results/resonator.json --md docs/resonator.md --render
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

ENGINE_FILES = ("client_web/resonator.js", "client_web/holo.js", "shaders")
PROBE_WGSL = Path(__file__).with_name("bandwidth.wgsl")
PROBE_ROWS, PROBE_COLS = 49152, 576  # the f32 GEMV: SmolLM2's LM head shape, 113 MB
PEER_ARGS = ["ort", "ep=webgpu", "model=q4", "runs=1", "warm=1"]


def log(msg: str) -> None:
    print(msg, flush=True)


def git_rev(paths) -> str:
    """Last commit touching `paths`, '+dirty' if the work tree differs (untracked files too)."""
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h", "--", *paths],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", *paths],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "uncommitted") + ("+dirty" if dirty and rev else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def files_digest(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        p = REPO / p
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def machine(threads: int, load_start: float) -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import torch
    import transformers
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "torch_threads": threads,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0]}


# ---- prompts --------------------------------------------------------------------------------


def build_prompts(lm, sizes: list[int]) -> dict[int, dict]:
    """Per target size: chat messages around a prefix of the corpus, n_tokens == target if possible."""
    from bench import corpus

    body: list[int] = []
    texts: list[tuple[str, int]] = []  # (text id, body length before it)
    for t in corpus.load("all"):
        texts.append((t.id, len(body)))
        body += lm.tokenizer(t.text + "\n\n", add_special_tokens=False)["input_ids"]
        if len(body) > max(sizes) + 64:
            break
    overhead = len(lm.chat_ids([{"role": "user", "content": ""}]))
    out = {}
    for target in sizes:
        if target <= overhead + 1:
            raise SystemExit(f"size {target} is smaller than the chat template's {overhead} tokens")
        k = min(target - overhead, len(body))
        for _ in range(20):  # decode/re-encode can move the count by a token or two
            messages = [{"role": "user", "content": lm.tokenizer.decode(body[:k])}]
            ids = lm.chat_ids(messages)
            if len(ids) <= target or k <= 1:
                break
            k -= max(1, len(ids) - target)
        out[target] = {"messages": messages, "ids": ids, "body_tokens": k,
                       "texts": [tid for tid, at in texts if at < k]}
    return out


# ---- the browser part -----------------------------------------------------------------------

JS_SETUP = """async ([opts, timeoutMs]) => {
  const log = (...a) => console.log('[bench]', ...a);
  window.within = (ms, what, p) => new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`${what}: no answer after ${ms / 1000} s`)), ms);
    p.then((v) => { clearTimeout(t); resolve(v); }, (e) => { clearTimeout(t); reject(e); });
  });
  const { Resonator } = await import('/client/resonator.js');
  const holo = await import('/client/holo.js');
  const r = await Resonator.create(opts);
  r.onLost = (info) => console.error(`WebGPU device lost: ${info.reason} ${info.message}`);
  window.B = { r, holo };
  const m = (await (await fetch('/v1/models')).json()).models[0];
  let t0 = performance.now();
  const resp = await fetch(m.pack_url);
  if (!resp.ok) throw new Error(`pack: HTTP ${resp.status}`);
  const pack = await resp.arrayBuffer();
  const fetchMs = performance.now() - t0;
  log(`pack ${(pack.byteLength / 1e6).toFixed(1)} MB fetched in ${fetchMs.toFixed(0)} ms; loadPack ...`);
  t0 = performance.now();
  await within(timeoutMs, 'loadPack', r.loadPack(pack, m.pack_hash));
  await within(timeoutMs, 'loadPack (queue)', r.device.queue.onSubmittedWorkDone());
  const loadMs = performance.now() - t0;
  const lim = r.device.limits;
  return { adapter: r.adapter, features: [...r.device.features].sort(),
    limits: { maxStorageBufferBindingSize: lim.maxStorageBufferBindingSize, maxBufferSize: lim.maxBufferSize,
      maxComputeWorkgroupsPerDimension: lim.maxComputeWorkgroupsPerDimension },
    userAgent: navigator.userAgent, packBytes: pack.byteLength, packFetchMs: fetchMs, loadPackMs: loadMs,
    bytesPerToken: r.bytesPerToken, opts };
}"""

JS_SIZE = """async ([url, token, warm, n, profileRepeats, addRepeats, timeoutMs]) => {
  const log = (...a) => console.log('[bench]', ...a);
  const r = B.r;
  const gen = { temperature: 0, seed: 0, stopAtEos: false };
  let t0 = performance.now();
  const resp = await fetch(url, { headers: { Authorization: `Bearer ${token}` } });
  if (!resp.ok) throw new Error(`hologram: HTTP ${resp.status}`);
  const bytes = await resp.arrayBuffer();
  const fetchMs = performance.now() - t0;
  t0 = performance.now();
  await B.holo.loadHologram(bytes);
  const parseMs = performance.now() - t0;
  const addMsRuns = [];
  let meta = null;
  for (let i = 0; i < addRepeats; i++) {
    r.rewind(0, null);
    t0 = performance.now();
    meta = await within(timeoutMs, 'addHologram', r.addHologram(bytes));
    addMsRuns.push(performance.now() - t0);
  }
  const addMs = addMsRuns[0];
  log(`hologram [${meta.start}, ${meta.end}) ${(bytes.byteLength / 1e3).toFixed(0)} KB: fetch ${fetchMs.toFixed(0)} ms,
      parse ${parseMs.toFixed(0)} ms, addHologram ${addMsRuns.map((v) => v.toFixed(0)).join(', ')} ms; ${warm} warm-up steps ...`);
  t0 = performance.now();
  const warmIds = warm ? await within(timeoutMs, 'warm-up generate', r.generate(warm, gen)) : [];
  const warmMs = performance.now() - t0;
  r.rewind(meta.end, meta.next_id);
  log(`warm-up ${warmMs.toFixed(0)} ms; ${n} timed steps ...`);
  const marks = [];
  t0 = performance.now();
  const ids = await within(timeoutMs, 'generate', r.generate(n, { ...gen,
    onTokens: (b) => marks.push([b.length, performance.now() - t0]) }));
  const decodeMs = performance.now() - t0;
  log(`${n} steps in ${decodeMs.toFixed(0)} ms (${(decodeMs / n).toFixed(1)} ms/token); profile x${profileRepeats} ...`);
  r.rewind(meta.end, meta.next_id);
  let profile = null;
  if (profileRepeats > 0) {
    t0 = performance.now();
    profile = await within(timeoutMs, 'profile', r.profile(profileRepeats));
    profile.wallMs = performance.now() - t0;
  }
  r.rewind(meta.end, meta.next_id);
  return { start: meta.start, end: meta.end, nextId: meta.next_id, hologramBytes: bytes.byteLength,
    fetchMs, parseMs, addHologramMs: addMs, addHologramMsRuns: addMsRuns, warm, warmMs, warmIds, n, decodeMs, ids, batches: marks, profile };
}"""

JS_PROBE = """async ([src, rows, cols, reps, perSubmit, timeoutMs]) => {
  const dev = B.r.device;
  const S = GPUBufferUsage.STORAGE;
  const module = dev.createShaderModule({ code: src, label: 'bandwidth.wgsl' });
  const msgs = (await module.getCompilationInfo()).messages.filter((m) => m.type === 'error');
  if (msgs.length) throw new Error('bandwidth.wgsl: ' + msgs.map((m) => `${m.lineNum}:${m.linePos} ${m.message}`).join('; '));
  const pipe = (entryPoint, constants) => dev.createComputePipeline({ layout: 'auto', compute: { module, entryPoint, constants } });
  const { bindingSlots } = await import('/client/resonator.js');
  const slots = bindingSlots(src, 'bandwidth.wgsl');  // bound by name, as the resonator binds its kernels
  const bind = (p, entries) => dev.createBindGroup({ layout: p.getBindGroupLayout(0),
    entries: Object.entries(entries).map(([name, buffer]) => ({ binding: slots[name], resource: { buffer } })) });
  const bytes = rows * cols * 4;
  const a = dev.createBuffer({ size: bytes, usage: S }), b = dev.createBuffer({ size: bytes, usage: S });
  const xb = dev.createBuffer({ size: cols * 4, usage: S }), yb = dev.createBuffer({ size: rows * 4, usage: S });
  const copy = pipe('copy', {}), gemv = pipe('gemv', { K4: cols / 4 });
  const kernels = {
    copy: { p: copy, g: bind(copy, { src: a, dst: b }), groups: Math.ceil(bytes / 16 / 256), traffic: 2 * bytes,
      layout: '@workgroup_size(256): one invocation per vec4<f32>; traffic = read + write' },
    gemv: { p: gemv, g: bind(gemv, { W: a, x: xb, y: yb }), groups: Math.ceil(rows / 64), traffic: bytes + 4 * cols + 4 * rows,
      layout: `@workgroup_size(64): one invocation per row of ${rows} x ${cols} f32; traffic = W + x + y` },
  };
  const run = async (k, count) => {
    const enc = dev.createCommandEncoder();
    const pass = enc.beginComputePass();
    for (let i = 0; i < count; i++) { pass.setPipeline(k.p); pass.setBindGroup(0, k.g); pass.dispatchWorkgroups(k.groups); }
    pass.end();
    dev.queue.submit([enc.finish()]);
    await within(timeoutMs, 'bandwidth probe', dev.queue.onSubmittedWorkDone());
  };
  const out = { bytes, rows, cols, reps, perSubmit };
  for (const [name, k] of Object.entries(kernels)) {
    await run(k, 1);  // warm-up (pipeline compilation, first touch of the pages)
    const ms = [];
    for (let r = 0; r < reps; r++) {
      await dev.queue.onSubmittedWorkDone();
      const t0 = performance.now();
      await run(k, perSubmit);
      ms.push((performance.now() - t0) / perSubmit);
    }
    out[name] = { msRuns: ms, traffic: k.traffic, groups: k.groups, layout: k.layout };
    console.log('[bench]', `${name}: ${ms.map((v) => v.toFixed(1)).join(' ')} ms per dispatch`);
  }
  [a, b, xb, yb].forEach((buf) => buf.destroy());
  return out;
}"""


def web_phase(base: str, sessions: dict[int, dict], args) -> dict:
    """Everything measured in the browser: one page, one engine, every size, then the probe."""
    from hpi.headless import launch

    out: dict = {"sizes": {}, "console_errors": [], "error": None}
    timeout_ms = int(args.timeout * 1000)
    with launch() as browser:
        out["chromium"] = browser.version
        log(f"chromium {browser.version}")
        page = browser.new_page()

        def on_console(m):
            if m.type in ("error", "warning"):
                log(f"  [page {m.type}] {m.text[:2000]}")
                if m.type == "error":
                    out["console_errors"].append(m.text[:2000])
            elif m.text.startswith("[bench]"):
                log("  " + m.text.replace("\n", " ").replace("      ", " "))

        def on_pageerror(e):
            log(f"  [page error] {e}")
            out["console_errors"].append(f"pageerror: {e}")

        page.on("console", on_console)
        page.on("pageerror", on_pageerror)
        page.on("crash", lambda _: out["console_errors"].append("page crashed"))
        page.route("**/bench/bandwidth.wgsl",
                   lambda route: route.fulfill(path=str(PROBE_WGSL), content_type="text/plain; charset=utf-8"))
        page.goto(f"{base}/client/README.md")
        try:
            log("browser: Resonator.create + pack fetch + loadPack ...")
            t0 = time.perf_counter()
            out["setup"] = page.evaluate(JS_SETUP, [{"gemv": {"WG": args.wg}, "batch": args.batch}, timeout_ms])
            s = out["setup"]
            log(f"  adapter {s['adapter']}; pack {s['packBytes'] / 1e6:.1f} MB: fetch {s['packFetchMs']:.0f} ms, "
                f"loadPack {s['loadPackMs'] / 1e3:.1f} s; {s['bytesPerToken'] / 1e6:.2f} MB of weights per token "
                f"({time.perf_counter() - t0:.0f} s)")
        except Exception as e:  # no WebGPU, a shader error, ...: the CPU engines still run
            out["error"] = f"setup: {e}"
            log(f"browser setup FAILED: {e}")
            return out
        for size, sess in sessions.items():
            log(f"browser: hologram of {sess['n_tokens']} tokens (target {size}) ...")
            t0 = time.perf_counter()
            try:
                r = page.evaluate(JS_SIZE, [sess["hologram_url"], sess["token"], args.warmup, args.new,
                                            args.profile_repeats, args.add_repeats, timeout_ms])
            except Exception as e:
                log(f"  FAILED: {e}")
                out["sizes"][size] = {"error": str(e)}
                continue
            r["msPerToken"] = r["decodeMs"] / r["n"]
            r["tokS"] = 1e3 * r["n"] / r["decodeMs"]
            out["sizes"][size] = r
            log(f"  {r['msPerToken']:.1f} ms/token = {r['tokS']:.3f} tok/s ({time.perf_counter() - t0:.0f} s)")
        log(f"browser: bandwidth probe ({PROBE_ROWS} x {PROBE_COLS} f32 = {PROBE_ROWS * PROBE_COLS * 4 / 1e6:.0f} MB) ...")
        try:
            p = page.evaluate(JS_PROBE, [PROBE_WGSL.read_text(), PROBE_ROWS, PROBE_COLS, args.probe_reps,
                                         args.probe_per_submit, timeout_ms])
            for name in ("copy", "gemv"):
                k = p[name]
                k["ms"] = statistics.median(k["msRuns"])
                k["gbS"] = k["traffic"] / k["ms"] / 1e6
                k["gbSBest"] = k["traffic"] / min(k["msRuns"]) / 1e6
                log(f"  {name}: {k['ms']:.1f} ms per dispatch (median of {len(k['msRuns'])}), {k['gbS']:.2f} GB/s")
            out["probe"] = p
        except Exception as e:
            out["probe"] = {"error": str(e)}
            log(f"  probe FAILED: {e}")
        page.close()
    return out


# ---- CPU engines ----------------------------------------------------------------------------


def python_resonator(anchor, holo: bytes, warm: int, n: int) -> dict:
    import torch

    from hpi.resonator import Resonator

    with torch.inference_mode():
        t0 = time.perf_counter()
        res = Resonator(anchor.pack_bytes)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res.add_hologram(holo)
        add_s = time.perf_counter() - t0
        ids, times = [], []
        for _ in range(warm + n):
            t0 = time.perf_counter()
            ids += res.generate(1, stop_at_eos=False)
            times.append(time.perf_counter() - t0)
    decode = sum(times[warm:])
    return {"load_s": load_s, "add_hologram_s": add_s, "ids": ids, "step_s": times, "decode_s": decode,
            "ms_per_token": 1e3 * decode / n, "tok_s": n / decode}


def transformers_generate(lm, ids: list[int], warm: int, n: int) -> dict:
    """Greedy `generate` of warm + n + 1 tokens; decode steps timed by logits-processor stamps."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.t: list[float] = []

        def __call__(self, input_ids, scores):
            self.t.append(time.perf_counter())
            return scores

    total = warm + n + 1
    x = torch.tensor([ids], device=lm.model.device)
    stamp = Stamp()
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.eos_token_ids[0]
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = lm.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=total, min_new_tokens=total,
                                do_sample=False, temperature=None, top_p=None, top_k=None,
                                logits_processor=LogitsProcessorList([stamp]), pad_token_id=pad)
        end = time.perf_counter()
    t = stamp.t
    if len(t) != total:
        raise RuntimeError(f"transformers generate stamped {len(t)} steps, expected {total}")
    steps = [b - a for a, b in zip(t, t[1:])]  # step i: one forward of one token (+ generate's own work)
    decode = sum(steps[warm:])
    return {"prompt_tokens": len(ids), "prefill_s": t[0] - t0, "total_s": end - t0, "step_s": steps,
            "decode_s": decode, "ms_per_token": 1e3 * decode / n, "tok_s": n / decode,
            "ids": out[0, len(ids):].tolist()}


# ---- peers ----------------------------------------------------------------------------------


def run_peer(args) -> dict:
    script = args.peers_dir / "web" / "run_browser.py"
    cmd = [str(args.peers_python), str(script), *PEER_ARGS, f"new={args.peer_new}"]
    log(f"peer: {' '.join(cmd)}  (SwiftShader: ~13 s per token, ~10 min)")
    if not script.is_file() or not Path(args.peers_python).exists():
        return {"error": f"missing {script} or {args.peers_python}", "command": cmd}
    t0 = time.perf_counter()
    result = None
    proc = subprocess.Popen(cmd, cwd=str(args.peers_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    try:
        deadline = time.monotonic() + args.peer_timeout
        for line in proc.stdout:
            line = line.rstrip()
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
                log("  [peer] RESULT " + json.dumps({k: result.get(k) for k in
                                                     ("ok", "decode_tok_s_median", "prefill_tok_s_median", "error")}))
            else:
                log("  [peer] " + line[:300])
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, args.peer_timeout)
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"error": f"timed out after {args.peer_timeout:.0f} s", "command": cmd}
    wall = time.perf_counter() - t0
    if result is None:
        return {"error": f"no RESULT line (exit {proc.returncode})", "command": cmd, "wall_s": wall}
    keep = ("ok", "error", "ep", "variant", "bundle", "adapter", "ort", "prompt_tokens", "new_tokens", "runs",
            "session_ms", "prefill_ms_runs", "decode_ms_runs", "prefill_tok_s_median", "decode_tok_s_median",
            "decode_ms_per_tok_median", "chromium")
    return {"command": " ".join(cmd), "wall_s": wall, **{k: result[k] for k in keep if k in result}}


# ---- report ---------------------------------------------------------------------------------


def derive(result: dict) -> None:
    """Ratios and the bound, from the raw numbers (also for --from)."""
    sizes = result["sizes"]
    keys = sorted(sizes, key=int)
    lo, hi = keys[0], keys[-1]

    def rate(s, engine):
        e = sizes[s].get(engine) or {}
        return e.get("tok_s")

    result["ratio_largest_smallest"] = {
        "sizes": [int(lo), int(hi)],
        **{eng: (rate(hi, eng) / rate(lo, eng) if rate(hi, eng) and rate(lo, eng) else None)
           for eng in ("web", "python", "transformers")}}
    probe = (result.get("browser") or {}).get("probe") or {}
    bpt = ((result.get("browser") or {}).get("setup") or {}).get("bytesPerToken")
    bw = None
    if bpt and "copy" in probe and "gemv" in probe:
        best = max(("copy", "gemv"), key=lambda k: probe[k]["gbS"])
        top = max(probe["copy"]["gbSBest"], probe["gemv"]["gbSBest"])
        bw = {"bytes_per_token": bpt, "best_kernel": best, "best_gb_s": probe[best]["gbS"],
              "bound_ms_per_token": bpt / probe[best]["gbS"] / 1e6,
              "best_single_run_gb_s": top, "bound_ms_per_token_best_single_run": bpt / top / 1e6}
        web_lo = sizes[lo].get("web") or {}
        if web_lo.get("ms_per_token"):
            bw["measured_ms_per_token"] = web_lo["ms_per_token"]
            bw["measured_over_bound"] = web_lo["ms_per_token"] / bw["bound_ms_per_token"]
            bw["at_size"] = int(lo)
    result["bound"] = bw
    peer = result.get("peer")
    if peer and peer.get("decode_tok_s_median") and rate(lo, "web"):
        peer["ours_over_peer"] = rate(lo, "web") / peer["decode_tok_s_median"]
        peer["ours_at_size"] = int(lo)


def f(v, fmt="{:.2f}", none="–"):
    return none if v is None else fmt.format(v)


def add_cell(w: dict) -> str:
    runs = w.get("add_hologram_ms_runs") or []
    if len(runs) > 1:
        return f"{runs[0]:.0f} (again: {min(runs[1:]):.0f})"
    return f(w.get("add_hologram_ms"), "{:.0f}")


def render(result: dict) -> str:
    m = result["machine"]
    b = result.get("browser") or {}
    setup = b.get("setup") or {}
    sizes = result["sizes"]
    keys = sorted(sizes, key=int)
    fl = result["flags"]
    md = ["# WGSL resonator: decode speed", "",
          f"- machine: {m['cpu']}, {m['cores']} cores, {m.get('memory_gib')} GiB; torch {m['torch']} "
          f"({m['torch_threads']} threads), transformers {m['transformers']}, Python {m['python']}; "
          f"1-min load average at start {m.get('load_avg_start', 0):.2f}, at end {m.get('load_avg_end', 0):.2f}",
          f"- browser: Chromium {b.get('chromium', '?')} headless, WebGPU adapter `{setup.get('adapter', '?')}`"
          + (f", features: {', '.join(setup['features']) or 'none'}" if "features" in setup else ""),
          f"- date: {result['date']}; run time {result['run_seconds'] / 60:.1f} min",
          f"- command: `{result['command']}`",
          f"- engine: client_web/resonator.js + holo.js + shaders/ at {result['engine_rev']} "
          f"(files digest {result['engine_digest']}); gemv workgroup {fl.get('wg')}, batch {fl['batch']} steps per submission",
          f"- model: `{result['model']}`; pack {result['pack']['bytes'] / 1e6:.1f} MB",
          f"- prompts: chat template around a prefix of the corpus texts ({', '.join(result['texts'])}); "
          f"greedy decoding, no stop at EOS; each engine does {fl['warmup']} untimed steps, then "
          f"{fl['new']} timed steps (ms/token = their mean)", ""]
    if b.get("error"):
        md += [f"**The browser part failed:** {b['error']}", ""]

    md += ["## Decode speed", "",
           "| prompt tokens | cached positions | hologram KB | WGSL ms/token | WGSL tok/s | "
           "Python resonator tok/s | transformers tok/s |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for k in keys:
        s = sizes[k]
        w, p, t = s.get("web") or {}, s.get("python") or {}, s.get("transformers") or {}
        md.append(f"| {s['n_tokens']} | {s['positions']} | {s['hologram_bytes'] / 1e3:.0f} | "
                  f"{f(w.get('ms_per_token'), '{:.1f}', w.get('error') and 'failed' or '–')} | "
                  f"{f(w.get('tok_s'), '{:.3f}')} | {f(p.get('tok_s'), '{:.1f}')} | {f(t.get('tok_s'), '{:.1f}')} |")
    r = result["ratio_largest_smallest"]
    if len(keys) > 1:
        md += ["", f"tok/s at {r['sizes'][1]} / tok/s at {r['sizes'][0]}: WGSL {f(r['web'])}, "
                   f"Python resonator {f(r['python'])}, transformers {f(r['transformers'])}."]
    same = [(k, sizes[k]["tokens_equal"]) for k in keys if sizes[k].get("tokens_equal") is not None]
    if same:
        md += ["", "Greedy tokens, WGSL vs Python resonator (same pack, same hologram): "
               + ", ".join(f"{k}: {v}/{fl['new']}" for k, v in same) + " equal."]
    md += [""]

    md += ["## Loading", "",
           f"- model pack in the page: fetch {f(setup.get('packFetchMs'), '{:.0f}')} ms, `loadPack` "
           f"(parse + upload + pipelines) {f(setup.get('loadPackMs'), '{:.0f}')} ms; Python "
           f"`Resonator(pack)` {f(result.get('python_load_s'), '{:.1f}')} s", "",
           "| prompt tokens | session created (anchor prefill + hologram build) s | hologram fetch ms | "
           "parse (holo.js) ms | `addHologram` (parse + GPU decompression) ms | Python `add_hologram` ms |",
           "|---:|---:|---:|---:|---:|---:|"]
    for k in keys:
        s = sizes[k]
        w, p = s.get("web") or {}, s.get("python") or {}
        md.append(f"| {s['n_tokens']} | {s['session_s']:.1f} | {f(w.get('fetch_ms'), '{:.0f}')} | "
                  f"{f(w.get('parse_ms'), '{:.0f}')} | {add_cell(w)} | "
                  f"{f(p.get('add_hologram_s') and 1e3 * p['add_hologram_s'], '{:.0f}')} |")
    md += [""]

    profs = {k: (sizes[k].get("web") or {}).get("profile") for k in keys}
    profs = {k: v for k, v in profs.items() if v}
    if profs:
        method = next(iter(profs.values()))["method"]
        names = list(dict.fromkeys(n for v in profs.values() for n in v["kernels"]))
        md += ["## Time per kernel in one step", "",
               f"`r.profile({fl['profile_repeats']})` at the end of each hologram; method: {method}. "
               "ms per token (all layers' dispatches of the kernel) and share of the kernels' sum.", "",
               "| kernel | " + " | ".join(f"{sizes[k]['n_tokens']} ms | share" for k in profs) + " |",
               "|---|" + "---:|---:|" * len(profs)]
        for name in names:
            cells = []
            for k, v in profs.items():
                ms, tot = v["kernels"].get(name), sum(v["kernels"].values())
                cells.append(f"{f(ms, '{:.1f}')} | {f(ms and 100 * ms / tot, '{:.0f}%')}")
            md.append(f"| {name} | " + " | ".join(cells) + " |")
        md.append("| **sum** | " + " | ".join(f"{sum(v['kernels'].values()):.1f} | 100%" for v in profs.values()) + " |")
        md.append("| measured step | " + " | ".join(
            f"{f((sizes[k].get('web') or {}).get('ms_per_token'), '{:.1f}')} | " for k in profs) + " |")
        md += [""]

    probe = b.get("probe") or {}
    bound = result.get("bound")
    md += ["## Bandwidth bound", ""]
    if "copy" in probe:
        md += [f"Same page, same WebGPU device, `bench/bandwidth.wgsl`; median of {probe['reps']} submissions of "
               f"{probe['perSubmit']} dispatches each, wall clock.", "",
               "| probe | layout | MB moved per dispatch | ms per dispatch | GB/s (median) | GB/s (best) |",
               "|---|---|---:|---:|---:|---:|"]
        for name in ("copy", "gemv"):
            k = probe[name]
            md.append(f"| {name} | {k['layout']} | {k['traffic'] / 1e6:.1f} | {k['ms']:.1f} | {k['gbS']:.2f} | "
                      f"{k['gbSBest']:.2f} |")
        md += [""]
    elif probe.get("error"):
        md += [f"The probe failed: {probe['error']}", ""]
    if bound:
        md += [f"- weights read per decode step (`r.bytesPerToken`): {bound['bytes_per_token'] / 1e6:.2f} MB",
               f"- bound at the better rate ({bound['best_kernel']}, {bound['best_gb_s']:.2f} GB/s): "
               f"{bound['bound_ms_per_token']:.1f} ms/token ({1e3 / bound['bound_ms_per_token']:.2f} tok/s); at the "
               f"fastest single submission ({bound['best_single_run_gb_s']:.2f} GB/s) "
               f"{bound['bound_ms_per_token_best_single_run']:.1f} ms/token"]
        if bound.get("measured_over_bound"):
            md.append(f"- measured at {bound['at_size']} tokens: {bound['measured_ms_per_token']:.1f} ms/token = "
                      f"**{bound['measured_over_bound']:.1f}x the bound**")
        md += [""]

    peer = result.get("peer")
    if peer:
        md += ["## Peer: onnxruntime-web WebGPU, same run", ""]
        if peer.get("decode_tok_s_median"):
            md += [f"- `{peer['command']}` ({peer.get('prompt_tokens')}-token prompt, {peer.get('new_tokens')} tokens, "
                   f"{peer.get('variant')} ONNX, ort-web {(peer.get('ort') or {}).get('web', '?')})",
                   f"- decode {peer['decode_tok_s_median']:.4f} tok/s ({peer['decode_ms_per_tok_median']:.0f} ms/token), "
                   f"prefill {peer.get('prefill_tok_s_median', 0):.2f} tok/s",
                   f"- WGSL resonator at {peer.get('ours_at_size')} tokens / onnxruntime-web: "
                   f"**{f(peer.get('ours_over_peer'), '{:.1f}x')}**", ""]
        else:
            md += [f"- failed: {peer.get('error')}", ""]

    errs = b.get("console_errors") or []
    if errs:
        md += ["## Browser console errors", ""] + [f"- `{e[:300]}`" for e in errs[:20]] + [""]
    return "\n".join(md)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sizes = result["sizes"]
    keys = sorted(sizes, key=int)
    xs = [sizes[k]["positions"] for k in keys]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for eng, label, style in (("web", "WGSL resonator (Chromium, WebGPU on SwiftShader)", "o-"),
                              ("python", "Python reference resonator (CPU)", "s-"),
                              ("transformers", "transformers generate (CPU, fp32)", "^-")):
        pts = [(x, (sizes[k].get(eng) or {}).get("tok_s")) for x, k in zip(xs, keys)]
        pts = [(x, y) for x, y in pts if y]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    bound = result.get("bound")
    if bound:
        ax.axhline(1e3 / bound["bound_ms_per_token"], color="gray", ls="--", lw=1,
                   label=f"WGSL bandwidth bound ({bound['best_gb_s']:.2f} GB/s)")
    peer = result.get("peer") or {}
    if peer.get("decode_tok_s_median"):
        ax.plot([peer.get("prompt_tokens", 224)], [peer["decode_tok_s_median"]], "x", ms=9, color="red",
                label="onnxruntime-web WebGPU q4 (same run)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("cached positions (hologram size)")
    ax.set_ylabel("decode tokens/s (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    m = result["machine"]
    ax.set_title(f"SmolLM2-135M decode, {m['cores']} CPU cores, {result['flags']['new']} greedy tokens", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def emit(result: dict, args, tables=None, figure=None) -> None:
    """Print the tables; write them to `--md` and the plot to `--render` when asked.
    Other benchmarks pass their own `tables` (result -> markdown) and `figure` (result, path)."""
    tables, figure = tables or render, figure or plot
    text = tables(result)
    print()
    print(text)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text + "\n")
        log(f"wrote {args.md}")
    if args.render:
        figure(result, args.render)
        log(f"wrote {args.render}")


# ---- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,1024,4096", help="prompt sizes in tokens, comma-separated")
    ap.add_argument("--new", type=int, default=16, help="timed decode steps per size and engine")
    ap.add_argument("--warmup", type=int, default=2, help="untimed decode steps before them")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (Python resonator, transformers, anchor)")
    ap.add_argument("--wg", type=int, default=16, help="gemv workgroup size (Resonator.create gemv.WG)")
    ap.add_argument("--batch", type=int, default=4, help="Resonator.create batch (steps per submission)")
    ap.add_argument("--profile-repeats", type=int, default=3, help="r.profile(repeats); 0 skips it")
    ap.add_argument("--add-repeats", type=int, default=1,
                    help="addHologram runs per size (the first one also compiles holo_unpack)")
    ap.add_argument("--probe-reps", type=int, default=5, help="timed submissions per bandwidth kernel")
    ap.add_argument("--probe-per-submit", type=int, default=4, help="dispatches per timed submission")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for any one browser operation")
    ap.add_argument("--no-cpu", action="store_true", help="skip the Python resonator and transformers")
    ap.add_argument("--peers", action="store_true", help="also run onnxruntime-web WebGPU (~10 min)")
    ap.add_argument("--peer-new", type=int, default=32)
    ap.add_argument("--peer-timeout", type=float, default=2400)
    ap.add_argument("--peers-dir", type=Path, default=REPO.parent / "shared" / "peers")
    ap.add_argument("--peers-python", type=Path, default=Path("/tmp/venv/bin/python"))
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", type=Path, default=REPO / "docs/results/resonator.json")
    ap.add_argument("--md", type=Path, default=None, help="also write the tables as markdown here")
    ap.add_argument("--render", type=Path, nargs="?", const=REPO / "docs/resonator.png", default=None,
                    metavar="PNG", help="plot tok/s vs hologram size (default docs/resonator.png)")
    ap.add_argument("--from", dest="from_json", type=Path, metavar="JSON",
                    help="measure nothing: print (and --md / --render) the report of an earlier --out")
    args = ap.parse_args(argv)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        derive(result)
        emit(result, args)
        return
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if args.new < 1 or not sizes:
        ap.error("need --new >= 1 and at least one size")
    command = "python -m bench.resonator " + " ".join(argv if argv is not None else sys.argv[1:])
    t_start = time.perf_counter()
    load = os.getloadavg()[0]
    if load > 1.0:
        log(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other work is running, and every "
            "number here (SwiftShader and torch alike) will be slower and noisier than on a quiet machine")

    import httpx
    import torch

    torch.set_num_threads(args.threads)
    from hpi.anchor import Anchor
    from hpi.app import create_app
    from hpi.config import Settings
    from hpi.models import load_model
    from hpi.headless import chromium_path, serve

    if not (REPO / "client_web" / "holo.js").is_file():
        log("warning: client_web/holo.js is missing; the browser part will fail")
    log(f"loading {args.model} (torch threads {args.threads}) ...")
    t0 = time.perf_counter()
    lm = load_model(args.model, device="cpu")
    anchor = Anchor(lm, **Settings().anchor_options())
    pack_bytes = len(anchor.pack_bytes)
    log(f"  model + pack ({pack_bytes / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f} s")
    prompts = build_prompts(lm, sizes)
    longest = max(len(p["messages"][0]["content"]) for p in prompts.values())
    settings = Settings(max_prompt_tokens=max(8192, 2 * max(sizes)), max_message_chars=max(64_000, longest + 1),
                        max_body_bytes=max(1 << 20, 8 * longest))

    sessions: dict[int, dict] = {}
    result: dict = {"sizes": {}}
    with serve(create_app(settings, anchor)) as base:
        log(f"anchor app at {base}")
        with httpx.Client(base_url=base, timeout=1800) as client:
            for size in sizes:
                t0 = time.perf_counter()
                r = client.post("/v1/sessions", json={"messages": prompts[size]["messages"]})
                if r.status_code != 201:
                    raise SystemExit(f"POST /v1/sessions ({size} tokens) failed: {r.status_code} {r.text[:500]}")
                s = r.json()
                s["session_s"] = time.perf_counter() - t0
                h = client.get(s["hologram_url"], headers={"Authorization": f"Bearer {s['token']}"})
                h.raise_for_status()
                s["holo"] = h.content
                sessions[size] = s
                if s["n_tokens"] != len(prompts[size]["ids"]):
                    log(f"  warning: session has {s['n_tokens']} tokens, chat_ids gives {len(prompts[size]['ids'])}")
                log(f"  session for {size}: {s['n_tokens']} tokens, hologram {len(s['holo']) / 1e3:.0f} KB, "
                    f"created in {s['session_s']:.1f} s")
        if chromium_path() is None:
            log("warning: no /usr/bin/chromium (HPI_CHROMIUM); Playwright's own browser is used")
        web = web_phase(base, sessions, args)

    for size, s in sessions.items():
        w = web["sizes"].get(size) or {}
        row = {"target": size, "n_tokens": s["n_tokens"], "positions": s["n_tokens"] - 1,
               "hologram_bytes": len(s["holo"]), "session_s": s["session_s"], "web": None}
        if "error" in w:
            row["web"] = {"error": w["error"]}
        elif w:
            row["positions"] = w["end"]
            row["web"] = {"fetch_ms": w["fetchMs"], "parse_ms": w["parseMs"], "add_hologram_ms": w["addHologramMs"],
                          "add_hologram_ms_runs": w["addHologramMsRuns"], "warmup_ms": w["warmMs"], "decode_ms": w["decodeMs"], "ms_per_token": w["msPerToken"],
                          "tok_s": w["tokS"], "ids": w["ids"], "warm_ids": w["warmIds"], "batches": w["batches"],
                          "profile": w["profile"]}
        result["sizes"][str(size)] = row

    if not args.no_cpu:
        for size, s in sessions.items():
            row = result["sizes"][str(size)]
            log(f"Python resonator, {s['n_tokens']} tokens: {args.warmup} + {args.new} steps ...")
            p = python_resonator(anchor, s["holo"], args.warmup, args.new)
            row["python"] = p
            result.setdefault("python_load_s", p["load_s"])
            log(f"  pack load {p['load_s']:.1f} s, add_hologram {1e3 * p['add_hologram_s']:.0f} ms, "
                f"{p['ms_per_token']:.1f} ms/token = {p['tok_s']:.1f} tok/s")
            if row["web"] and row["web"].get("ids"):
                got, want = row["web"]["ids"], p["ids"][:args.new]
                row["tokens_equal"] = sum(a == b for a, b in zip(got, want))
                if got != want:
                    log(f"  note: WGSL tokens {got} differ from Python {want}")
        log("transformers: warm-up generate ...")
        transformers_generate(lm, prompts[sizes[0]]["ids"][:32], 0, 2)
        for size in sizes:
            ids = prompts[size]["ids"]
            log(f"transformers generate, {len(ids)} prompt tokens: {args.warmup} + {args.new} + 1 tokens ...")
            t = transformers_generate(lm, ids, args.warmup, args.new)
            result["sizes"][str(size)]["transformers"] = t
            log(f"  prefill {t['prefill_s']:.2f} s, {t['ms_per_token']:.1f} ms/token = {t['tok_s']:.1f} tok/s")

    peer = run_peer(args) if args.peers else None

    result.update({
        "machine": machine(args.threads, load), "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"), "command": command,
        "flags": {"sizes": sizes, "new": args.new, "warmup": args.warmup, "threads": args.threads,
                  "wg": args.wg, "batch": args.batch, "profile_repeats": args.profile_repeats,
                  "probe_reps": args.probe_reps, "probe_per_submit": args.probe_per_submit, "peers": args.peers,
                  "peer_new": args.peer_new if args.peers else None},
        "engine_rev": git_rev(ENGINE_FILES), "engine_digest": files_digest(ENGINE_FILES),
        "model": lm.model_id, "pack": {"bytes": pack_bytes, "hash": anchor.pack_hash},
        "texts": prompts[sizes[-1]]["texts"],
        "browser": {k: web.get(k) for k in ("chromium", "setup", "probe", "console_errors", "error")},
        "peer": peer, "run_seconds": time.perf_counter() - t_start})
    derive(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    emit(result, args)
    log(f"wrote {args.out} in {result['run_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
