"""The anchor's CPU kernels (server/_kernels.c), over torch tensors.

Each fixes the order of its arithmetic per output element, so a row's bits are the same alone
and among any other rows: quantized matrix products, and the attention of generated rows.
`portable=True` runs the plain C code instead of AVX2; the two give the same bits (tested).
"""

from __future__ import annotations

import torch

try:
    from hpi import _kernels
except ImportError:  # not built (pip install -e . builds it): the engine falls back to torch
    _kernels = None

KIND = {"Q4_1": 1, "Q8_0": 2}  # server/_kernels.c's kind numbers
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}  # a GGUF block of 32 weights
MAX_HEAD_DIM = 256
MAX_THREADS = 64

# One pool of threads serves every kernel call in the process, one call at a time.
_threads = torch.get_num_threads()


def available() -> bool:
    return _kernels is not None


def set_threads(n: int) -> None:
    """Threads each kernel call runs on (HPI_THREADS)."""
    global _threads
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"threads must be within 1..{MAX_THREADS}")
    _threads = n


def threads() -> int:
    return _threads


def matmul_panels(x: torch.Tensor, panels: torch.Tensor, kind: str, n: int, k: int,
                  portable: bool = False) -> torch.Tensor:
    """x [M, K] fp32 @ W^T, W [N, K] as `panels` [N / 8, K / 32 * 8 * block bytes] uint8 of `kind`
    (server/quant.py's to_panels): y [M, N] fp32."""
    x = x.float().contiguous()
    if (x.dim() != 2 or x.shape[1] != k or k % 32 or n % 8 or not panels.is_contiguous()
            or panels.dtype != torch.uint8 or panels.numel() != n * k // 32 * BLOCK_BYTES[kind]):
        raise ValueError(f"x of shape {tuple(x.shape)} against a [{n}, {k}] {kind} weight")
    y = torch.empty(x.shape[0], n)
    _kernels.matmul(x.data_ptr(), panels.data_ptr(), y.data_ptr(), x.shape[0], n, k, n, KIND[kind], _threads,
                    portable)
    return y


def can_attend(head_dim: int) -> bool:
    return available() and head_dim % 8 == 0 and head_dim <= MAX_HEAD_DIM


def attend(segments: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]], scale: float,
           out: list[torch.Tensor] | None = None, portable: bool = False) -> list[torch.Tensor]:
    """Attention of several sequences' query rows in one call. Segment (q [H, n, Dh], keys and
    values [G, T, Dh], start): row j at position start + j attends over positions [0, start + j]
    alone. Per segment, its output [n, H Dh] (written into `out`'s contiguous tensors if given)."""
    rows, kept = [], []
    for i, (q, keys, values, start) in enumerate(segments):
        H, n, Dh = q.shape
        G, T, _ = keys.shape
        if T < start + n or values.shape != keys.shape or H % G or not can_attend(Dh) or start < 0:
            raise ValueError(f"attention of {n} rows at {start} over {T} positions: shapes do not fit")
        q = q.float().transpose(0, 1).contiguous()  # [n, H, Dh]
        keys, values = (t if t.dtype == torch.float32 and t.stride(-1) == 1 else t.float().contiguous()
                        for t in (keys, values))
        o = out[i] if out is not None else torch.empty(n, H * Dh)
        if o.shape != (n, H * Dh) or not o.is_contiguous() or o.dtype != torch.float32:
            raise ValueError(f"output of shape {tuple(o.shape)} for {n} rows of {H} heads")
        kept += [q, keys, values, o]
        rows.append([q.data_ptr(), keys.data_ptr(), values.data_ptr(), o.data_ptr(), n, start,
                     keys.stride(0), keys.stride(1), values.stride(0), values.stride(1)])
    if not segments:
        return []
    table = torch.tensor(rows, dtype=torch.int64)  # the tensors above stay alive in `kept` meanwhile
    H, _, Dh = segments[0][0].shape
    G = segments[0][1].shape[0]
    if any(q.shape[0] != H or q.shape[2] != Dh or k.shape[0] != G for q, k, _, _ in segments):
        raise ValueError("segments of different head counts or head sizes")
    _kernels.attend(table.data_ptr(), len(rows), H, G, Dh, scale, _threads, portable)
    return kept[3::4]
