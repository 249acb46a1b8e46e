"""Fidelity of compressed KV caches: the spectral codec against quantization and eviction baselines.

For each corpus text (bench/corpus.py) the prompt is the model's chat template around the text
(cut to --tokens tokens of text). The exact cache of every prompt token but the last comes from
a plain prefill (hpi.llama.forward); an exact greedy continuation of --new tokens (no stop at
EOS) gives the teacher tokens and the exact logits. Each method then compresses that cache, and
ONE teacher-forced forward over [last prompt token] + teacher[:-1] attends over the compressed
past (new tokens stay exact). We report
  ratio      fp16 bytes of the covered K/V / bytes of the compressed form (codec: the whole
             .holo file, header included);
  agreement  fraction of positions whose argmax equals the teacher token;
  KL         mean over positions of KL(exact || compressed) of the next-token distributions.
Also: the model pack's size and the agreement/KL of its dequantized weights against the exact
weights (same positions, exact cache), and the time to build a hologram for a 2,000-token
prompt against the transformers prefill of that prompt.

    python -m bench.fidelity --texts dev --quick
    python -m bench.fidelity --texts all            # the full sweep; writes docs/

Per-(text, setting) results are cached under /tmp (keyed by the code of the codec and of the
baselines), so an interrupted run resumes; --no-cache turns that off.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent

CODEC_FILES = ("server/spectral.py", "server/hologram.py", "server/pack.py", "server/rope.py", "protocol/holo.py")


def codec_version() -> str:
    """The git commit of the codec files, with '+dirty' if they differ from it."""
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h", "--", *CODEC_FILES],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", *CODEC_FILES],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "?") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def _file_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


# read before importing the codec, so figures and result-cache keys match the code that runs
CODEC_REV = codec_version()
CODEC_DIGEST = _file_digest(*(REPO / f for f in CODEC_FILES))

from bench import baselines, corpus
from hpi import hologram, llama
from hpi.spectral import BASES, PRESETS, CodecParams

CACHE_DIR = Path("/tmp/hpi-fidelity-cache")

# ---- the codec sweep: edit here -------------------------------------------------------------

STEPS = (0.05, 0.1, 0.15, 0.25, 0.35, 0.5)
BASIS_CHOICES = {"all": BASES, "pca": ("pca",), "raw": ("raw",), "svd": ("svd",)}
# calibrations: "weighted" is calibrate_model(lm) (the codec as shipped); "plain" is
# calibrate_model(lm, weighted=False), PCA in raw K/V units as in published KV transform codecs
CALIBRATIONS = {"weighted": {}, "plain": {"weighted": False}}

# (bases, recent, key/value steps, calibration): the full sweep is the union of these grids
SWEEP = [
    ("all", 32, STEPS, "weighted"),
    ("all", 16, (0.15, 0.25, 0.5), "weighted"),
    ("pca", 32, (0.15, 0.25, 0.5), "weighted"),
    ("raw", 32, (0.15, 0.25, 0.5), "weighted"),
    ("svd", 32, (0.25,), "weighted"),
    ("all", 32, (0.25,), "plain"),
]


@dataclass(frozen=True)
class CodecSetting:
    name: str
    family: str
    params: CodecParams
    calibration: str = "weighted"


def codec_sweep(quick: bool = False) -> list[CodecSetting]:
    """Every codec setting measured: the presets (server/spectral.py PRESETS), then the SWEEP
    grids (--quick: one step per basis choice instead)."""
    out = [CodecSetting(f"codec/preset {name}", "codec presets", p) for name, p in PRESETS.items()]
    if quick:
        return out + [CodecSetting(f"codec/{b} r32 s0.25", f"codec {b}",
                                   CodecParams(recent=32, key_step=0.25, value_step=0.25, bases=BASIS_CHOICES[b]))
                      for b in ("pca", "raw", "svd")]
    for b, recent, steps, calib in SWEEP:
        for st in steps:
            p = CodecParams(sink=4, recent=recent, key_step=st, value_step=st, bases=BASIS_CHOICES[b])
            tag = "" if calib == "weighted" else f" {calib}"
            fam = f"codec {b}" + ("" if recent == 32 else f" r{recent}") + tag
            out.append(CodecSetting(f"codec/{b} r{recent} s{st:g}{tag}", fam, p, calib))
    return out


H2O_FRACTIONS = (0.5, 0.25)

# ---- methods --------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What a method may use: the exact cache and, for H2O, the attention scores."""
    keys: torch.Tensor  # [L, G, P, Dh] post-RoPE
    values: torch.Tensor
    next_id: int
    scores: Callable[[], torch.Tensor]  # lazily computed [L, G, P]


