"""Torch geometry of the mixed coordinates: placing atoms from a Z-matrix and reading it back, the
Kabsch alignment of the rigid block, the block's shape basis and its orientation-frame volume.

Pure functions of positions (nm) and angles (rad), batched over the leading dimension and
differentiable, so that :mod:`p4bg.coordinates` can build an exact bijection from them and the
tests can check every Jacobian by autograd.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "block_log_volume",
    "cartesian_to_zmatrix",
    "dihedral_angle",
    "internal_basis",
    "kabsch_align",
    "placement_stages",
    "zmatrix_to_cartesian",
]

_EPS_NORM = 1e-10  # nm²: smallest |cross product|² used to define a torsion plane
_EPS_COS = 1e-7  # angles are kept in [acos(1 − ε), acos(−1 + ε)]


def _unit(v: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """v / |v| with |v|² clamped from below; also returns where the clamp acted."""
    sq = (v * v).sum(-1, keepdim=True)
    clamped = sq < eps
    return v * torch.rsqrt(torch.clamp(sq, min=eps)), clamped.squeeze(-1)


def _place(
    p1: Tensor, p2: Tensor, p3: Tensor, r: Tensor, theta: Tensor, phi: Tensor
) -> tuple[Tensor, Tensor]:
    """Atom at distance r from p1, angle θ = ∠(x, p1, p2), torsion φ = dihedral(p3, p2, p1, x).

    Shapes: p [..., 3]; r, θ, φ [...]. Returns positions [..., 3] and the clamp mask.
    """
    bc, c1 = _unit(p1 - p2, _EPS_NORM)
    n, c2 = _unit(torch.cross(p2 - p3, bc, dim=-1), _EPS_NORM)
    m = torch.cross(n, bc, dim=-1)
    rs = r * torch.sin(theta)
    d0 = -r * torch.cos(theta)
    d1 = rs * torch.cos(phi)
    d2 = rs * torch.sin(phi)
    x = p1 + d0.unsqueeze(-1) * bc + d1.unsqueeze(-1) * m + d2.unsqueeze(-1) * n
    return x, c1 | c2


def dihedral_angle(p0: Tensor, p1: Tensor, p2: Tensor, p3: Tensor) -> Tensor:
    """Dihedral angle (−π, π] of p0-p1-p2-p3 (IUPAC sign, as mdtraj); p [..., 3] -> [...]."""
    b0, b1, b2 = p1 - p0, p2 - p1, p3 - p2
    y = torch.linalg.vector_norm(b1, dim=-1) * (b0 * torch.cross(b1, b2, dim=-1)).sum(-1)
    x = (torch.cross(b0, b1, dim=-1) * torch.cross(b1, b2, dim=-1)).sum(-1)
    return torch.atan2(y, x)


def placement_stages(z_matrix: np.ndarray, rigid: np.ndarray) -> list[np.ndarray]:
    """Rows of the Z-matrix grouped so that each group depends only on earlier groups (and the
    rigid atoms), so that a whole group is placed in one batched step."""
    placed = {int(a) for a in rigid}
    remaining = list(range(len(z_matrix)))
    stages = []
    while remaining:
        ready = [i for i in remaining if all(int(a) in placed for a in z_matrix[i, 1:])]
        if not ready:
            raise ValueError("Z-matrix references atoms that are never placed")
        stages.append(np.array(ready))
        placed.update(int(z_matrix[i, 0]) for i in ready)
        remaining = [i for i in remaining if i not in ready]
    return stages


def zmatrix_to_cartesian(
    internal: Tensor,
    rigid_xyz: Tensor,
    z_matrix: np.ndarray | list[list[int]],
    rigid: np.ndarray | list[int],
    n_atoms: int,
    stages: list[tuple[Any, Tensor]] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Place the Z-matrix atoms around the rigid block.

    internal: [batch, k, 3] (bond nm, angle rad, torsion rad) in Z-matrix row order;
    rigid_xyz: [batch, len(rigid), 3] nm. Returns ``(xyz [batch, n_atoms, 3] nm,
    ladj [batch] = Σ log(r² sin θ), clamped [batch] count)``. ``stages``: the placement stages
    as (rows, the same as an index tensor on internal's device), precomputed by the transform.
    The transform passes z_matrix, rigid and the rows as Python lists: atom numbers that
    ``torch.compile`` sees as constants, where numpy arrays would be traced as tensors.
    """
    batch = internal.shape[0]
    atoms: list[Tensor | None] = [None] * n_atoms
    for j, a in enumerate(rigid):
        atoms[int(a)] = rigid_xyz[:, j]
    clamped = internal.new_zeros(batch, dtype=torch.int64)
    if stages is None:
        stages = [
            (s, torch.as_tensor(s, device=internal.device))
            for s in placement_stages(np.asarray(z_matrix), np.asarray(rigid))
        ]
    for stage, stage_index in stages:
        p1 = torch.stack([atoms[int(z_matrix[i][1])] for i in stage], 1)
        p2 = torch.stack([atoms[int(z_matrix[i][2])] for i in stage], 1)
        p3 = torch.stack([atoms[int(z_matrix[i][3])] for i in stage], 1)
        ic = internal[:, stage_index]
        x, c = _place(p1, p2, p3, ic[..., 0], ic[..., 1], ic[..., 2])
        clamped = clamped + c.sum(1)
        for k, i in enumerate(stage):
            atoms[int(z_matrix[i][0])] = x[:, k]
    xyz = torch.stack(atoms, 1)
    r, theta = internal[..., 0], internal[..., 1]
    ladj = (2.0 * torch.log(r) + torch.log(torch.sin(theta))).sum(1)
    return xyz, ladj, clamped


