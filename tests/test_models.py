"""Model configuration errors are caught before anything runs, with a message saying why."""

import json

import pytest

from server.anchor import Anchor
from server.models import ModelError, check_same_tokenizer, load_model, resolve_model_path
from tests.tiny_model import build_tiny_llama


def test_missing_path(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="without config.json"):
        resolve_model_path(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf"):
        resolve_model_path(str(tmp_path / "weights.bin"))


def test_non_llama_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(ModelError, match="'gpt2' model; HPI runs Llama"):
        load_model(str(tmp_path))


def test_tokenizer_mismatch(tiny, tmp_path, monkeypatch):
    import tests.tiny_model as tm

    monkeypatch.setattr(tm, "training_text", lambda: ["a completely different corpus " * 50])
    other = load_model(str(build_tiny_llama(tmp_path / "other", vocab=300)))
    with pytest.raises(ModelError, match="tokenizer mismatch"):
        check_same_tokenizer(tiny, other)
    with pytest.raises(ModelError, match="must share a tokenizer"):
        Anchor(tiny, other)


def test_same_tokenizer_different_models(tiny, tmp_path):
    bigger = load_model(str(build_tiny_llama(tmp_path / "big", layers=3, hidden=96, heads=6, kv_heads=3)))
    anchor = Anchor(bigger, tiny, calibration_tokens=256)  # a bigger anchor, the tiny one in the browser
    from server.anchor import Caches
    caches = Caches()
    ids = tiny.chat_ids([{"role": "user", "content": "two models, one tokenizer"}])
    anchor.prefill(caches, ids)
    assert caches.resonator is not None and caches.resonator.get_seq_length() == len(ids)
    from protocol.holo import load_hologram
    meta = load_hologram(anchor.hologram_bytes(caches)).meta
    assert meta["model_id"] == tiny.model_id and meta["kv_heads"] == tiny.config.num_key_value_heads
