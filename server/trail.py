"""Copy-on-write KV caches: conversations that share a frozen prefix and grow private tails.

A session's cache layer holds its keys and values as frozen runs followed by a private tail.
A frozen run is never written again: transformers' dynamic cache grows by concatenation and
crops by slicing, so no operation on a layer touches the tensors it already holds in place.
Forking a session at a position freezes its tail into a run (no copy) and gives the fork
views of the runs over the positions it shares, and a tail of its own. The fork's memory
grows only by its own tokens, and neither side's later growth or cropping can change what
the other sees: growth writes into the private tail, cropping slices views.

The tail grows in place inside a buffer with room to spare (a quarter more, at least
TAIL_ROOM positions), so a token costs its own K/V rather than a copy of the whole tail; a
view read from a layer holds until the layer next grows. Memory is measured by storage, room
included.

Each run carries an opaque `tag` that stays referenced as long as any layer holds a view
of the run: the session store charges a frozen run's memory to its tag, so the charge lasts
exactly as long as the memory does, whoever forked or was deleted first.

A layer's `keys` and `values` read as the whole sequence, as a `DynamicLayer`'s do (a
concatenation while the layer holds runs, the tail itself otherwise), so code that reads a
cache's tensors directly needs no change. Without runs a layer costs what a `DynamicLayer`
does; with runs each forward pass concatenates them with the tail, which a dynamic layer
does as well to grow.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs


TAIL_ROOM = 16


class Run(NamedTuple):
    keys: torch.Tensor  # [B, G, T, Dh], never written
    values: torch.Tensor
    tag: object


def _owned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy if `t` views a larger storage (a tail cropped after rejected drafts), so a
    run keeps alive only its own tokens."""
    if t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone()


