"""The unchanged browser engine under Node + Dawn (bench/gpu/gpu_kernels.mjs) against the Python one.

The runner decodes from the tiny model's pack and a hologram written by bench/gpu_kernels.py,
on whatever adapter Dawn finds (here: SwiftShader, Chromium's software Vulkan driver), in
every gemv layout resonator.js offers; its greedy tokens must equal the Python reference
resonator's. The first run installs the npm package `webgpu` into bench/gpu/node_modules.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest

from bench import gpu_kernels
from hpi.resonator import Resonator

CONTEXT, NEW = 40, 12


def vulkan_icd() -> str | None:
    """A Vulkan driver manifest Dawn can load, or None."""
    for path in os.environ.get("VK_ICD_FILENAMES", "").split(":") + ["/usr/lib/chromium/vk_swiftshader_icd.json"]:
        if path and os.path.isfile(path):
            return path
    found = [p for d in ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d") for p in glob.glob(f"{d}/*.json")]
    return found[0] if found else None


pytestmark = [
    pytest.mark.skipif(vulkan_icd() is None, reason="no Vulkan ICD installed (chromium's SwiftShader, "
                       "/usr/lib/chromium/vk_swiftshader_icd.json, or a GPU driver): Dawn has no adapter"),
    pytest.mark.skipif(shutil.which("node") is None, reason="node (>= 20) is not on PATH"),
]


def test_runner_tokens_equal_the_python_resonator(tiny, tiny_anchor, tmp_path):
    files = gpu_kernels.prepare(tiny_anchor, tiny, [CONTEXT], tmp_path / "files")
    out = tmp_path / "result.json"
    r = gpu_kernels.run_runner(files, ["--new", str(NEW), "--warmup", "2", "--profile-repeats", "1",
                                       "--probe-mb", "8", "--out", str(out)],
                               capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(out.read_text())

    holo = (files / f"context-{CONTEXT}.holo").read_bytes()
    ref = Resonator(tiny_anchor.pack_bytes)
    ref.add_hologram(holo)
    want = ref.generate(NEW, stop_at_eos=False)

    assert result["adapter"]["features"] is not None and result["bandwidth"]["gbS"] > 0
    assert result["layouts"], "no layout ran"
    for layout in result["layouts"]:
        assert not layout["errors"], layout["errors"]
        c = layout["contexts"][str(CONTEXT)]
        assert c["positions"] == CONTEXT
        assert c["tokens"] == want, f"layout {layout['layout']}: WGSL {c['tokens']} vs Python {want}"
        assert c["dispatchesPerToken"] == sum(c["dispatches"].values()) > 0
        assert c["tokS"] > 0 and layout["bytesPerToken"] > 0
        assert c["profile"]["kernels"] and all(ms >= 0 for ms in c["profile"]["kernels"].values())
    assert "| layout | context | tok/s |" in r.stdout
    assert result["chosenLayout"] in {layout["layout"] for layout in result["layouts"]}


def test_runner_runs_an_older_engine(tiny, tiny_anchor, tmp_path):
    """--client / --shaders: the engine before the two gemv layouts (bench/layouts.py's baseline), same tokens."""
    from bench import layouts
    engine = layouts.baseline_engine(layouts.BASELINE, tmp_path / "baseline")
    if isinstance(engine, str):
        pytest.skip(engine)
    files = gpu_kernels.prepare(tiny_anchor, tiny, [CONTEXT], tmp_path / "files")
    out = tmp_path / "result.json"
    r = gpu_kernels.run_runner(files, ["--new", str(NEW), "--warmup", "1", "--profile-repeats", "0", "--probe-mb", "8",
                                       "--client", str(engine[0]), "--shaders", str(engine[1]), "--out", str(out)],
                               capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(out.read_text())

    ref = Resonator(tiny_anchor.pack_bytes)
    ref.add_hologram((files / f"context-{CONTEXT}.holo").read_bytes())
    assert result["client"] == str(engine[0]) and result["chosenLayout"] is None  # it had one layout, no choice
    [layout] = result["layouts"]
    assert layout["layout"] == "default" and not layout["errors"]
    assert layout["contexts"][str(CONTEXT)]["tokens"] == ref.generate(NEW, stop_at_eos=False)
