"""Geometry of configurations in numpy: dihedral angles and alanine's chirality.

Used for MD and generated ensembles alike (docs/design.md §5); float64 in, float64 out.
"""

from __future__ import annotations

import numpy as np

__all__ = ["dihedral", "is_l_chirality"]


def dihedral(xyz: np.ndarray, atoms: tuple[int, int, int, int]) -> np.ndarray:
    """Dihedral angle in radians, (-π, π], of ``atoms`` for positions ``xyz`` [frames, n, 3]
    (IUPAC sign convention, as mdtraj). Non-finite positions give NaN."""
    p0, p1, p2, p3 = (xyz[:, i] for i in atoms)
    b0, b1, b2 = p1 - p0, p2 - p1, p3 - p2
    y = np.linalg.norm(b1, axis=-1) * (b0 * np.cross(b1, b2)).sum(-1)
    x = (np.cross(b0, b1) * np.cross(b1, b2)).sum(-1)
    return np.arctan2(y, x)


def is_l_chirality(
    xyz: np.ndarray, n: int = 6, ca: int = 8, c: int = 14, cb: int = 10
) -> np.ndarray:
    """True for L-alanine frames: ``(N − CA) · ((C − CA) × (CB − CA)) > 0`` (docs/design.md §5).

    xyz: positions [frames, n_atoms, 3]; the default atom indices are the contract atom order of
    alanine dipeptide (docs/design.md §4). Non-finite frames are False (neither L nor checked)."""
    a = xyz[:, n] - xyz[:, ca]
    b = np.cross(xyz[:, c] - xyz[:, ca], xyz[:, cb] - xyz[:, ca])
    return (a * b).sum(-1) > 0
