"""The Cl(3,1) view of a real 4x4 matrix: 16 coefficients in a fixed basis, grades, Grace.

Cl(3,1) is isomorphic to the real 4x4 matrices, so any 4x4 matrix M is a multivector
M = sum_A c_A B_A over the 16 basis blades B_A (products of the generators e1..e4, with
e1² = e2² = e3² = +1, e4² = -1). Larger matrices (8x8, 16x16) are read as a grid of 4x4
blocks, each block decomposed on its own: the coefficients stay an orthogonal change of basis.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

PHI = (1 + 5 ** 0.5) / 2
PHI_INV = 1 / PHI

_I2 = np.eye(2)
_X = np.array([[0.0, 1.0], [1.0, 0.0]])
_Z = np.array([[1.0, 0.0], [0.0, -1.0]])
_J = np.array([[0.0, -1.0], [1.0, 0.0]])
# Mutually anticommuting; the first three square to +1, the last to -1 (found by search
# over Kronecker products of these 2x2 matrices).
GENERATORS = np.stack([np.kron(_I2, _X), np.kron(_I2, _Z), np.kron(_J, _J), np.kron(_X, _J)])


def _blades() -> tuple[np.ndarray, np.ndarray]:
    mats, grades = [], []
    for grade in range(5):
        for idx in combinations(range(4), grade):
            m = np.eye(4)
            for i in idx:
                m = m @ GENERATORS[i]
            mats.append(m)
            grades.append(grade)
    return np.stack(mats), np.array(grades)


BASIS, GRADES = _blades()  # (16, 4, 4): 1, e_i, e_ij, e_ijk, e1234; (16,) grade of each
SCALAR, PSEUDOSCALAR = 0, 15
# Every blade is a signed permutation matrix, so tr(B_A^T B_B) = 4 δ_AB and the coefficients
# are c_A = <B_A, M>_F / 4: one (n, 16) @ (16, 16) product.
_ANALYSIS = BASIS.reshape(16, 16).T / 4.0  # (16 entries, 16 blades)
# Grace scales grade k by φ^-k; the pseudoscalar (grade 4) by φ^-1, the seeds' "Fibonacci
# exception" (the inverse of their grace_inverse).
GRACE_SCALES = np.where(GRADES == 4, PHI_INV, PHI_INV ** GRADES.astype(float))


def _blocks(m: np.ndarray) -> np.ndarray:
    """(..., d, d) -> (..., d/4 * d/4, 16): each 4x4 block flattened row-major."""
    d = m.shape[-1]
    if d % 4 or m.shape[-2] != d:
        raise ValueError(f"matrices must be square with a side divisible by 4, got {m.shape[-2:]}")
    k = d // 4
    b = m.reshape(*m.shape[:-2], k, 4, k, 4).swapaxes(-3, -2)  # (..., k, k, 4, 4)
    return b.reshape(*m.shape[:-2], k * k, 16)


def coefficients(m: np.ndarray) -> np.ndarray:
    """(..., d, d) -> (..., (d/4)², 16) Cl(3,1) coefficients of each 4x4 block."""
    return _blocks(m) @ _ANALYSIS


def from_coefficients(c: np.ndarray) -> np.ndarray:
    """(..., (d/4)², 16) -> (..., d, d): the inverse of `coefficients`."""
    k = int(round(c.shape[-2] ** 0.5))
    blocks = (c @ BASIS.reshape(16, 16)).reshape(*c.shape[:-2], k, k, 4, 4)
    return blocks.swapaxes(-3, -2).reshape(*c.shape[:-2], 4 * k, 4 * k)


def grace(c: np.ndarray) -> np.ndarray:
    """Grace on coefficients (..., 16): grade-wise φ contraction toward scalar + pseudoscalar."""
    return c * GRACE_SCALES


def witness(c: np.ndarray) -> np.ndarray:
    """(..., blocks, 16) -> (..., 2): mean scalar and pseudoscalar part of the diagonal blocks.

    The Grace-invariant part of a multivector: what the seeds cluster and route by.
    """
    k = int(round(c.shape[-2] ** 0.5))
    diag = c[..., :: k + 1, :]
    return np.stack([diag[..., SCALAR].mean(-1), diag[..., PSEUDOSCALAR].mean(-1)], axis=-1)


def stability(c: np.ndarray) -> np.ndarray:
    """(..., blocks, 16) -> (...): (scalar² + pseudoscalar²) / total energy, in [0, 1]."""
    total = np.square(c).sum((-2, -1))
    core = np.square(c[..., [SCALAR, PSEUDOSCALAR]]).sum((-2, -1))
    return np.divide(core, total, out=np.zeros_like(total), where=total > 0)
