"""Equivalent atoms: the labels of a methyl group's hydrogens, and of a CH2's (docs/design.md §5).

The three hydrogens of a methyl group (CH3, and any X–AH3 group) are interchangeable: the force
field gives them the same parameters, so relabelling them leaves the energy unchanged. The flow's
density does change: it learns the rotor torsion of the PDB's labelling, in which, looking down
the X→A axis, H1, H2, H3 follow each other in one sense of rotation. A frame whose labels run the
other way (HB2 and HB3 swapped, as another MD tool may write them) is a mirror image the flow has
never seen, and gets an NLL of ~15,000 instead of ~−126.

A *cyclic* relabelling (H1, H2, H3) → (H2, H3, H1) is the same as turning the rotor by 120°,
which the flow models. Only the *sense* of the labelling matters, i.e. the sign of each
H–A–X–H torsion. It is measured here as the orientation of the triangle H1 H2 H3 seen along the
X→A axis::

    s = cos∠( (H2 − H1) × (H3 − H1),  A − X )   ∈ [−1, 1]

which is invariant under cyclic relabellings and flips under any swap of two labels. A frame whose
``s`` has the other sign than the system PDB's is made canonical by exchanging the positions of
the last two hydrogens. ``|s|`` is ≈ 0.9–1 for any methyl group an MD run can visit; below
:data:`DEGENERATE_COS` the labelling is undefined (the group is flat along its axis) and
:func:`canonicalize_equivalent_atoms` refuses the frame.

Two hydrogens on one sp3 atom with the same force-field parameters are equivalent as well (the
CH2 of a side chain, glycine's HA2/HA3). On an atom A with heavy neighbours X, Y exchanging them
is a reflection, which MD never makes but another tool's labels can (HB2/HB3 written the other
way round). Their sense is

    s = cos∠( (H1 − A) × (H2 − A),  X − Y )   (X < Y by index)

and frames whose ``s`` has the other sign than the PDB's get H1 and H2 exchanged, as above. An
NH2 on an sp2 atom (amides, arginine) is left as it is: exchanging its hydrogens is a 180° turn
of the group, a torsion the flow models, as it does a carboxylate's. Alanine dipeptide has no
pair, so its runs are unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

    from p4bg.systems import MolecularSystem

__all__ = [
    "DEGENERATE_COS",
    "EquivalentAtomsError",
    "EquivalentGroup",
    "canonicalize_equivalent_atoms",
    "canonicalize_equivalent_atoms_torch",
    "equivalent_groups",
    "labelling_orientation",
]

# |s| below this: the H triangle is (nearly) parallel to the X→A axis and the labelling has no
# sense of rotation. Far above float32 round-off (~1e-6), far below any real methyl (~0.9).
DEGENERATE_COS = 1e-3


class EquivalentAtomsError(ValueError):
    """A frame whose equivalent hydrogens cannot be brought to the PDB's labelling."""


@dataclass(frozen=True)
class EquivalentGroup:
    """Three (or two) interchangeable hydrogens on one atom (0-based atom indices, PDB order).

    center: the atom carrying them (A). neighbor: its (first) heavy neighbour (X); second: a
    pair's other heavy neighbour (Y), −1 for a rotor. hydrogens: (H1, H2, H3) or (H1, H2) in PDB
    order. reference_sign: ±1, the sign of the orientation ``s``
    (module docstring) in the system PDB; frames with the other sign get H2 and H3 exchanged.
    """

    center: int
    neighbor: int
    hydrogens: tuple[int, ...]  # three (a rotor) or two (a pair)
    reference_sign: int
    second: int = -1  # a pair's other heavy neighbour Y (module docstring); -1 for a rotor


