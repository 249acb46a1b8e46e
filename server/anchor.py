"""The anchor: the exact model, its KV caches, and the holograms and model pack built from them.

The anchor model is the truth. The resonator model (the one the browser runs, by default
the same) gets its own KV cache when it differs, because a hologram is that model's state.
A hologram segment covers KV positions [start, end) with end = len(ids) - 1: the last
prompt token is left for the resonator's first decode step, which yields the first logits.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from hpi.protocol.holo import HoloError, content_hash, load_hologram
from hpi import hologram, pack, spectral
from hpi.engine import PREFILL_CHUNK, Seq
from hpi.llama import head_dim
from hpi.metrics import METRICS
from hpi.models import LoadedModel, check_same_tokenizer
from hpi.spectral import PRESETS, CodecParams
from hpi.trail import TrailCache


@dataclass
class Caches:
    """One conversation's exact state: its token ids and the KV caches over all of them.

    After verification (server/verify.py) the last confirmed id is `pending`, not yet in the
    anchor's cache, and a separate resonator cache lacks every verified id (`prefill` and
    `hologram_bytes` catch it up); after a prefill, `next_logits` are the anchor's logits after
    the last id. The caches are copy-on-write (server/trail.py): `Anchor.branch` makes a
    conversation that shares a prefix of their KV.
    """
    ids: list[int] = field(default_factory=list)
    anchor: TrailCache | None = None
    resonator: TrailCache | None = None  # None when the resonator model is the anchor model
    next_logits: torch.Tensor | None = None  # [V]
    pending: int | None = None


class Anchor:
    def __init__(self, lm: LoadedModel, resonator_lm: LoadedModel | None = None,
                 codec: str | CodecParams = "default", calibration_tokens: int = 4096,
                 pack_cache: Path | None = None):
        if isinstance(codec, str) and codec not in PRESETS:
            raise ValueError(f"unknown codec preset {codec!r}; known: {', '.join(PRESETS)}")
        self.lm = lm
        self.res_lm = resonator_lm or lm
        _ = lm.scheduler  # the engine takes over the weights' storage now, before any forward runs
        if self.res_lm is not lm:
            check_same_tokenizer(lm, self.res_lm)
        self.codec: CodecParams = PRESETS[codec] if isinstance(codec, str) else codec
        self.calibration_tokens = calibration_tokens
        self.pack_cache = pack_cache

    @property
    def model_key(self) -> str:
        """URL-safe id of the resonator's model pack."""
        return self.pack_hash[:16]

    @cached_property
    def pack_bytes(self) -> bytes:
        """The resonator's model pack, reused from `pack_cache` when this code built it before."""
        if self.pack_cache is None:
            return pack.build_pack(self.res_lm, self.calibration_tokens)
        # Calibration costs a minute of CPU; the key changes with the model and the pack code.
        code = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (pack, spectral))).hexdigest()
        path = self.pack_cache / f"pack-{self.res_lm.model_id}-{self.calibration_tokens}-{code[:16]}.holo"
        if path.is_file():
            try:
                data = path.read_bytes()
                load_hologram(data)
                return data
            except (OSError, HoloError):
                pass  # rebuilt below
        data = pack.build_pack(self.res_lm, self.calibration_tokens)
        self.pack_cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return data

    @cached_property
    def pack_hash(self) -> str:
        return content_hash(self.pack_bytes)

    @cached_property
    def basis(self) -> pack.CodecBasis:
        return pack.basis_from_pack(self.pack_bytes)

    def kv_bytes_per_token(self) -> int:
        total = 0
        for m in {id(self.lm): self.lm, id(self.res_lm): self.res_lm}.values():
            c = m.config
            total += 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim(c) * m.model.dtype.itemsize
        return total

    @torch.no_grad()
    def prefill(self, caches: Caches, new_ids: list[int]) -> torch.Tensor:
        """Bring the exact caches up to `caches.ids + new_ids`; return the anchor's logits [V] after the last id.

        Each cache is fed the ids it lacks by its own length: besides `new_ids`, the anchor's
        cache lacks a `pending` verified token, and a separate resonator cache every verified
        token (verification runs the anchor model alone).
        """
        if not new_ids:
            raise ValueError("nothing to prefill")
        self._open(caches)
        ids = caches.ids + list(new_ids)
        logits = prefill(self.lm, caches.anchor, ids)
        if caches.resonator is not None:
            prefill(self.res_lm, caches.resonator, ids)
        caches.ids = ids
        caches.pending = None
        caches.next_logits = logits
        return logits

    def _open(self, caches: Caches) -> None:
        if caches.anchor is None:
            caches.anchor = TrailCache(config=self.lm.config)
            if self.res_lm is not self.lm:
                caches.resonator = TrailCache(config=self.res_lm.config)

    def restore(self, ids: list[int], pending: bool) -> Caches:
        """Caches rebuilt from a conversation's ids; with `pending`, the last id is confirmed but
        left out of the KV, as verification and `rewind` leave it."""
        caches = Caches()
        self._open(caches)
        if fed := (ids[:-1] if pending else ids):
            self.prefill(caches, fed)
        if pending:
            caches.ids.append(ids[-1])
            caches.pending, caches.next_logits = ids[-1], None
        return caches

    @staticmethod
    def rewind(caches: Caches, position: int) -> None:
        """Back to the conversation's first `position` ids, exactly: the KV of later positions is
        dropped and the last id is left pending, so the next pass feeds it as after a verification.
        Caches not built yet (a session restored from disk) only lose the ids."""
        if not 1 <= position <= len(caches.ids):
            raise ValueError(f"cannot rewind {len(caches.ids)} ids to {position}")
        for cache in (caches.anchor, caches.resonator):
            if cache is not None and cache.get_seq_length() > position - 1:
                cache.crop(position - 1 - cache.get_seq_length())
        caches.ids = caches.ids[:position]
        caches.pending, caches.next_logits = caches.ids[-1], None

    @staticmethod
    def branch(caches: Caches, position: int, tag: object) -> tuple[Caches, int]:
        """A new conversation over the first `position` ids of `caches`, sharing their KV
        copy-on-write (server/trail.py), with the last id pending as after `rewind`.

        To share them, the KV `caches` hold privately is frozen into runs tagged `tag`: the
        second value is how many of the anchor's positions that froze (0 when the shared
        positions were frozen by an earlier branch).
        """
        if caches.anchor is None or not 1 <= position <= len(caches.ids):
            raise ValueError(f"cannot branch {len(caches.ids)} ids at {position}")
        shared = position - 1
        frozen = caches.anchor.freeze(tag) if caches.anchor.frozen_tokens < shared else 0
        resonator = None
        if caches.resonator is not None:  # it may lag behind: it shares what it has
            n = min(shared, caches.resonator.get_seq_length())
            if caches.resonator.frozen_tokens < n:
                caches.resonator.freeze(tag)
            resonator = caches.resonator.share(n)
        ids = caches.ids[:position]
        return Caches(ids=ids, anchor=caches.anchor.share(shared), resonator=resonator, pending=ids[-1]), frozen

    def hologram_bytes(self, caches: Caches, start: int = 0) -> bytes:
        """The `.holo` conversation hologram of KV positions [start, len(ids) - 1)."""
        cache = caches.resonator if caches.resonator is not None else caches.anchor
        end = len(caches.ids) - 1
        if cache is None or not 0 <= start <= end:
            raise ValueError(f"no hologram segment [{start}, {end})")
        if cache is caches.resonator and cache.get_seq_length() < end:
            prefill(self.res_lm, cache, caches.ids[:end])  # verified tokens, fed to the anchor alone
        keys = torch.stack([layer.keys[0, :, start:end] for layer in cache.layers])  # [L, G, T, Dh]
        values = torch.stack([layer.values[0, :, start:end] for layer in cache.layers])
        return hologram.build(keys.float().cpu(), values.float().cpu(), start=start,
                              next_id=caches.ids[end], basis=self.basis, params=self.codec,
                              model_id=self.res_lm.model_id, tokenizer_id=self.res_lm.tokenizer_id,
                              pack_hash=self.pack_hash)


def prefill(lm: LoadedModel, cache: TrailCache, ids: list[int]) -> torch.Tensor:
    """Run the ids past the cache's length into it through the model's batched forward, one chunk
    per forward (chunks end at multiples of PREFILL_CHUNK, so a prompt's KV has the same bits
    however it arrives); the logits [V] after the last id."""
    at = cache.get_seq_length()
    if at >= len(ids):
        raise ValueError(f"the cache already holds all {len(ids)} tokens")
    METRICS.add("hpi_prefill_tokens_total", len(ids) - at)
    while True:
        end = min(len(ids), (at // PREFILL_CHUNK + 1) * PREFILL_CHUNK)
        (logits,) = lm.scheduler.run([Seq(cache, ids[at:end], generated=False, all_logits=False)])
        if end == len(ids):
            return logits[-1]
        at = end

