"""Model configuration errors are caught before anything runs, with a message saying why."""

import json

import pytest
import torch

from hpi.anchor import Anchor
from hpi.models import ModelError, check_same_tokenizer, load_model, resolve_model_path
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
    from hpi.anchor import Caches
    caches = Caches()
    ids = tiny.chat_ids([{"role": "user", "content": "two models, one tokenizer"}])
    anchor.prefill(caches, ids)
    assert caches.resonator is not None and caches.resonator.get_seq_length() == len(ids)
    from hpi.protocol.holo import load_hologram
    meta = load_hologram(anchor.hologram_bytes(caches)).meta
    assert meta["model_id"] == tiny.model_id and meta["kv_heads"] == tiny.config.num_key_value_heads


@pytest.mark.real_model
def test_a_gguf_model_kept_converted_loads_the_same_model(smollm, tmp_path):
    first = load_model("default", device="cpu", cache=tmp_path)  # converts and keeps the HF folder
    (folder,) = tmp_path.iterdir()
    assert (folder / "model.safetensors").is_file() and folder.name == smollm.model_id
    again = load_model("default", device="cpu", cache=tmp_path)  # from the folder
    for lm in (first, again):
        assert (lm.path, lm.model_id, lm.tokenizer_id) == (smollm.path, smollm.model_id, smollm.tokenizer_id)
        theirs = lm.model.state_dict()
        assert all(torch.equal(w, theirs[k]) for k, w in smollm.model.state_dict().items())
        messages = [{"role": "user", "content": "Grüße, naïve café — 東京 ✓"}]
        assert lm.chat_ids(messages) == smollm.chat_ids(messages)
    # the forward over the GGUF blocks checks, row by row, that they hold exactly these weights
    assert again.scheduler.engine.all_kernels
