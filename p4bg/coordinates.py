"""Mixed internal/Cartesian coordinates: the bijection between the flow's 60-dim latent space and
Cartesian positions of alanine dipeptide modulo rigid motion (docs/design.md §4; paper App. H).

forward (latent -> configuration): ``z`` [batch, 60] -> ``x`` [batch, 66] nm, ``ladj`` [batch].
inverse: ``x`` in any orientation and position -> ``z``, ``−ladj``.

Latent layout: ``[bonds (17) | angles (17) | torsions (17) | rigid block (9)]``.

* Z-matrix atoms (17): bond length, bond angle and torsion to three earlier atoms, placed in
  batched stages (every atom of a stage depends only on earlier stages). The Jacobian of placing
  one atom is the spherical volume element ``r² sin θ``, so ``ladj = Σ log(r² sin θ)`` exactly.
* Each internal coordinate is mapped onto the whole real line by a bijection fitted on the
  training split, so that every latent vector is a valid molecule and no sample ever wraps:
  bonds ``b = exp(μ + s z)`` (b > 0); angles ``θ = π · sigmoid(μ + s z)`` (0 < θ < π);
  torsions, which are periodic, are cut open at the least-populated angle of the training data
  (where ``z → ±∞``): measured from the centre ``c`` opposite the cut, ``φ' ∈ (−π, π)``, then
  ``φ' = 2π Φ(μ + s z) − π`` with Φ the standard normal CDF, so a freely rotating methyl group is
  exactly N(0, 1) and a peaked torsion is ≈ standardised near its mode. Each map's
  log-derivative is in ``ladj``; μ and s standardise every coordinate on the training data.
* Rigid block (N, CA, HA, CB, C): Kabsch-aligned to a reference (the Procrustes mean of the
  training frames, centred), projected onto the 9 directions orthogonal to rigid translations
  and rotations at the reference (exact: the Kabsch optimum has no component along them), then
  PCA-whitened. ``ladj`` of the 9 → 15 embedding is ``½ Σ log λ`` (λ: PCA variances).
* Block volume (``block_volume=True``): the Boltzmann density with rigid motion integrated out is
  ``exp(−u) · J(c)`` in the block's shape coordinates c, not ``exp(−u)``: the orbit of rotations
  through a configuration has a volume ``J(c) = |det[T, Ω(ref + B c), B]|`` that changes with the
  shape (std 0.04 nats over 600 K MD frames). Without it, log q is a density on the flat slice,
  and the weights ``−u − log q`` and the KL term are off by log J(c); with it (relative to J(0)),
  log q is the density with respect to Cartesian volume on the quotient.
  ``block_volume=False`` is the transform of runs from before it, kept bitwise.
* Constraints (``constraints = "HBonds"``, :mod:`p4bg.constraints`): a Z-matrix bond that the
  System constrains is held at its constraint length and leaves the latent space (the bonds
  block lists only the free bonds), and ``ladj`` gains ``½ log det Z_M(x)``, the volume factor
  of the constraint manifold in mass-weighted coordinates, so that ``log q`` is a density with
  respect to the measure that constrained MD samples ``exp(−u)`` in. Without constraints the
  transform is bitwise what it was.

Densities live on the 60-dim space modulo rigid motion; the energy is invariant to that motion.
Near-degenerate geometry (collinear reference atoms, angles at 0 or π) and torsion tails beyond
the dtype's resolution (|y| > 5.38 in float32, 8.26 in float64: closer to the cut than one
rounding unit of π) are clamped,
counted in ``n_clamped`` (reported in metrics.csv and samples.json), and never produce NaN. A
clamped sample's log q keeps the unclamped Jacobian, so it is not exact; such samples are rare
(|y| > 5.38 in float32 is a 7.5e-8 tail of a freely rotating torsion) and counted.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from p4bg.constraints import ConstraintVolume, fixed_bond_rows
from p4bg.equivalent import canonicalize_equivalent_atoms_torch, equivalent_groups
from p4bg.geometry import (
    block_log_volume,
    cartesian_to_zmatrix,
    internal_basis,
    kabsch_align,
    placement_stages,
    zmatrix_to_cartesian,
)
from p4bg.nn.base import Bijection, check_input

if TYPE_CHECKING:
    from p4bg.systems import MolecularSystem

__all__ = [
    "MixedCoordinateTransform",
    "cartesian_to_zmatrix",
    "kabsch_align",
    "zmatrix_to_cartesian",
]  # the geometry is re-exported from p4bg.geometry, where it lives


def _kabsch_np(block: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return kabsch_align(torch.from_numpy(block), torch.from_numpy(reference)).numpy()


# ------------------------------------------------------------------------------- transform
class MixedCoordinateTransform(Bijection):
    """Latent ``[batch, 60]`` ↔ Cartesian ``[batch, 66]`` nm for a system with a Z-matrix and a
    rigid block (see the module docstring). Fitted on ``xyz_train`` [frames, 3·n_atoms] nm.
    ``block_volume``: include the block's volume factor log J(c) − log J(0) in ``ladj`` (False:
    the transform of runs trained before it; a run's config carries the choice, the state_dict
    is the same for both)."""

    def __init__(
        self, system: MolecularSystem, xyz_train: np.ndarray | Tensor, block_volume: bool = True
    ) -> None:
        super().__init__()
        self._set_layout(system, block_volume)
        z_matrix, rigid, n_atoms = self.z_matrix, self.rigid, self.n_atoms
        xyz = np.asarray(
            xyz_train.detach().cpu().numpy() if isinstance(xyz_train, Tensor) else xyz_train,
            dtype=np.float64,
        )
        if xyz.ndim != 2 or xyz.shape[1] != 3 * n_atoms or len(xyz) < 10:
            raise ValueError(
                "MixedCoordinateTransform: xyz_train must have shape "
                f"[frames >= 10, {3 * n_atoms}] (nm), got {list(xyz.shape)}"
            )
        if not np.isfinite(xyz).all():
            raise ValueError("MixedCoordinateTransform: xyz_train contains non-finite positions")
        frames = torch.from_numpy(xyz.reshape(len(xyz), n_atoms, 3))

        internal, _, _ = cartesian_to_zmatrix(frames, z_matrix)
        bonds, angles, torsions = internal.unbind(-1)
        log_b = torch.log(bonds)
        logit_a = torch.logit(angles / math.pi)
        centre = _torsion_centres(torsions)
        probit, _ = _torsion_probit(_wrap(torsions - centre))
        self.register_buffer("bond_mu", log_b.mean(0))
        self.register_buffer("bond_s", log_b.std(0).clamp(min=1e-6))
        self.register_buffer("angle_mu", logit_a.mean(0))
        self.register_buffer("angle_s", logit_a.std(0).clamp(min=1e-6))
        self.register_buffer("torsion_centre", centre)
        self.register_buffer("torsion_mu", probit.mean(0))
        self.register_buffer("torsion_s", probit.std(0).clamp(min=1e-6))

        # Rigid block: Procrustes mean as reference, rigid-motion-free basis, PCA whitening.
        block = xyz.reshape(len(xyz), n_atoms, 3)[:, rigid]
        reference = block[0] - block[0].mean(0)
        for _ in range(10):
            aligned = _kabsch_np(block, reference)
            new_reference = aligned.mean(0)
            new_reference -= new_reference.mean(0)
            converged = np.abs(new_reference - reference).max() < 1e-12
            reference = new_reference
            if converged:
                break
        aligned = _kabsch_np(block, reference)
        basis = internal_basis(reference)  # [3k, 3k - 6]
        c = (aligned - reference).reshape(len(aligned), -1) @ basis
        c_mean = c.mean(0)
        eigval, eigvec = np.linalg.eigh(np.cov(c, rowvar=False))
        if eigval.min() <= 0:
            raise ValueError("MixedCoordinateTransform: the rigid block does not move in xyz_train")
        self.register_buffer("reference", torch.from_numpy(reference))
        self.register_buffer("basis", torch.from_numpy(basis))
        self.register_buffer("c_mean", torch.from_numpy(c_mean))
        self.register_buffer("pca_vectors", torch.from_numpy(eigvec))
        self.register_buffer("pca_std", torch.from_numpy(np.sqrt(eigval)))
        self.register_buffer("n_clamped", torch.zeros((), dtype=torch.int64), persistent=False)

    def _set_layout(self, system: MolecularSystem, block_volume: bool) -> None:
        self.block_volume = bool(block_volume)
        # Methyl hydrogens may come labelled in another order (other tools); the inverse brings
        # them to the system PDB's labelling, which the flow's density is defined on.
        self.equivalent_groups = equivalent_groups(system)
        self.z_matrix = np.asarray(system.z_matrix, dtype=np.int64)
        self.rigid = np.asarray(system.rigid_atoms, dtype=np.int64)
        self.n_atoms = int(system.n_atoms)
        # index tensors built once and moved with the module (non-persistent: not in the
        # state_dict), not rebuilt from numpy on every call; likewise the placement stages
        self.register_buffer("z_index", torch.as_tensor(self.z_matrix), persistent=False)
        self.register_buffer("rigid_index", torch.as_tensor(self.rigid), persistent=False)
        self.stages = placement_stages(self.z_matrix, self.rigid)
        # the same as Python lists, for the placement loop (constants to torch.compile)
        self._placement = (self.z_matrix.tolist(), self.rigid.tolist(),
                           [stage.tolist() for stage in self.stages])  # fmt: skip
        for k, stage in enumerate(self.stages):
            self.register_buffer(f"stage_index_{k}", torch.as_tensor(stage), persistent=False)
        self.n_internal = len(self.z_matrix)
        self.n_rigid_latent = 3 * len(self.rigid) - 6
        # constrained bonds: held at their length, out of the latent space (p4bg.constraints)
        fixed, lengths = fixed_bond_rows(system, self.z_matrix)
        self.n_fixed = len(fixed)
        free = np.setdiff1d(np.arange(self.n_internal), fixed)
        self.register_buffer("free_bonds", torch.as_tensor(free), persistent=False)
        self.register_buffer("fixed_length", torch.as_tensor(lengths), persistent=False)
        order = np.argsort(np.concatenate([free, fixed]))  # [free | fixed] -> row order
        self.register_buffer("bond_order", torch.as_tensor(order), persistent=False)
        self.constraint_volume = ConstraintVolume.of(system)
        self.dim = 3 * self.n_internal - self.n_fixed + self.n_rigid_latent
        self.cartesian_dim = 3 * self.n_atoms

    @classmethod
    def from_state_dict(
        cls, system: MolecularSystem, state: dict[str, Tensor], block_volume: bool = True
    ) -> MixedCoordinateTransform:
        """Rebuild a fitted transform from its ``state_dict`` alone, so that a trained model can
        be used (sampled, evaluated) without the training data it was fitted on.
        ``block_volume``: as the run was trained (its config), see the class."""
        self = cls.__new__(cls)
        Bijection.__init__(self)
        self._set_layout(system, block_volume)
        expected = {
            "bond_mu": (self.n_internal,), "bond_s": (self.n_internal,),
            "angle_mu": (self.n_internal,), "angle_s": (self.n_internal,),
            "torsion_centre": (self.n_internal,), "torsion_mu": (self.n_internal,),
            "torsion_s": (self.n_internal,), "reference": (len(self.rigid), 3),
            "basis": (3 * len(self.rigid), self.n_rigid_latent),
            "c_mean": (self.n_rigid_latent,),
            "pca_vectors": (self.n_rigid_latent, self.n_rigid_latent),
            "pca_std": (self.n_rigid_latent,),
        }  # fmt: skip
        for name, shape in expected.items():
            if name not in state:
                raise ValueError(f"MixedCoordinateTransform.from_state_dict: {name!r} is missing")
            if tuple(state[name].shape) != shape:
                raise ValueError(
                    f"MixedCoordinateTransform.from_state_dict: {name!r} has shape "
                    f"{list(state[name].shape)}, the system {system.name} needs {list(shape)}"
                )
            self.register_buffer(name, state[name].detach().clone())
        self.register_buffer("n_clamped", torch.zeros((), dtype=torch.int64), persistent=False)
        return self

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, cartesian_dim={self.cartesian_dim}, rigid={self.rigid.tolist()}, "
            f"block_volume={self.block_volume}, fixed_bonds={self.n_fixed}"
        )

    # ------------------------------------------------------------------------- bijection
    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent [batch, 60] -> Cartesian [batch, 66] nm (rigid block in the reference frame)."""
        check_input(z, self.dim, "MixedCoordinateTransform.forward")
        internal, rigid_xyz, ladj = self.latent_to_internal(z)
        z_rows, rigid, rows = self._placement
        stages = [(s, getattr(self, f"stage_index_{k}")) for k, s in enumerate(rows)]
        xyz, ladj_z, clamped = zmatrix_to_cartesian(
            internal, rigid_xyz, z_rows, rigid, self.n_atoms, stages
        )
        self._count(clamped)
        ladj = ladj + ladj_z
        if self.block_volume:
            ladj = ladj + block_log_volume(rigid_xyz, self.reference)
        if self.constraint_volume is not None:
            ladj = ladj + self.constraint_volume(xyz)
        return xyz.reshape(-1, self.cartesian_dim), ladj

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian [batch, 66] nm, any orientation and any labelling of equivalent hydrogens
        -> latent [batch, 60].

        Methyl hydrogens are first brought to the system PDB's labelling, so the density is that
        of the canonical labelling. A generated sample whose methyl came out in the other
        labelling (the flow does not forbid it) is therefore scored as its canonical relabelling,
        and ``inverse(forward(z))`` differs from ``z`` for it."""
        check_input(x, self.cartesian_dim, "MixedCoordinateTransform.inverse")
        if self.equivalent_groups:
            x = canonicalize_equivalent_atoms_torch(x, self.equivalent_groups)
        xyz = x.reshape(-1, self.n_atoms, 3)
        internal, ladj_z, clamped = cartesian_to_zmatrix(xyz, self.z_index)
        aligned = kabsch_align(xyz[:, self.rigid_index], self.reference)
        z, ladj = self.internal_to_latent(internal, aligned)
        self._count(clamped)
        ladj = ladj + ladj_z
        if self.block_volume:  # aligned = reference + B c exactly: Kabsch leaves no rigid part
            ladj = ladj - block_log_volume(aligned, self.reference)
        if self.constraint_volume is not None:
            ladj = ladj - self.constraint_volume(xyz)
        return z, ladj

    def latent_to_internal(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``z`` [batch, 60] -> (internal [batch, 17, 3] (nm, rad, rad), rigid block
        [batch, 5, 3] nm in the reference frame, ladj [batch]): the normalisations and the
        whitening, without the Z-matrix geometry."""
        k, kb = self.n_internal, self.n_internal - self.n_fixed
        zb, za, zt, zr = z[:, :kb], z[:, kb : kb + k], z[:, kb + k : kb + 2 * k], z[:, kb + 2 * k :]
        if self.n_fixed:
            free = self.free_bonds
            yb = self.bond_mu[free] + self.bond_s[free] * zb
            fixed = self.fixed_length.to(yb.dtype).expand(len(z), -1)
            bonds = torch.cat([torch.exp(yb), fixed], 1)[:, self.bond_order]
        else:
            yb = self.bond_mu + self.bond_s * zb
            bonds = torch.exp(yb)
        ya = self.angle_mu + self.angle_s * za
        yt = self.torsion_mu + self.torsion_s * zt
        rel, clamped = _torsion_from_probit(yt)
        self._count(clamped.sum(1))
        internal = torch.stack([bonds, math.pi * torch.sigmoid(ya), self.torsion_centre + rel], -1)
        c = self.c_mean + (zr * self.pca_std) @ self.pca_vectors.T
        rigid_xyz = self.reference + (c @ self.basis.T).reshape(-1, len(self.rigid), 3)
        return internal, rigid_xyz, self._normalisation_ladj(yb, ya, yt)

    def internal_to_latent(self, internal: Tensor, aligned: Tensor) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`latent_to_internal` for a rigid block already aligned to
        ``reference``. Returns (z [batch, 60], ladj [batch])."""
        bonds, angles, torsions = internal.unbind(-1)
        yb = torch.log(bonds)
        mu_b, s_b = self.bond_mu, self.bond_s
        if self.n_fixed:  # the constrained bonds are not coordinates
            yb, mu_b, s_b = yb[:, self.free_bonds], mu_b[self.free_bonds], s_b[self.free_bonds]
        frac = angles / math.pi  # in (0, 1): cartesian_to_zmatrix clamps θ away from 0 and π
        ya = torch.log(frac) - torch.log1p(-frac)
        yt, clamped = _torsion_probit(_wrap(torsions - self.torsion_centre))
        self._count(clamped.sum(1))
        c = (aligned - self.reference).reshape(len(aligned), -1) @ self.basis
        z = torch.cat(
            [
                (yb - mu_b) / s_b,
                (ya - self.angle_mu) / self.angle_s,
                (yt - self.torsion_mu) / self.torsion_s,
                ((c - self.c_mean) @ self.pca_vectors) / self.pca_std,
            ],
            1,
        )
        return z, -self._normalisation_ladj(yb, ya, yt)

    def _normalisation_ladj(self, yb: Tensor, ya: Tensor, yt: Tensor) -> Tensor:
        """log|d(internal)/dz| of the elementwise maps plus the whitening's ½ Σ log λ."""
        s_b = self.bond_s[self.free_bonds] if self.n_fixed else self.bond_s
        bonds = torch.log(s_b) + yb  # b = exp(y), y = μ + s z (free bonds only)
        angles = (  # θ = π σ(y)
            math.log(math.pi)
            + torch.log(self.angle_s)
            + nn.functional.logsigmoid(ya)
            + nn.functional.logsigmoid(-ya)
        )
        torsions = torch.log(self.torsion_s) + _HALF_LOG_2PI - 0.5 * yt * yt  # φ' = 2π Φ(y) − π
        return (bonds.sum(1) + angles.sum(1) + torsions.sum(1)) + torch.log(self.pca_std).sum()

    def _count(self, clamped: Tensor) -> None:
        with torch.no_grad():
            self.n_clamped += clamped.sum()