@dataclass
class Method:
    name: str
    family: str
    run: Callable[[Ctx], tuple]  # -> (keys_hat, values_hat, keep | None, nbytes)
    key: str  # identifies the code + parameters, for the result cache
    params: dict = field(default_factory=dict)
    plot: bool = True


def methods(settings: list[CodecSetting], bases: dict, model_id: str, tokenizer_id: str) -> list[Method]:
    """Baselines, then the codec settings whose calibration is in `bases` (name -> CodecBasis)."""
    bl = _file_digest(REPO / "bench" / "baselines.py")
    codec_code = CODEC_DIGEST
    out = [
        Method("exact (fp32)", "exact", lambda c: (c.keys, c.values, None, 2 * baselines.fp16(c.keys, c.values)[3]),
               "exact", plot=False),
        Method("fp16", "fp16", lambda c: baselines.fp16(c.keys, c.values), f"fp16/{bl}"),
        Method("int8", "int8", lambda c: baselines.int8(c.keys, c.values), f"int8/{bl}"),
        Method("KIVI-4", "KIVI", lambda c: baselines.kivi(c.keys, c.values, 4), f"kivi4/{bl}", {"bits": 4}),
        Method("KIVI-2", "KIVI", lambda c: baselines.kivi(c.keys, c.values, 2), f"kivi2/{bl}", {"bits": 2}),
    ]
    for f in H2O_FRACTIONS:
        out.append(Method(f"H2O {f:g}", "H2O", lambda c, f=f: baselines.h2o(c.keys, c.values, c.scores(), f),
                          f"h2o{f}/{bl}", {"fraction": f}))
    for cs in settings:
        if cs.calibration not in bases:
            continue
        basis = bases[cs.calibration]

        def run(c: Ctx, p=cs.params, basis=basis):
            data = hologram.build(c.keys, c.values, start=0, next_id=c.next_id, basis=basis, params=p,
                                  model_id=model_id, tokenizer_id=tokenizer_id, pack_hash="")
            seg = hologram.read(data, basis)
            return seg.keys, seg.values, None, len(data)

        meta = {**cs.params.to_meta(), "calibration": cs.calibration}
        out.append(Method(cs.name, cs.family, run, f"{cs.name}/{json.dumps(meta, sort_keys=True)}/{codec_code}", meta))
    return out


# ---- exact references -----------------------------------------------------------------------


@dataclass
class Reference:
    text_id: str
    prompt: list[int]  # all prompt token ids
    keys: torch.Tensor  # [L, G, P, Dh], P = len(prompt) - 1
    values: torch.Tensor
    teacher: list[int]  # greedy continuation
    logits: torch.Tensor  # [new, V] exact logits at each continuation step
    seconds: float

    @property
    def P(self) -> int:
        return len(self.prompt) - 1

    def tf_ids(self) -> torch.Tensor:
        return torch.tensor([self.prompt[-1]] + self.teacher[:-1])

    def tf_positions(self) -> torch.Tensor:
        return torch.arange(self.P, self.P + len(self.teacher))


def prompt_ids(lm, text: str, n_tokens: int) -> list[int]:
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return lm.chat_ids([{"role": "user", "content": lm.tokenizer.decode(ids)}])


