"""The browser engine's WGSL kernels outside the browser: Node + Dawn (bench/gpu/gpu_kernels.mjs).

This driver builds what the engine reads, with the anchor: the model pack and, per context
length, a conversation hologram of that many cached positions (the corpus texts, bench/corpus.py,
cut to length, no chat template), written to a folder with an info.json; then it runs the
Node runner on that folder, which reports the adapter, decode tok/s, per-kernel ms, dispatches
and bytes of weights per token and their share of the adapter's copy bandwidth (table on
stdout, JSON next to the files or at --out).

    python -m bench.gpu_kernels                          # SmolLM2, context 256
    python -m bench.gpu_kernels --ctx 256,1024,4096      # more context lengths
    python -m bench.gpu_kernels --model tiny --new 8     # the tests' tiny random Llama
    python -m bench.gpu_kernels --prepare-only           # files only, to carry to a GPU machine:
    node bench/gpu/gpu_kernels.mjs --files var/gpu-kernels/<model> --no-install

The runner installs its npm package (webgpu, Dawn prebuilt) into bench/gpu/node_modules on
first use. Without a GPU it runs on SwiftShader, the software Vulkan driver Chromium ships.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "bench" / "gpu" / "gpu_kernels.mjs"
FILES = REPO / "var" / "gpu-kernels"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def context_ids(lm, n: int) -> list[int]:
    """n token ids of real text: the corpus texts in order (bench/corpus.py), repeated if short."""
    try:
        from bench import corpus
        texts = [t.text for t in corpus.load("all")]
    except Exception as e:  # another package version changed a text: any real text will do
        log(f"corpus unavailable ({e}); using standard-library sources")
        import inspect
        import json.decoder
        import textwrap
        texts = [inspect.getsource(m) for m in (textwrap, json.decoder)]
    ids: list[int] = []
    while len(ids) < n:
        for t in texts:
            ids += lm.tokenizer(t + "\n\n", add_special_tokens=False)["input_ids"]
            if len(ids) >= n:
                break
    return ids[:n]


def prepare(anchor, lm, contexts: list[int], out: Path) -> Path:
    """Write the pack and a hologram of each context length (positions [0, ctx)) to `out`, with
    info.json; files already there for the same pack are kept."""
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / "info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info.get("pack_hash") != anchor.pack_hash or not (out / info.get("pack", "-")).is_file():
        info = {"model": lm.model_id, "pack": "pack.holo", "pack_hash": anchor.pack_hash, "contexts": {}}
        (out / "pack.holo").write_bytes(anchor.pack_bytes)
    for ctx in contexts:
        name = f"context-{ctx}.holo"
        if str(ctx) in info["contexts"] and (out / name).is_file():
            continue
        ids = context_ids(lm, ctx + 1)  # the last one is the first token the engine feeds
        caches = anchor.restore(ids, pending=False)
        (out / name).write_bytes(anchor.hologram_bytes(caches))
        info["contexts"][str(ctx)] = {"file": name, "next_id": ids[-1]}
        log(f"hologram of {ctx} positions -> {out / name}")
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return out


def run_runner(files: Path, runner_args: list[str], **kw) -> subprocess.CompletedProcess:
    """node bench/gpu/gpu_kernels.mjs --files `files` `runner_args` (subprocess.run keywords in `kw`)."""
    node = shutil.which("node")
    if node is None:
        raise SystemExit("node (>= 20) is not on PATH")
    return subprocess.run([node, str(RUNNER), "--files", str(files), *runner_args], **kw)


def load(model: str, tiny_dir: Path):
    from hpi.models import load_model
    if model == "tiny":
        if not (tiny_dir / "config.json").is_file():
            sys.path.insert(0, str(REPO))
            from tests.tiny_model import build_tiny_llama
            build_tiny_llama(tiny_dir)
        model = str(tiny_dir)
    return load_model(model, device="cpu")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="'default' (SmolLM2), 'tiny' (tests/tiny_model.py) or a path")
    ap.add_argument("--ctx", default="256", help="context lengths (cached positions), comma-separated")
    ap.add_argument("--files", type=Path, default=None, help=f"folder for pack + holograms (default {FILES}/<model>)")
    ap.add_argument("--prepare-only", action="store_true", help="write the files, do not run the engine")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the anchor's prefill")
    args, rest = ap.parse_known_args(argv)  # the rest goes to the runner (--new, --layouts, --out, ...)
    contexts = sorted({int(c) for c in args.ctx.split(",") if c.strip()})

    import torch
    torch.set_num_threads(args.threads)
    from hpi.anchor import Anchor
    from hpi.config import Settings
    lm = load(args.model, FILES / "tiny-model")
    anchor = Anchor(lm, **Settings().anchor_options())
    files = args.files or FILES / anchor.model_key
    prepare(anchor, lm, contexts, files)
    if args.prepare_only:
        print(files)
        return
    r = run_runner(files, ["--ctx", ",".join(map(str, contexts)), *rest])
    raise SystemExit(r.returncode)


if __name__ == "__main__":
    main()