def _wrap(angle: Tensor) -> Tensor:
    """Angle into [−π, π)."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _probit_limit(dtype: torch.dtype) -> float:
    """Largest |y| that the torsion map resolves in ``dtype``: φ' = π − 2π Φ(−y) differs from
    the cut at π by at least one unit in the last place of π only while Φ(−y) ≥ eps/π, i.e.
    |y| ≤ 5.38 in float32 and 8.26 in float64. Beyond it forward and inverse no longer agree, so
    y is clamped there and counted instead of passing a saturated value on silently."""
    if dtype not in _PROBIT_LIMITS:
        eps = torch.finfo(dtype).eps
        _PROBIT_LIMITS[dtype] = float(
            -torch.special.ndtri(torch.tensor(eps / math.pi, dtype=torch.float64))
        )
    return _PROBIT_LIMITS[dtype]


# computed once, at import: a constant per dtype, read by every pass (and by a compiled graph
# without a graph break)
_PROBIT_LIMITS: dict[torch.dtype, float] = {}
for _dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
    _probit_limit(_dtype)


def _torsion_probit(rel: Tensor) -> tuple[Tensor, Tensor]:
    """Normal quantile of the torsion's position in its cut interval: ``Φ⁻¹((φ' + π)/2π)`` for
    φ' in [−π, π). A uniform torsion becomes N(0, 1); each tail is computed from its own side so
    that angles next to the cut keep their precision. Returns (y, clamped mask): y is clamped to
    ±:func:`_probit_limit` of the dtype, which only angles within one rounding unit of the cut
    reach."""
    limit = _probit_limit(rel.dtype)
    tiny = torch.finfo(rel.dtype).tiny
    lower = torch.clamp((rel + math.pi) / (2 * math.pi), min=tiny)
    upper = torch.clamp((math.pi - rel) / (2 * math.pi), min=tiny)
    y = torch.where(rel < 0, torch.special.ndtri(lower), -torch.special.ndtri(upper))
    clamped = y.abs() > limit
    return torch.clamp(y, -limit, limit), clamped


def _torsion_from_probit(y: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`_torsion_probit`: φ' = 2π Φ(y) − π, in (−π, π). Returns (φ', clamped
    mask, and y is clamped to ±:func:`_probit_limit` first, where Φ is still exact)."""
    limit = _probit_limit(y.dtype)
    clamped = y.abs() > limit
    y = torch.clamp(y, -limit, limit)
    rel = torch.where(
        y < 0,
        2 * math.pi * torch.special.ndtr(y) - math.pi,
        math.pi - 2 * math.pi * torch.special.ndtr(-y),
    )
    return rel, clamped


def _torsion_centres(torsions: Tensor, bins: int = 72) -> Tensor:
    """Per torsion, the angle opposite the least-populated histogram bin (the cut)."""
    edges = torch.linspace(-math.pi, math.pi, bins + 1, dtype=torsions.dtype)
    centres = []
    for t in torsions.T:
        counts = torch.histc(t, bins=bins, min=-math.pi, max=math.pi)
        # Smooth circularly so that a single empty bin inside a peak is not chosen.
        smooth = counts + counts.roll(1) + counts.roll(-1)
        b = int(torch.argmin(smooth))
        cut = 0.5 * (edges[b] + edges[b + 1])
        centres.append(_wrap(cut + math.pi))
    return torch.stack(centres)
