"""Token embeddings in SO(d) and the matrices of contexts built from them.

Each token is a random rotation (orthogonal, determinant +1), so a context — the ordered
product of its tokens' matrices — is a rotation too: it never decays or blows up with the
context length, and its inverse is its transpose. d is 4 in the seeds; 8 and 16 work the
same way (more room per binding, see docs/memory.md).
"""

from __future__ import annotations

import hashlib

import numpy as np

DIMS = (4, 8, 16)


def embeddings(vocab: int, dim: int, seed: int) -> np.ndarray:
    """(vocab, dim, dim) float64 Haar-random rotations, the same for the same arguments."""
    if dim not in DIMS:
        raise ValueError(f"matrix size must be one of {DIMS}, got {dim}")
    if vocab < 1:
        raise ValueError(f"vocabulary size must be at least 1, got {vocab}")
    g = np.random.default_rng(seed).standard_normal((vocab, dim, dim))
    q, r = np.linalg.qr(g)  # batched
    # Signs of diag(R) into Q make the distribution Haar (plain QR is biased).
    q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
    # Flipping one column of the reflections (det -1) keeps them orthogonal and makes det +1.
    q[:, :, 0] *= np.sign(np.linalg.det(q))[:, None]
    return q


def fingerprint(emb: np.ndarray) -> str:
    """A short digest of the embeddings: a memory file records it, to refuse a changed RNG."""
    return hashlib.sha256(np.round(emb[: min(len(emb), 64)], 9).tobytes()).hexdigest()[:16]


def contexts(emb: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(B, n) token ids -> (B, d, d) products E[t0] E[t1] ... E[t_{n-1}], left to right.

    Always the same order of operations, so a context learned from a sequence and the same
    context queried alone give bit-identical matrices (routing quantizes them).
    """
    m = emb[ids[:, 0]]
    for j in range(1, ids.shape[1]):
        m = m @ emb[ids[:, j]]
    return m


def windows(tokens: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A sequence (L,) -> its (L-n, n) contexts and (L-n,) next tokens."""
    ctx = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
    return np.ascontiguousarray(ctx), tokens[n:]


def bind(ctx: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(B, d, d) contexts, (B, d, d) target embeddings -> C @ T."""
    return ctx @ target


def unbind(ctx: np.ndarray, memory: np.ndarray) -> np.ndarray:
    """C^T @ M: for M = C T + noise, this is T + C^T noise (C is orthogonal)."""
    return np.swapaxes(ctx, -1, -2) @ memory