def reference(lm, w: llama.LlamaWeights, text_id: str, prompt: list[int], new: int) -> Reference:
    t0 = time.perf_counter()
    P = len(prompt) - 1
    # only the cache is needed from the prefill: a 1-row LM head skips P x vocab logits
    _, kv = llama.forward(replace(w, lm_head=w.lm_head[:1]), torch.tensor(prompt[:-1]), torch.arange(P))
    keys = torch.stack([k for k, _ in kv])
    values = torch.stack([v for _, v in kv])
    past = [(k, v) for k, v in kv]
    x, teacher, logits = prompt[-1], [], []
    for i in range(new):
        lg, step_kv = llama.forward(w, torch.tensor([x]), torch.tensor([P + i]), past=past)
        past = llama.extend(past, step_kv)
        x = int(lg[0].argmax())
        teacher.append(x)
        logits.append(lg[0])
    return Reference(text_id, prompt, keys, values, teacher, torch.stack(logits), time.perf_counter() - t0)


def compare(exact_logits: torch.Tensor, logits: torch.Tensor, teacher: list[int]) -> tuple[float, float]:
    """(greedy agreement with the teacher tokens, mean KL(exact || other) per position)."""
    agree = (logits.argmax(-1) == torch.tensor(teacher)).double().mean().item()
    lp = torch.log_softmax(exact_logits.double(), -1)
    lq = torch.log_softmax(logits.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    return agree, max(kl, 0.0)


def evaluate(w: llama.LlamaWeights, ref: Reference, keys_hat, values_hat, keep) -> tuple[float, float]:
    past = [(keys_hat[i].float(), values_hat[i].float()) for i in range(keys_hat.shape[0])]
    logits, _ = llama.forward(w, ref.tf_ids(), ref.tf_positions(), past=past, past_keep=keep)
    return compare(ref.logits, logits, ref.teacher)


# ---- result cache under /tmp ----------------------------------------------------------------


class ResultCache:
    def __init__(self, enabled: bool, run_key: str):
        self.enabled = enabled
        self.dir = CACHE_DIR / run_key
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, text_id: str, key: str) -> Path:
        return self.dir / f"{text_id}.{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"

    def get(self, text_id: str, key: str) -> dict | None:
        if not self.enabled:
            return None
        p = self._path(text_id, key)
        try:
            return json.loads(p.read_text()) if p.is_file() else None
        except ValueError:
            return None

    def put(self, text_id: str, key: str, row: dict) -> None:
        if self.enabled:
            p = self._path(text_id, key)
            tmp = p.with_suffix(".tmp")
            tmp.write_text(json.dumps(row))
            os.replace(tmp, p)


# ---- pack and timing ------------------------------------------------------------------------


def pack_check(lm, w_exact, refs: list[Reference]) -> dict:
    from hpi.protocol.holo import load_hologram
    from hpi.pack import build_pack, weights_from_pack

    t0 = time.perf_counter()
    data = build_pack(lm)
    build_s = time.perf_counter() - t0
    wp = weights_from_pack(load_hologram(data))
    rows = []
    for ref in refs:
        logits, _ = llama.forward(wp, ref.tf_ids(), ref.tf_positions(),
                                  past=[(ref.keys[i], ref.values[i]) for i in range(ref.keys.shape[0])])
        a, kl = compare(ref.logits, logits, ref.teacher)
        rows.append({"text": ref.text_id, "agreement": a, "kl": kl})
    n_params = sum(p.numel() for p in lm.model.parameters())
    del wp
    return {"bytes": len(data), "fp32_param_bytes": 4 * n_params, "fp16_param_bytes": 2 * n_params,
            "build_seconds": build_s, "weights": "dequantized pack weights vs the loaded fp32 model, exact cache",
            "agreement_mean": statistics.fmean(r["agreement"] for r in rows) if rows else None,
            "agreement_min": min((r["agreement"] for r in rows), default=None),
            "kl_mean": statistics.fmean(r["kl"] for r in rows) if rows else None, "per_text": rows}