def _frames(xyz: Any) -> Any:
    """An array or tensor (frames, 3·n_atoms) or (frames, n_atoms, 3) as (frames, n_atoms, 3)."""
    return xyz if xyz.ndim == 3 else xyz.reshape(xyz.shape[0], xyz.shape[1] // 3, 3)


def labelling_orientation(xyz: np.ndarray, group: EquivalentGroup) -> np.ndarray:
    """The orientation ``s`` of ``group``'s labels in each frame (module docstring), float64.

    xyz: positions, shape (frames, n_atoms, 3) or (frames, 3·n_atoms), nm. Returns (frames,),
    dimensionless in [−1, 1]; NaN where the positions are not finite.
    """
    xyz = _frames(np.asarray(xyz)).astype(np.float64)
    normal, axis = _sense_vectors(xyz, group, np.cross)
    norms = np.linalg.norm(normal, axis=-1) * np.linalg.norm(axis, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("fi,fi->f", normal, axis) / norms


def _sense_vectors(xyz: Any, group: EquivalentGroup, cross: Any) -> tuple[Any, Any]:
    """The two vectors whose angle's cosine is ``s`` (module docstring), numpy or torch."""
    a, x = xyz[:, group.center], xyz[:, group.neighbor]
    if len(group.hydrogens) == 3:
        h1, h2, h3 = (xyz[:, i] for i in group.hydrogens)
        return cross(h2 - h1, h3 - h1), a - x
    h1, h2 = (xyz[:, i] for i in group.hydrogens)
    return cross(h1 - a, h2 - a), x - xyz[:, group.second]


def _nonbonded_parameters(system: MolecularSystem) -> list[tuple[float, ...]] | None:
    """Each atom's (charge, σ, ε) of the System's NonbondedForce, None when it has none."""
    import openmm

    for force in system.openmm_system.getForces():
        if isinstance(force, openmm.NonbondedForce):
            return [tuple(v._value for v in force.getParticleParameters(i))
                    for i in range(force.getNumParticles())]  # fmt: skip
    return None


def equivalent_groups(system: MolecularSystem) -> list[EquivalentGroup]:
    """The equivalent hydrogens of ``system`` from the topology's bonds, with reference signs
    from ``system.positions``: methyl-like rotors (an atom bonded to exactly three hydrogens and
    one other atom), and pairs (an atom bonded to exactly two hydrogens with the same nonbonded
    parameters and to two other atoms).

    For alanine dipeptide: ACE CH3 (1; H 0, 2, 3), ALA CB (10; H 11, 12, 13), NME C (18; H 19,
    20, 21), and no pair.
    """
    neighbours: dict[int, list[int]] = {a.index: [] for a in system.topology.atoms}
    for a, b in system.topology.bonds:
        neighbours[a.index].append(b.index)
        neighbours[b.index].append(a.index)
    is_h = {
        a.index: a.element is not None and a.element.symbol == "H" for a in system.topology.atoms
    }
    parameters = None
    groups = []
    for center, bonded in sorted(neighbours.items()):
        hydrogens = sorted(i for i in bonded if is_h[i])
        heavy = sorted(i for i in bonded if not is_h[i])
        if len(hydrogens) == 3 and len(heavy) == 1:
            group = EquivalentGroup(center, heavy[0], tuple(hydrogens), 0)
        elif len(hydrogens) == 2 and len(heavy) == 2:
            if parameters is None:
                parameters = _nonbonded_parameters(system) or []
                if parameters and len(parameters) != len(neighbours):
                    raise ValueError(f"{system.name}: the System has {len(parameters)} "
                                     f"particles, the topology {len(neighbours)} atoms"
                                     )  # fmt: skip
            if not parameters or parameters[hydrogens[0]] != parameters[hydrogens[1]]:
                continue  # not interchangeable in this force field
            group = EquivalentGroup(center, heavy[0], tuple(hydrogens), 0, heavy[1])
        else:
            continue
        s = float(labelling_orientation(system.positions[None], group)[0])
        if not abs(s) >= DEGENERATE_COS:
            raise EquivalentAtomsError(
                f"{system.path}: the PDB's hydrogens {group.hydrogens} on atom {center} are "
                f"degenerate (orientation {s:.2g}); the PDB cannot fix their labelling"
            )
        groups.append(dataclasses.replace(group, reference_sign=1 if s > 0 else -1))
    return groups


def canonicalize_equivalent_atoms(
    xyz: np.ndarray, groups: list[EquivalentGroup]
) -> tuple[np.ndarray, int]:
    """Bring every frame's equivalent hydrogens to the PDB's labelling.

    xyz: positions, shape (frames, n_atoms, 3) or (frames, 3·n_atoms), nm, any float dtype.
    Returns ``(xyz_canonical, n_swapped)``: a new array of the same shape and dtype in which, for
    every frame and group whose orientation differs in sign from the PDB's, the positions of the
    group's last two hydrogens are exchanged; ``n_swapped`` is the number of frames changed.
    Energies are unchanged (the hydrogens have the same force-field parameters).

    Raises :class:`EquivalentAtomsError` naming the first frame and group whose labelling is
    undefined (``|s| < DEGENERATE_COS``, or non-finite positions): such a frame is refused rather
    than guessed.
    """
    xyz = np.asarray(xyz)
    shape = xyz.shape
    out = _frames(xyz).copy()
    changed = np.zeros(len(out), dtype=bool)
    for group in groups:
        s = labelling_orientation(out, group)
        bad = ~(np.abs(s) >= DEGENERATE_COS)
        if bad.any():
            f = int(np.flatnonzero(bad)[0])
            raise EquivalentAtomsError(
                f"frame {f} (of {len(out)}; {int(bad.sum())} such frames): the hydrogens "
                f"{group.hydrogens} on atom {group.center} have no defined labelling "
                f"(orientation {s[f]:.2g} about the axis {group.neighbor}→{group.center}, "
                f"|s| must be ≥ {DEGENERATE_COS}); the frame is broken or not this molecule"
            )
        swap = np.sign(s) != group.reference_sign
        h2, h3 = group.hydrogens[-2:]  # a rotor's last two, a pair's both
        out[swap, h2], out[swap, h3] = out[swap, h3], out[swap, h2]  # masks index copies
        changed |= swap
    return out.reshape(shape), int(changed.sum())


def canonicalize_equivalent_atoms_torch(x: Tensor, groups: list[EquivalentGroup]) -> Tensor:
    """Torch version of :func:`canonicalize_equivalent_atoms`, for use inside ``log_prob``.

    x: positions, shape (batch, 3·n_atoms) or (batch, n_atoms, 3), nm, any float dtype, any
    device. Returns a tensor of the same shape: a per-frame permutation of the atoms (a gather),
    so gradients pass through to the positions they came from. Never raises: a degenerate or
    non-finite group (``|s| < DEGENERATE_COS``) is left as it is.
    """
    import torch

    shape = x.shape
    xyz = _frames(x)
    batch, n_atoms = xyz.shape[0], xyz.shape[1]
    perm = torch.arange(n_atoms, device=x.device).expand(batch, n_atoms).clone()
    with torch.no_grad():
        for group in groups:
            normal, axis = _sense_vectors(xyz, group, torch.linalg.cross)
            s = (normal * axis).sum(-1) / (
                torch.linalg.vector_norm(normal, dim=-1) * torch.linalg.vector_norm(axis, dim=-1)
            )
            swap = (s.abs() >= DEGENERATE_COS) & (torch.sign(s) != group.reference_sign)
            i2, i3 = group.hydrogens[-2:]
            perm[:, i2] = torch.where(swap, i3, i2)
            perm[:, i3] = torch.where(swap, i2, i3)
    out = torch.gather(xyz, 1, perm.unsqueeze(-1).expand(batch, n_atoms, 3))
    return out.reshape(shape)