class TrailLayer(DynamicLayer):
    """One layer's KV: frozen runs (possibly shared with other sessions), then a private tail."""

    def __init__(self):
        self.runs: list[Run] = []
        self._tail_keys: torch.Tensor | None = None
        self._tail_values: torch.Tensor | None = None
        super().__init__()

    # The base class assigns `keys`/`values`; the setters take that as the tail.
    @property
    def keys(self) -> torch.Tensor | None:
        if not self.runs:
            return self._tail_keys
        return torch.cat([r.keys for r in self.runs] + [self._tail_keys], dim=-2)

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._tail_keys = value

    @property
    def values(self) -> torch.Tensor | None:
        if not self.runs:
            return self._tail_values
        return torch.cat([r.values for r in self.runs] + [self._tail_values], dim=-2)

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._tail_values = value

    @property
    def frozen_tokens(self) -> int:
        return sum(r.keys.shape[-2] for r in self.runs)

    @property
    def tail_tokens(self) -> int:
        return 0 if self._tail_keys is None else self._tail_keys.shape[-2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._tail_keys = _empty_like(key_states)
        self._tail_values = _empty_like(value_states)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._tail_keys = _grow(self._tail_keys, key_states)
        self._tail_values = _grow(self._tail_values, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.frozen_tokens + self.tail_tokens

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` positions: from the tail first, then from the runs
        (by slicing: a run shared with another session stays whole for it)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count: the number of positions to remove from the end")
        drop = -tokens_to_remove
        if drop == 0 or not self.is_initialized:
            return
        keep = max(self.tail_tokens - drop, 0)
        drop -= self.tail_tokens - keep
        if keep:
            self._tail_keys = self._tail_keys[..., :keep, :]
            self._tail_values = self._tail_values[..., :keep, :]
        else:  # not an empty view that would keep the dropped tail's memory
            self._tail_keys = _empty_like(self._tail_keys)
            self._tail_values = _empty_like(self._tail_values)
        while drop and self.runs:
            run = self.runs.pop()
            n = run.keys.shape[-2]
            if n > drop:
                self.runs.append(Run(run.keys[..., :n - drop, :], run.values[..., :n - drop, :], run.tag))
            drop -= min(n, drop)

    def reset(self) -> None:
        self.runs = []
        super().reset()

    def freeze(self, tag: object) -> int:
        """Make the tail a frozen run tagged `tag`; the number of positions frozen."""
        n = self.tail_tokens
        if n:
            self.runs.append(Run(_owned(self._tail_keys), _owned(self._tail_values), tag))
            self._tail_keys = _empty_like(self._tail_keys)
            self._tail_values = _empty_like(self._tail_values)
        return n

    def share(self, n: int) -> TrailLayer:
        """A new layer over the first `n` positions, which must be frozen: views of the runs
        (no copy) and an empty tail of its own."""
        if n > self.frozen_tokens:
            raise ValueError(f"only {self.frozen_tokens} positions are frozen; cannot share {n}")
        layer = TrailLayer()
        for run in self.runs:
            if n <= 0:
                break
            m = min(n, run.keys.shape[-2])
            layer.runs.append(Run(run.keys[..., :m, :], run.values[..., :m, :], run.tag))
            n -= m
        if self.is_initialized:
            layer.device = self.device
            layer._tail_keys = _empty_like(self._tail_keys)
            layer._tail_values = _empty_like(self._tail_values)
            layer.is_initialized = True
        return layer

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer holds (run views and the tail), for measuring memory."""
        held = [t for r in self.runs for t in (r.keys, r.values)]
        return held + [t for t in (self._tail_keys, self._tail_values) if t is not None]


def _grow(tail: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`tail` [B, G, T, Dh] followed by `new` [B, G, n, Dh]: written in place after the tail when
    the tail is the start of a buffer this function made with room for it, else into a new one."""
    t, n = tail.shape[-2], new.shape[-2]
    buf = tail._base  # the buffer a tail grown here views (cropping keeps viewing it)
    if (buf is None or buf.dim() != 4 or buf.shape[-2] < t + n or buf.dtype != new.dtype
            or tail.data_ptr() != buf.data_ptr() or not buf.is_contiguous()):
        buf = new.new_empty((*new.shape[:-2], max(t + n, t + t // 4, TAIL_ROOM), new.shape[-1]))
        buf[..., :t, :] = tail
    buf[..., t:t + n, :] = new
    return buf[..., :t + n, :]


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor of `t`'s batch, heads and head dim with no positions, in a storage of its own."""
    return t.new_empty((*t.shape[:-2], 0, t.shape[-1]))


class TrailCache(DynamicCache):
    """A dynamic cache of `TrailLayer`s for full-attention models (Llama)."""

    def __init__(self, config=None, layers: list[TrailLayer] | None = None):
        if layers is None:
            types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
            if set(types) != {"full_attention"}:
                raise ValueError(f"a trail cache needs full-attention layers only, not {sorted(set(types))}")
            layers = [TrailLayer() for _ in types]
        Cache.__init__(self, layers=layers)

    @property
    def frozen_tokens(self) -> int:
        return self.layers[0].frozen_tokens if self.layers else 0

    def freeze(self, tag: object) -> int:
        """Freeze every layer's tail into a run tagged `tag`; the number of positions frozen."""
        frozen = 0
        for layer in self.layers:
            frozen = layer.freeze(tag)
        return frozen

    def share(self, n: int) -> TrailCache:
        """A cache over the first `n` positions sharing this one's frozen runs (see `TrailLayer.share`)."""
        return TrailCache(layers=[layer.share(n) for layer in self.layers])

    def storages(self) -> dict[int, int]:
        """The distinct tensor storages the cache holds (data pointer -> bytes): its real memory,
        with what it shares with other caches under the same pointers as theirs."""
        out = {}
        for layer in self.layers:
            for t in layer.tensors():
                s = t.untyped_storage()
                if s.nbytes():
                    out[s.data_ptr()] = s.nbytes()
        return out