def timing(lm, basis, texts: list[corpus.Text], n_tokens: int, reps: int) -> dict:
    """Hologram build (default preset) vs transformers prefill, for one n_tokens prompt."""
    from transformers import DynamicCache

    body: list[int] = []
    for t in texts:
        body += lm.tokenizer(t.text + "\n\n", add_special_tokens=False)["input_ids"]
        if len(body) > n_tokens:
            break
    overhead = len(lm.chat_ids([{"role": "user", "content": ""}]))
    ids = lm.chat_ids([{"role": "user", "content": lm.tokenizer.decode(body[:n_tokens - overhead])}])[:n_tokens]
    x = torch.tensor([ids], device=lm.model.device)
    prefill, build, read, size = [], [], [], 0
    params = PRESETS["default"]
    for _ in range(reps):
        cache = DynamicCache(config=lm.config)
        t0 = time.perf_counter()
        with torch.no_grad():
            lm.model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)
        prefill.append(time.perf_counter() - t0)
        keys = torch.stack([layer.keys[0].float().cpu() for layer in cache.layers])
        values = torch.stack([layer.values[0].float().cpu() for layer in cache.layers])
        t0 = time.perf_counter()
        data = hologram.build(keys, values, start=0, next_id=0, basis=basis, params=params,
                              model_id=lm.model_id, tokenizer_id=lm.tokenizer_id, pack_hash="")
        build.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hologram.read(data, basis)
        read.append(time.perf_counter() - t0)
        size = len(data)
    L, G, T, Dh = keys.shape
    return {"tokens": len(ids), "reps": reps, "prefill_s": statistics.median(prefill),
            "build_s": statistics.median(build), "read_s": statistics.median(read),
            "build_over_prefill": statistics.median(build) / statistics.median(prefill),
            "hologram_bytes": size, "fp16_kv_bytes": 2 * 2 * L * G * T * Dh, "preset": "default",
            "all_prefill_s": prefill, "all_build_s": build, "all_read_s": read}


# ---- reporting ------------------------------------------------------------------------------


def machine() -> dict:
    model = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def aggregate(rows: list[dict]) -> dict:
    ag = [r["agreement"] for r in rows]
    return {"texts": len(rows),
            "ratio_mean": statistics.fmean(r["ratio"] for r in rows),
            "bytes_mean": statistics.fmean(r["nbytes"] for r in rows),
            "agreement_mean": statistics.fmean(ag), "agreement_min": min(ag),
            "kl_mean": statistics.fmean(r["kl"] for r in rows),
            "seconds_mean": statistics.fmean(r["seconds"] for r in rows)}


def summarize(m: Method, rows: list[dict]) -> dict:
    """One setting over the selected texts, and over each split among them."""
    splits = sorted({r["split"] for r in rows})
    return {"method": m.name, "family": m.family, "params": m.params, **aggregate(rows),
            "by_split": {sp: aggregate([r for r in rows if r["split"] == sp]) for sp in splits},
            "per_text": rows}


def view(summaries: list[dict], split: str | None) -> list[dict]:
    """Summaries restricted to one split (None: all selected texts)."""
    if split is None:
        return summaries
    return [{"method": s["method"], "family": s["family"], **s["by_split"][split]} for s in summaries]


def _kl(x: float) -> str:
    return f"{x:.4f}" if x >= 1e-3 else f"{x:.1e}"


