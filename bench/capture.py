"""State capture: its cost over a plain forward pass, and hyperbolic vs Euclidean vs cosine retrieval.

**Overhead.** The first N tokens of a corpus text (bench/corpus.py), for a few N, through

  plain             the model's own forward as the anchor's prefill runs it (transformers, its
                    default attention, logits of the last position only);
  eager+attentions  transformers with eager attention and `output_attentions=True`, the usual
                    way to see attention weights (all layers' patterns come back);
  capture           server/capture.py's default answer: aggregates over all layers and heads
                    (entropy, attention received, activation norms, peaks, per-head summaries,
                    trajectory), no raw states;
  capture+patterns  the same, also keeping every layer's raw `attn.hook_pattern`.

Each variant runs once untimed, then the variants alternate within each repeat; the median
wall time of the repeats is reported, and its ratio to `plain` from the same run.

**Retrieval.** Does a Poincaré ball (server/hyperbolic.py) find states of the same text family
better than Euclidean or cosine distance over the same vectors? Documents from six sources
(the coarse families): licences, standard-library module docstrings, torch/numpy module
docstrings, package READMEs (all from bench/corpus.py), this repo's own docs, and Python's
language reference (`pydoc_data.topics`). Each document (a fine family) gives P passages of
W tokens, evenly spaced and disjoint. A passage's state is the mean of `hook_resid_post` over
its tokens 1..W-1 (position 0, the attention sink, has outsized norms) at three depths. All
passages go into one collection (its first batch: the scale, and the centre when centring, come
from all of them); each passage then queries it, and its own entry is dropped from the answer
(leave-one-out). precision@k = share of the k nearest that share the query's document (fine)
or source (coarse). Hyperbolic runs at three curvatures with the store's default scale (the
median state sits at R = 2 sqrt(c) from the origin: nearly flat at c = 0.1, strongly curved at
c = 10). A paired bootstrap over queries gives a 95% interval for the difference of fine
precision@10 between hyperbolic (c = 1) and the better of Euclidean and cosine.

    python -m bench.capture                                  # the full run (about 10 minutes here)
    python -m bench.capture --lengths 64,128 --passages 3 --docs-per-source 3 --repeats 1 --out /tmp/c.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from bench import corpus
from hpi.capture import Dims, capture, select
from hpi.hyperbolic import StateStore
from hpi.models import LoadedModel, load_model

REPO = Path(__file__).resolve().parent.parent
REPO_DOCS = ["README.md", "docs/codec.md", "docs/fidelity.md", "docs/resonator.md", "protocol/SPEC.md",
             "client_web/README.md", "shaders/README.md"]
REFERENCE_TOPICS = ["specialnames", "compound", "formatstrings", "string-methods", "typesseq", "debugger",
                    "execmodel", "import"]
OVERHEAD_TEXT = "licence-gpl-3"
METRICS = [("cosine", None), ("euclidean", None), ("hyperbolic", 0.1), ("hyperbolic", 1.0), ("hyperbolic", 10.0)]
KS = (1, 5, 10)


# ---- overhead ---------------------------------------------------------------------------------

def overhead(lm: LoadedModel, lengths: list[int], repeats: int) -> list[dict]:
    text = next(t for t in corpus.load("all") if t.id == OVERHEAD_TEXT).text
    all_ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    dims = Dims.of(lm.config)
    model = lm.model
    default_attn = model.config._attn_implementation

    def plain(ids):
        model(input_ids=torch.tensor([ids]), logits_to_keep=1)

    def eager(ids):
        model.set_attn_implementation("eager")
        try:
            model(input_ids=torch.tensor([ids]), output_attentions=True, logits_to_keep=1)
        finally:
            model.set_attn_implementation(default_attn)

    def aggregates(ids):
        capture(lm, ids, select(dims, len(ids)))

    def patterns(ids):
        capture(lm, ids, select(dims, len(ids), states=["attn.hook_pattern"]))

    variants = {"plain": plain, "eager+attentions": eager, "capture": aggregates, "capture+patterns": patterns}
    rows = []
    for n in lengths:
        if n > len(all_ids):
            raise SystemExit(f"{OVERHEAD_TEXT} has {len(all_ids)} tokens, fewer than {n}")
        ids = all_ids[:n]
        times = {k: [] for k in variants}
        with torch.no_grad():
            for fn in variants.values():
                fn(ids)  # warm-up: first-call allocations
            for _ in range(repeats):
                for name, fn in variants.items():
                    t0 = time.perf_counter()
                    fn(ids)
                    times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"tokens": n, "seconds": med, "ratio": {k: med[k] / med["plain"] for k in med},
                     "all_seconds": times})
        print(f"  {n} tokens: " + ", ".join(f"{k} {v:.3f}s" for k, v in med.items()), file=sys.stderr)
    return rows


# ---- retrieval --------------------------------------------------------------------------------

def documents(docs_per_source: int) -> list[dict]:
    """(source, id, text) of every document, at most `docs_per_source` per source."""
    import pydoc_data.topics

    sources = {"licence": [], "stdlib docstring": [], "torch/numpy docstring": [], "package readme": [],
               "repo docs": [], "python reference": []}
    for t in corpus.load("all"):
        kind = ("licence" if t.id.startswith("licence-") else "stdlib docstring" if t.id.startswith("stdlib-")
                else "package readme" if t.id.startswith("readme-") else "torch/numpy docstring")
        sources[kind].append((t.id, t.text))
    sources["repo docs"] = [(p, (REPO / p).read_text()) for p in REPO_DOCS]
    sources["python reference"] = [(f"pydoc:{k}", pydoc_data.topics.topics[k]) for k in REFERENCE_TOPICS]
    return [{"source": s, "id": i, "text": text, "sha256": hashlib.sha256(text.encode()).hexdigest()}
            for s, docs in sources.items() for i, text in docs[:docs_per_source]]


def passages(lm: LoadedModel, docs: list[dict], per_doc: int, width: int) -> list[dict]:
    out = []
    for d in docs:
        ids = lm.tokenizer(d["text"], add_special_tokens=False)["input_ids"]
        n = min(per_doc, len(ids) // width)
        if n < 2:
            raise SystemExit(f"{d['id']} has {len(ids)} tokens: fewer than 2 passages of {width}")
        for s in np.linspace(0, len(ids) - width, n).round().astype(int):
            out.append({"doc": d["id"], "source": d["source"], "start": int(s), "ids": ids[s:s + width]})
    return out


def states(lm: LoadedModel, items: list[dict], layers: list[int]) -> np.ndarray:
    """Mean hook_resid_post over tokens 1.. of each passage: [layers, passages, Dm]."""
    dims = Dims.of(lm.config)
    out = []
    for i, p in enumerate(items):
        cap = capture(lm, p["ids"], select(dims, len(p["ids"]), layers=layers, states=["hook_resid_post"], start=1))
        out.append([cap.tensors[f"blocks.{layer}.hook_resid_post"].mean(0) for layer in layers])
        if i % 50 == 0:
            print(f"  states {i}/{len(items)}", file=sys.stderr)
    return np.asarray(out, dtype=np.float32).transpose(1, 0, 2)


def precision(vectors: np.ndarray, items: list[dict], metric: str, c: float | None, center: bool) -> dict:
    """Per-query precision@k (fine: same document, coarse: same source), leave-one-out."""
    store = StateStore(1 << 40)
    col, _ = store.add("bench", vectors, [{} for _ in items], {}, curvature=-(c or 1.0), center=center)
    idx, _ = col.search(vectors, max(KS) + 1, metric)
    doc = np.array([p["doc"] for p in items])
    src = np.array([p["source"] for p in items])
    fine, coarse = {k: [] for k in KS}, {k: [] for k in KS}
    for q, row in enumerate(idx):
        others = [i for i in row if i != q][:max(KS)]  # the query's own entry is not an answer
        for k in KS:
            fine[k].append(float(np.mean(doc[others[:k]] == doc[q])))
            coarse[k].append(float(np.mean(src[others[:k]] == src[q])))
    return {"fine": fine, "coarse": coarse}


def chance(items: list[dict]) -> dict:
    """Expected precision of a random ranking (any k): same-family share of the other passages."""
    n = len(items)
    fine = statistics.fmean((sum(o["doc"] == p["doc"] for o in items) - 1) / (n - 1) for p in items)
    coarse = statistics.fmean((sum(o["source"] == p["source"] for o in items) - 1) / (n - 1) for p in items)
    return {"fine": fine, "coarse": coarse}


def bootstrap_diff(a: list[float], b: list[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    a, b = np.asarray(a), np.asarray(b)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(a), size=(rounds, len(a)))
    diffs = (a[picks] - b[picks]).mean(1)
    return float((a - b).mean()), float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def retrieval(lm: LoadedModel, docs_per_source: int, per_doc: int, width: int) -> dict:
    docs = documents(docs_per_source)
    items = passages(lm, docs, per_doc, width)
    L = lm.config.num_hidden_layers
    layers = sorted({L // 5, L // 2, 4 * L // 5})
    t0 = time.perf_counter()
    vecs = states(lm, items, layers)
    capture_s = time.perf_counter() - t0
    rows, tests = [], []
    for li, layer in enumerate(layers):
        for center in (False, True):
            per = {}
            for metric, c in METRICS:
                name = metric if c is None else f"hyperbolic c={c:g}"
                per[name] = precision(vecs[li], items, metric, c, center)
                rows.append({"layer": layer, "center": center, "metric": name,
                             **{f"{lvl}_p@{k}": statistics.fmean(per[name][lvl][k]) for lvl in ("fine", "coarse")
                                for k in KS}})
            flat = max(("euclidean", "cosine"), key=lambda m: statistics.fmean(per[m]["fine"][10]))
            diff, lo, hi = bootstrap_diff(per["hyperbolic c=1"]["fine"][10], per[flat]["fine"][10])
            tests.append({"layer": layer, "center": center, "against": flat, "diff": diff, "ci95": [lo, hi]})
    return {"layers": layers, "passages": len(items), "documents": len(docs), "width": width, "per_doc": per_doc,
            "sources": sorted({d["source"] for d in docs}), "chance": chance(items),
            "docs": [{k: d[k] for k in ("source", "id", "sha256")} for d in docs],
            "state_seconds": capture_s, "rows": rows, "tests": tests}


# ---- reporting --------------------------------------------------------------------------------

def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average": os.getloadavg()[0]}


def render(r: dict) -> str:
    m = r["machine"]
    out = [f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
           f"Python {m['python']}; 1-min load average {m['load_average']:.2f} at start, {r['load_end']:.2f} at end "
           "(the cores were shared with other work)",
           f"- date: {r['date']}; run time {r['run_seconds'] / 60:.1f} min; commit {r['commit']}",
           f"- command: `{r['command']}`", f"- model: `{r['model']}`", ""]
    if r.get("overhead"):
        out += ["### Capture overhead (median of %d, ratio to plain)" % r["repeats"], "",
                "| tokens | plain s | eager+attentions | capture (aggregates) | capture+patterns |",
                "|---:|---:|---:|---:|---:|"]
        for row in r["overhead"]:
            s, q = row["seconds"], row["ratio"]
            out.append(f"| {row['tokens']} | {s['plain']:.3f} | {s['eager+attentions']:.3f} s ({q['eager+attentions']:.2f}x) "
                       f"| {s['capture']:.3f} s ({q['capture']:.2f}x) | {s['capture+patterns']:.3f} s "
                       f"({q['capture+patterns']:.2f}x) |")
        out.append("")
    if r.get("retrieval"):
        t = r["retrieval"]
        out += [f"### Retrieval: {t['passages']} passages of {t['width']} tokens, {t['documents']} documents, "
                f"{len(t['sources'])} sources", "",
                f"Chance (random ranking): fine {t['chance']['fine']:.3f}, coarse {t['chance']['coarse']:.3f}. "
                f"States of all passages: {t['state_seconds']:.0f} s.", "",
                "| layer | centred | metric | fine p@1 | fine p@5 | fine p@10 | coarse p@1 | coarse p@5 | coarse p@10 |",
                "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in t["rows"]:
            out.append(f"| {row['layer']} | {'yes' if row['center'] else 'no'} | {row['metric']} | "
                       + " | ".join(f"{row[f'{lvl}_p@{k}']:.3f}" for lvl in ("fine", "coarse") for k in KS) + " |")
        out += ["", "Hyperbolic (c = 1) minus the better flat metric, fine precision@10, paired bootstrap over queries:", "",
                "| layer | centred | against | difference | 95% interval |", "|---:|---|---|---:|---|"]
        for s in t["tests"]:
            out.append(f"| {s['layer']} | {'yes' if s['center'] else 'no'} | {s['against']} | {s['diff']:+.3f} | "
                       f"[{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}] |")
        out += ["", verdict(t)]
    return "\n".join(out)


def verdict(t: dict) -> str:
    best = {}
    for row in t["rows"]:
        kind = "hyperbolic" if row["metric"].startswith("hyperbolic") else "flat"
        best[kind] = max(best.get(kind, 0.0), row["fine_p@10"])
    better = sum(s["ci95"][0] > 0 for s in t["tests"])
    worse = sum(s["ci95"][1] < 0 for s in t["tests"])
    return (f"Verdict: best fine p@10 hyperbolic {best['hyperbolic']:.3f}, flat (Euclidean/cosine) {best['flat']:.3f}; "
            f"hyperbolic c = 1 is significantly better in {better} and significantly worse in {worse} of "
            f"{len(t['tests'])} layer x centring settings.")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--lengths", default="128,512,1024", help="overhead: context lengths in tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: less disturbed by other work on the cores)")
    ap.add_argument("--passages", type=int, default=6, help="retrieval: passages per document")
    ap.add_argument("--width", type=int, default=64, help="retrieval: tokens per passage")
    ap.add_argument("--docs-per-source", type=int, default=8)
    ap.add_argument("--skip", choices=("overhead", "retrieval"), help="leave one part out")
    ap.add_argument("--out", type=Path, default=REPO / "docs/results/capture.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    result = {"machine": machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": " ".join(["python -m bench.capture", *(argv if argv is not None else sys.argv[1:])]),
              "commit": commit, "repeats": args.repeats}
    lm = load_model(args.model, "cpu")
    result["model"] = lm.model_id
    if args.skip != "overhead":
        print("overhead", file=sys.stderr)
        result["overhead"] = overhead(lm, [int(x) for x in args.lengths.split(",")], args.repeats)
    if args.skip != "retrieval":
        print("retrieval", file=sys.stderr)
        result["retrieval"] = retrieval(lm, args.docs_per_source, args.passages, args.width)
    result["run_seconds"] = time.perf_counter() - t0
    result["load_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))


if __name__ == "__main__":
    main()
