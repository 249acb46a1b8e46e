import subprocess
import sys

import numpy as np
import pytest
import uvicorn

from hpi.protocol.holo import Holo, load_hologram, save_hologram
from hpi.cli import main
from hpi.serving import server_options


@pytest.fixture
def holo_file(tmp_path):
    holo = Holo("conversation", {"start": 0, "end": 3, "note": "test"},
                {"k.codes": np.zeros((2, 3, 4), np.int8), "scale": np.ones(5, np.float32)})
    path = tmp_path / "x.holo"
    path.write_bytes(save_hologram(holo, deflate={"k.codes"}))
    return path


def table_row(out: str, name: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.startswith(name + " "))


def test_holo_inspect(holo_file, capsys):
    assert main(["holo", "inspect", str(holo_file)]) == 0
    out = capsys.readouterr().out
    assert "kind: conversation" in out and '"note": "test"' in out
    codes = table_row(out, "k.codes")
    assert codes[1:3] == ["int8", "2x3x4"] and codes[4] == "yes" and int(codes[3]) < 24
    assert table_row(out, "scale")[1:] == ["float32", "5", "20", "no"]


def test_holo_inspect_bad_input(holo_file, tmp_path, capsys):
    data = bytearray(holo_file.read_bytes())
    data[100] ^= 0xFF
    bad = tmp_path / "bad.holo"
    bad.write_bytes(bytes(data))
    assert main(["holo", "inspect", str(bad)]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert main(["holo", "inspect", str(tmp_path / "missing.holo")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_holo_build(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "c.holo"
    assert main(["holo", "build", "--prompt", "Hello there", "--system", "Be brief.",
                 "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    holo = load_hologram(out.read_bytes())
    assert holo.kind == "conversation" and holo.meta["start"] == 0
    assert f"{holo.meta['end'] + 1} tokens" in printed and "fp16 KV" in printed and "ratio" in printed
    assert f"{out.stat().st_size} bytes" in printed
    assert main(["holo", "inspect", str(out)]) == 0


def test_pack_build(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pack.holo"
    assert main(["pack", "build", "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    assert load_hologram(out.read_bytes()).kind == "model_pack"
    assert "model_key" in capsys.readouterr().out


def test_serve_help():
    r = subprocess.run([sys.executable, "-m", "hpi.cli", "serve", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for flag in ("--model", "--resonator-model", "--host", "--port", "--codec"):
        assert flag in r.stdout


def test_serve_flags_override_env(monkeypatch, tiny_model_dir):
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    monkeypatch.setenv("HPI_PORT", "9999")
    monkeypatch.setenv("HPI_HOST", "127.0.0.2")
    assert main(["serve", "--model", str(tiny_model_dir), "--port", "8123"]) == 0
    assert calls == [{"host": "127.0.0.2", "port": 8123, **server_options()}]


def test_serve_bad_model_or_codec(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--codec", "bogus"]) == 2
    assert "unknown codec preset" in capsys.readouterr().err