def table(summaries: list[dict]) -> list[str]:
    lines = ["| method | ratio vs fp16 | agreement mean | agreement min | KL mean | s/text |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in summaries:
        lines.append(f"| {s['method']} | {s['ratio_mean']:.2f}x | {100 * s['agreement_mean']:.1f}% | "
                     f"{100 * s['agreement_min']:.1f}% | {_kl(s['kl_mean'])} | {s['seconds_mean']:.2f} |")
    return lines


def equal_size_table(select: list[dict], report: list[dict]) -> list[str]:
    """For each baseline: the codec setting with the best agreement among those at least as small
    (chosen on `select`), and both reported on `report` (the same setting order)."""
    by_name = {s["method"]: s for s in report}
    codec = [s for s in select if s["family"].startswith("codec")]
    lines = ["| baseline | ratio | agreement | min | KL | codec setting | ratio | agreement | min | KL |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    f = lambda s: (f"{s['ratio_mean']:.2f}x | {100 * s['agreement_mean']:.1f}% | "  # noqa: E731
                   f"{100 * s['agreement_min']:.1f}% | {_kl(s['kl_mean'])}")
    for b in select:
        if b["family"] in ("exact", "fp16") or b["family"].startswith("codec"):
            continue
        cands = [c for c in codec if c["ratio_mean"] >= b["ratio_mean"]]
        best = max(cands, key=lambda c: (c["agreement_mean"], -c["kl_mean"]), default=None)
        tail = f"{best['method']} | {f(by_name[best['method']])}" if best else "none that small | | | |"
        lines.append(f"| {b['method']} | {f(by_name[b['method']])} | {tail} |")
    return lines


def plot(summaries: list[dict], path: Path, title: str) -> None:
    """Agreement (left) and KL (right, log) against the size ratio, one series per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    fams: dict[str, list[dict]] = {}
    for s in summaries:
        if s.get("plot", s["family"] != "exact"):
            fams.setdefault(s["family"], []).append(s)
    markers = "os^vD<>phX*P"
    for ax, key, scale, label in ((axes[0], "agreement_mean", 100, "greedy agreement with the exact cache (%)"),
                                  (axes[1], "kl_mean", 1, "mean KL(exact || compressed), log scale")):
        for i, (fam, ss) in enumerate(fams.items()):
            ss = sorted(ss, key=lambda s: s["ratio_mean"])
            ys = [max(scale * s[key], 1e-8) for s in ss]
            ax.plot([s["ratio_mean"] for s in ss], ys, marker=markers[i % len(markers)],
                    linestyle="-" if len(ss) > 1 else "none", label=fam, alpha=0.85)
            if not fam.startswith("codec"):
                for s, y in zip(ss, ys):
                    ax.annotate(s["method"], (s["ratio_mean"], y), fontsize=7, xytext=(4, -10),
                                textcoords="offset points")
        ax.set_xscale("log")
        if key == "kl_mean":
            ax.set_yscale("log")
        ticks = [1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 16]
        lo, hi = ax.get_xlim()
        ax.set_xticks([t for t in ticks if lo <= t <= hi])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("size ratio (fp16 KV bytes / compressed bytes), log scale")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", default="dev", choices=("dev", "test", "all"))
    ap.add_argument("--limit", type=int, default=None, help="at most N texts")
    ap.add_argument("--tokens", type=int, default=640, help="prompt tokens of text")
    ap.add_argument("--new", type=int, default=64, help="continuation tokens")
    ap.add_argument("--quick", action="store_true", help="presets only; one timing repetition")
    ap.add_argument("--out", type=Path, default=REPO / "docs/results/fidelity.json")
    ap.add_argument("--plot", type=Path, default=REPO / "docs/fidelity.png")
    ap.add_argument("--md", type=Path, default=REPO / "docs/fidelity.md")
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is much faster when other jobs share the 2 cores)")
    ap.add_argument("--timing-tokens", type=int, default=2000)
    ap.add_argument("--no-pack", action="store_true")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--no-cache", action="store_true", help="do not reuse or store results under /tmp")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only rewrite --md and --plot from a result JSON written by an earlier run")
    args = ap.parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text()), args.md, args.plot))
        return
    command = "python -m bench.fidelity " + " ".join(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from hpi.models import load_model
    from hpi.pack import calibrate_model

    texts = corpus.load(args.texts, limit=args.limit)
    print(f"{len(texts)} texts ({args.texts}); loading {args.model} ...", flush=True)
    lm = load_model(args.model, device="cpu")
    w = llama.weights_from_hf(lm.model)
    settings = codec_sweep(args.quick)
    bases, calib_s = {}, 0.0
    for name in dict.fromkeys(cs.calibration for cs in settings):
        t0 = time.perf_counter()
        try:
            bases[name] = calibrate_model(lm, **CALIBRATIONS[name])
        except TypeError as e:  # the codec's calibration options changed
            print(f"skipping the {name!r} codec settings: calibrate_model(**{CALIBRATIONS[name]}) failed: {e}")
            continue
        calib_s += time.perf_counter() - t0
        print(f"codec basis ({name}) calibrated in {time.perf_counter() - t0:.1f}s", flush=True)
    basis = bases["weighted"]
    ms = methods(settings, bases, lm.model_id, lm.tokenizer_id)
    run_key = hashlib.sha256(f"{lm.model_id}|{args.tokens}|{args.new}".encode()).hexdigest()[:16]
    cache = ResultCache(not args.no_cache, run_key)

    rows: dict[str, list[dict]] = {m.name: [] for m in ms}
    refs: list[Reference] = []
    ref_s = []
    for ti, t in enumerate(texts):
        cached = {m.name: cache.get(t.id, m.key) for m in ms}
        need_ref = any(v is None for v in cached.values()) or not args.no_pack
        ref = None
        if need_ref:
            ref = reference(lm, w, t.id, prompt_ids(lm, t.text, args.tokens), args.new)
            refs.append(ref)
            ref_s.append(ref.seconds)
        scores_box: list[torch.Tensor] = []

        def scores(ref=ref, box=scores_box):
            if not box:
                box.append(baselines.attention_scores_hf(lm.model, torch.tensor(ref.prompt[:-1])))
            return box[0]

        line = []
        for m in ms:
            row = cached[m.name]
            if row is None:
                ctx = Ctx(ref.keys, ref.values, ref.prompt[-1], scores)
                t0 = time.perf_counter()
                k_hat, v_hat, keep, nbytes = m.run(ctx)
                agree, kl = evaluate(w, ref, k_hat, v_hat, keep)
                L, G, P, Dh = ref.keys.shape
                row = {"text": t.id, "P": P, "nbytes": int(nbytes), "ratio": 2 * 2 * L * G * P * Dh / nbytes,
                       "agreement": agree, "kl": kl, "seconds": time.perf_counter() - t0}
                cache.put(t.id, m.key, row)
            row = {**row, "split": t.split}
            rows[m.name].append(row)
            line.append(f"{m.name}={100 * row['agreement']:.0f}%")
        print(f"[{ti + 1}/{len(texts)}] {t.id} P={rows[ms[0].name][-1]['P']} "
              f"({time.perf_counter() - t_start:.0f}s) " + " ".join(line[:8]) + " ...", flush=True)

    summaries = []
    for m in ms:
        s = summarize(m, rows[m.name])
        s["plot"] = m.plot
        summaries.append(s)
    Ps = [r["P"] for r in rows[ms[0].name]]

    pack = None
    if not args.no_pack:
        print("building the model pack ...", flush=True)
        pack = pack_check(lm, w, refs)
    tim = None
    if not args.no_timing:
        print(f"timing a {args.timing_tokens}-token prompt ...", flush=True)
        tim = timing(lm, basis, corpus.load("all"), args.timing_tokens, 1 if args.quick else 3)
    total_s = time.perf_counter() - t_start

    mach = machine()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result = {"machine": mach, "date": date, "command": command, "model": lm.model_id, "codec": CODEC_REV,
              "codec_files": list(CODEC_FILES), "texts": [t.id for t in texts],
              "splits": {t.id: t.split for t in texts}, "selection": args.texts,
              "tokens": args.tokens, "new": args.new, "P_range": [min(Ps), max(Ps)],
              "sink": baselines.SINK, "recent": baselines.RECENT,
              "run_seconds": total_s, "calibration_seconds": calib_s,
              "reference_seconds_mean": statistics.fmean(ref_s) if ref_s else None,
              "settings": summaries, "pack": pack, "timing": tim}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    text = render(result, args.md, args.plot)
    print()
    print(text)
    print(f"wrote {args.out}, {args.md}, {args.plot} in {total_s / 60:.1f} min")


def render(result: dict, md_path: Path, plot_path: Path) -> str:
    """Write the markdown report and the plot from a result JSON; returns the markdown."""
    summaries, texts = result["settings"], result["texts"]
    splits = result["splits"]
    mach, pack, tim = result["machine"], result["pack"], result["timing"]
    ref_s = result.get("reference_seconds_mean")
    header = ["# KV-cache fidelity: spectral codec vs baselines", "",
              f"- machine: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']} ({mach['torch_threads']} threads), "
              f"Python {mach['python']}",
              f"- date: {result['date']}",
              f"- command: `{result['command']}`",
              f"- codec: commit {result['codec']} of {', '.join(result['codec_files'])}",
              f"- model: `{result['model']}`; texts: {len(texts)} ({result['selection']}: {', '.join(texts)})",
              f"- prompt: chat template around the first {result['tokens']} tokens of each text "
              f"(P = {result['P_range'][0]}..{result['P_range'][1]} cached tokens); "
              f"{result['new']} greedy continuation tokens, teacher-forced over the compressed cache",
              f"- all methods keep the first {result['sink']} tokens exact; baselines keep the last "
              f"{result['recent']} exact, the codec its `recent`; sizes count those fp16 bytes "
              f"(codec: the whole .holo file); H2O's fraction is of all P tokens, sink and recent included; "
              f"continuation tokens are never compressed or evicted",
              f"- ratio = fp16 K/V bytes of the P cached tokens / compressed bytes; agreement = share of the "
              f"{result['new']} positions whose argmax is the exact greedy token; KL = mean KL(exact || compressed)",
              f"- run time: {result['run_seconds'] / 60:.1f} min (calibration {result['calibration_seconds']:.0f}s, "
              f"exact reference per text {ref_s if ref_s is not None else float('nan'):.1f}s)", ""]
    md = header + [f"## All settings, all {len(texts)} texts", ""] + table(summaries) + [""]
    if set(splits.values()) == {"dev", "test"}:
        n_test = sum(v == "test" for v in splits.values())
        md += [f"## All settings, the {n_test} test texts only", ""]
        md += table(view(summaries, "test")) + [""]
        md += ["## Codec vs each baseline at equal or smaller size", "",
               "For each baseline, the codec setting with the best mean agreement among those whose mean "
               "size ratio is at least the baseline's, both chosen on the dev texts; the numbers are on "
               "the test texts.", ""]
        md += equal_size_table(view(summaries, "dev"), view(summaries, "test")) + [""]
    else:
        md += ["## Codec vs each baseline at equal or smaller size", "",
               "For each baseline, the codec setting with the best mean agreement among those whose mean "
               "size ratio is at least the baseline's (chosen on these same texts, so optimistic).", ""]
        md += equal_size_table(summaries, summaries) + [""]
    if pack:
        md += ["## Model pack", "",
               f"- pack size {pack['bytes'] / 1e6:.1f} MB (fp16 weights would be {pack['fp16_param_bytes'] / 1e6:.1f} MB, "
               f"fp32 {pack['fp32_param_bytes'] / 1e6:.1f} MB); built in {pack['build_seconds']:.1f}s",
               f"- pack weights vs loaded fp32 weights over the same teacher-forced positions (exact cache): "
               f"agreement {100 * pack['agreement_mean']:.1f}% (min {100 * pack['agreement_min']:.1f}%), "
               f"KL {pack['kl_mean']:.2e}", ""]
    if tim:
        md += ["## Hologram build time", "",
               f"- {tim['tokens']}-token prompt, preset `{tim['preset']}`, median of {tim['reps']}: transformers "
               f"prefill {tim['prefill_s']:.2f}s, hologram build {tim['build_s']:.2f}s "
               f"({tim['build_over_prefill']:.2f}x the prefill), hologram read {tim['read_s']:.2f}s",
               f"- hologram {tim['hologram_bytes'] / 1e6:.2f} MB vs fp16 KV {tim['fp16_kv_bytes'] / 1e6:.2f} MB "
               f"({tim['fp16_kv_bytes'] / tim['hologram_bytes']:.2f}x)", ""]
    md += [f"![agreement and KL vs size]({os.path.relpath(plot_path, md_path.parent)})", ""]
    text = "\n".join(md)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    plot(summaries, plot_path, f"SmolLM2-135M, {len(texts)} texts, {result['tokens']}-token prompts, "
                               f"{result['new']} tokens; ratio vs fp16 KV")
    return text


if __name__ == "__main__":
    main()
