"""Constrained distances (``constraints = "HBonds"``) in the coordinate transform.

A System with constraints is simulated on the manifold where every constrained distance has its
constraint length; MD with constrained positions and velocities (OpenMM's SHAKE/RATTLE-type
integrators) samples ``exp(−u(x)) dσ_M(x)`` there, with σ_M the surface measure of the manifold
in mass-weighted Cartesian coordinates (Ciccotti, Lelièvre & Vanden-Eijnden, CPAM 61, 2008).
The transform therefore

* takes every constrained distance as the bond of a Z-matrix row and holds it at its
  constraint length: no latent dimension and no density on it (:func:`fixed_bond_rows`);
* puts the manifold's volume element into ``ladj``, so that ``log q`` is a density with respect
  to σ_M, the measure of the MD's ``exp(−u)``. In the remaining internal coordinates this
  element is ``Π r² sin θ · J(c) · sqrt(det Z_M(x))`` (the unconstrained one by the Schur
  complement of the mass metric), with ``Z_M[a, b] = Σ_k (1/m_k) ∇_k σ_a · ∇_k σ_b`` the mass-
  weighted Gram matrix of the constraint gradients, the matrix of Fixman's potential
  ``(kT/2) log det Z_M`` (:class:`ConstraintVolume`).

For X–H constraints ``Z_M`` couples only the hydrogens of one heavy atom, through the H–X–H
angles; ``½ log det Z_M`` varies by about 1e-3 nats over MD frames, and it is kept because it
is exact and cheap (blocks of at most 3 × 3). Written here because no library computes it for a
batch inside a torch graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from p4bg.systems import MolecularSystem

__all__ = ["ConstraintVolume", "fixed_bond_rows"]


def fixed_bond_rows(system: MolecularSystem, z_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Z-matrix rows whose bond the System constrains, and their lengths (nm).

    z_matrix: [rows, 4] (atom, bonded to, angle with, torsion with). Raises ``ValueError``
    naming the pair for a constraint that is not the bond of a row (both atoms in the rigid
    block, a ring closure, an angle constraint): the layout must place one atom of every
    constrained pair on the other (``p4bg.zmatrix.build_layout`` does, for HBonds)."""
    bonds = {frozenset((int(a), int(b))): k for k, (a, b, _, _) in enumerate(z_matrix)}
    rows, lengths = [], []
    for (i, j), length in sorted(system.constrained_bonds.items()):
        k = bonds.get(frozenset((i, j)))
        if k is None:
            atoms = list(system.topology.atoms)
            raise ValueError(
                f"{system.name}: the distance {i}-{j} ({atoms[i]}, {atoms[j]}) is constrained "
                f"({system.constraints}) but is not the bond of a Z-matrix row, so the transform "
                "cannot hold it fixed; place one atom on the other in [coordinates] (or remove "
                "[coordinates] from system.toml to have the layout made for the constraints)"
            )
        rows.append(k)
        lengths.append(length)
    order = np.argsort(rows)
    return np.asarray(rows, dtype=np.int64)[order], np.asarray(lengths, dtype=np.float64)[order]


class ConstraintVolume(nn.Module):
    """``½ log det Z_M(x)`` per configuration (see the module docstring), from the constrained
    pairs and the masses of a System.

    xyz: positions, shape (batch, n_atoms, 3), nm -> shape (batch,), in log(amu⁻¹). The
    constraints fall into blocks that share atoms (a heavy atom's hydrogens); each block's
    determinant is taken on its own."""

    def __init__(self, pairs: list[tuple[int, int]], masses: np.ndarray) -> None:
        super().__init__()
        inverse_mass = 1.0 / np.asarray(masses, dtype=np.float64)
        # blocks: connected components of the constraints through shared atoms
        owner = list(range(len(pairs)))

        def root(a: int) -> int:
            while owner[a] != a:
                owner[a] = owner[owner[a]]
                a = owner[a]
            return a

        by_atom: dict[int, list[int]] = {}
        for a, (i, j) in enumerate(pairs):
            for k in (i, j):
                by_atom.setdefault(k, []).append(a)
        for members in by_atom.values():
            for a in members[1:]:
                owner[root(a)] = root(members[0])
        blocks: dict[int, list[int]] = {}
        for a in range(len(pairs)):
            blocks.setdefault(root(a), []).append(a)
        self.sizes: list[int] = []
        for size in sorted({len(b) for b in blocks.values()}):
            group = [b for b in blocks.values() if len(b) == size]
            ends = np.array([[pairs[a] for a in b] for b in group], dtype=np.int64)  # [g, s, 2]
            # C[a, b] = Σ over the atoms k that a and b share of s_a(k) s_b(k) / m_k, with
            # s(k) = +1 at a pair's second atom and −1 at its first: Z = C ∘ (e_a · e_b)
            coef = np.zeros((len(group), size, size))
            for g, block in enumerate(ends):
                for a, (i1, j1) in enumerate(block):
                    for b, (i2, j2) in enumerate(block):
                        for k, sa in ((i1, -1.0), (j1, 1.0)):
                            for m, sb in ((i2, -1.0), (j2, 1.0)):
                                if k == m:
                                    coef[g, a, b] += sa * sb * inverse_mass[k]
            self.register_buffer(f"ends_{size}", torch.from_numpy(ends), persistent=False)
            self.register_buffer(f"coef_{size}", torch.from_numpy(coef), persistent=False)
            self.sizes.append(size)

    def forward(self, xyz: Tensor) -> Tensor:
        out = xyz.new_zeros(len(xyz))
        for size in self.sizes:
            ends, coef = getattr(self, f"ends_{size}"), getattr(self, f"coef_{size}")
            d = xyz[:, ends[..., 1]] - xyz[:, ends[..., 0]]  # [batch, g, s, 3]
            e = d / d.norm(dim=-1, keepdim=True)
            z = coef.to(xyz.dtype) * (e @ e.transpose(-1, -2))
            if size == 1:
                out = out + 0.5 * torch.log(z[..., 0, 0]).sum(1)
            else:
                out = out + 0.5 * torch.linalg.slogdet(z)[1].sum(1)
        return out

    @classmethod
    def of(cls, system: MolecularSystem) -> ConstraintVolume | None:
        """The volume of ``system``'s constraints, or None without constraints."""
        pairs = sorted(system.constrained_bonds)
        if not pairs:
            return None
        omm = system.openmm_system
        masses = np.array([omm.getParticleMass(i)._value for i in range(omm.getNumParticles())])
        return cls(pairs, masses)