def cartesian_to_zmatrix(
    xyz: Tensor, z_matrix: np.ndarray | Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Internal coordinates of positions ``xyz`` [batch, n_atoms, 3] nm.

    Returns ``(internal [batch, k, 3], ladj [batch] = −Σ log(r² sin θ), clamped [batch])``:
    the inverse of :func:`zmatrix_to_cartesian` (for the Z-matrix atoms).
    """
    idx = z_matrix if isinstance(z_matrix, Tensor) else torch.as_tensor(z_matrix, device=xyz.device)
    x, p1, p2, p3 = (xyz[:, idx[:, c]] for c in range(4))
    b1 = x - p1
    b2 = p2 - p1
    r = torch.linalg.vector_norm(b1, dim=-1)
    cos = (b1 * b2).sum(-1) / (r * torch.linalg.vector_norm(b2, dim=-1))
    clamped = ((cos > 1 - _EPS_COS) | (cos < -1 + _EPS_COS)).sum(1)
    theta = torch.acos(torch.clamp(cos, -1 + _EPS_COS, 1 - _EPS_COS))
    phi = dihedral_angle(p3, p2, p1, x)
    ladj = -(2.0 * torch.log(r) + torch.log(torch.sin(theta))).sum(1)
    return torch.stack([r, theta, phi], -1), ladj, clamped


def kabsch_align(block: Tensor, reference: Tensor) -> Tensor:
    """Optimally rotate and translate ``block`` [batch, k, 3] onto the centred ``reference``
    [k, 3] (Kabsch): returns the aligned block [batch, k, 3]."""
    centred = block - block.mean(1, keepdim=True)
    H = centred.transpose(1, 2) @ reference  # [batch, 3, 3]
    U, _, Vh = torch.linalg.svd(H)
    d = torch.sign(torch.linalg.det(U @ Vh))
    D = torch.ones_like(H[:, 0])
    D = torch.cat([D[:, :2], d.unsqueeze(1)], 1)
    R = (U * D.unsqueeze(1)) @ Vh
    return centred @ R


def internal_basis(reference: np.ndarray) -> np.ndarray:
    """Orthonormal basis [3k, 3k − 6] of displacements of the centred ``reference`` [k, 3] that
    are orthogonal to rigid translations and infinitesimal rotations."""
    k = len(reference)
    rigid = []
    for axis in np.eye(3):
        rigid.append(np.tile(axis, k))  # translation
        rigid.append(np.cross(axis, reference).reshape(-1))  # rotation about the centroid
    q, _ = np.linalg.qr(np.stack(rigid, 1), mode="complete")
    return np.ascontiguousarray(q[:, 6:])


def block_log_volume(block: Tensor, reference: Tensor) -> Tensor:
    """log J(c) − log J(0) for rigid blocks ``block`` [batch, k, 3] nm aligned to the centred
    ``reference`` [k, 3] nm (block = reference + B c), shape [batch].

    J(c) = |det[T, Ω(block), B]| is the volume that the block's orientation frame spans: T the 3
    translation generators, Ω the 3 rotation generators at the block, B the 3k − 6 shape
    directions. T and B are orthogonal to the rotations at the reference, which gives
    J(c) = k^{3/2} |det(tr(C) I − C)| / det(I_ref)^{1/2} with C = Σ_a block_a reference_aᵀ and
    I_ref = tr(C₀) I − C₀ the reference's inertia tensor (unit masses); J(0) cancels the
    constants. A 3 × 3 determinant, written out so that it stays one fused graph.
    """
    C = torch.einsum("bai,aj->bij", block, reference)
    C0 = reference.T @ reference
    eye = torch.eye(3, dtype=block.dtype, device=block.device)
    M = torch.diagonal(C, dim1=-2, dim2=-1).sum(-1)[:, None, None] * eye - C
    M0 = torch.diagonal(C0).sum() * eye - C0
    det = (M[:, 0] * torch.cross(M[:, 1], M[:, 2], dim=-1)).sum(-1)
    det0 = (M0[0] * torch.cross(M0[1], M0[2], dim=-1)).sum(-1)
    return torch.log(torch.abs(det)) - torch.log(det0)
