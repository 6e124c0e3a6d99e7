"""The coordinate layout of a peptide from its topology: the rigid block and the Z-matrix.

A system whose ``system.toml`` has no ``[coordinates]`` gets them from here (docs/design.md §4).
Hand-written layouts stay valid and take precedence; this module states the rule and applies it.

The rule:

* **Rigid block**: the α carbon of the central residue and the atoms bonded to it (for a
  standard residue N, CA, C, HA and CB; glycine's HA2, HA3 instead of HA, CB). The central
  residue is the middle one of the non-cap residues (the lower middle for an even count), so the
  block sits where the chain's torsions accumulate least.
  With constraints (``HBonds``), an atom whose distance to the CA is constrained (HA) is left
  out of the block and placed on the CA like any other atom, its torsion taken within the block:
  every constrained distance is then a Z-matrix bond, which the transform holds fixed.
* **Placement order**: breadth first through the bond graph from the block. Around each placed
  atom its unplaced neighbours are placed backbone atoms first (N, CA, C), then other heavy
  atoms, then hydrogens, each group by index.
* **References** of an atom ``a`` placed on its bonded atom ``b``: the angle partner ``c`` is the
  atom ``b`` was itself placed on (for a block atom: its block neighbour, preferring backbone and
  heavy atoms); the torsion partner ``d`` is an atom already placed on ``b`` besides ``c`` (a
  sibling, so that a methyl's second and third hydrogens, or a carbonyl oxygen, get the torsion
  to the first: nearly constant, ±120° or 180°), else a neighbour of ``c`` other than ``b``
  (backbone, then heavy atoms first: this makes φ and ψ themselves Z-matrix torsions), else any
  other placed neighbour of ``b``. A choice whose three points are collinear in the reference
  structure (an angle within :data:`MIN_ANGLE_DEG` of 0° or 180°) is skipped for the next one.
* **Rings** (proline, aromatic side chains): every atom is placed once, by the first bond that
  reaches it; the ring-closing bond is not a Z-matrix bond, its length follows from the others.

For alanine dipeptide this gives the hand-written block (N, CA, HA, CB, C) and its φ and ψ rows
(4-6-8-14 and 16-14-8-6); it differs from the hand-written file in the torsion partners of four
rows (O and H of the caps, and the amide H's) and in the order of rows, which is why
``systems/alanine_dipeptide/system.toml`` keeps its own layout: runs made with it stay
loadable.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BACKBONE",
    "CAPS",
    "MIN_ANGLE_DEG",
    "Layout",
    "LayoutError",
    "backbone_dihedrals",
    "build_layout",
    "central_dihedrals",
    "central_residue",
    "chirality_centres",
    "residue_of",
]

BACKBONE = ("N", "CA", "C")
CAPS = ("ACE", "NME", "NHE", "NH2")  # Amber's capping groups, not residues of the chain
MIN_ANGLE_DEG = 10.0  # reference points closer to collinear than this are not used


class LayoutError(ValueError):
    """No layout can be built for this topology (the message says which atom and why)."""


@dataclass(frozen=True)
class Layout:
    """rigid_atoms: [5] atom indices (0-based, the topology's order); z_matrix: [n − 5, 4] rows
    (atom, bonded to, angle with, torsion with) in placement order."""

    rigid_atoms: np.ndarray
    z_matrix: np.ndarray

    def as_toml(self) -> str:
        """The ``[coordinates]`` section of a system.toml holding this layout."""
        rows = ",\n".join(f"  [{', '.join(str(int(i)) for i in row)}]" for row in self.z_matrix)
        block = ", ".join(str(int(i)) for i in self.rigid_atoms)
        return (
            "[coordinates]\n"
            "# Made by p4bg.zmatrix (docs/design.md §4): the central residue's CA and its\n"
            "# bonded atoms kept Cartesian; every other atom as\n"
            "# [atom, bonded to, angle with, torsion with], in placement order\n"
            f"rigid_atoms = [{block}]\n"
            f"z_matrix = [\n{rows},\n]\n"
        )


def _chain_residues(topology: Any) -> list[Any]:
    return [r for r in topology.residues if r.name not in CAPS and _atom(r, "CA") is not None]


def _atom(residue: Any, name: str) -> Any:
    return next((a for a in residue.atoms if a.name == name), None)


def central_residue(topology: Any) -> Any:
    """The middle residue with a CA among the non-cap residues (mdtraj Topology)."""
    chain = _chain_residues(topology)
    if not chain:
        names = ", ".join(sorted({r.name for r in topology.residues}))
        raise LayoutError(f"no amino-acid residue with a CA atom among the residues ({names}); "
                          "write [coordinates] in system.toml by hand")  # fmt: skip
    return chain[(len(chain) - 1) // 2]


def backbone_dihedrals(topology: Any) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(label like ``"ALA2"``, φ atoms C(i−1) N CA C, ψ atoms N CA C N(i+1)) of every chain
    residue that has both neighbours (caps count as neighbours)."""
    residues = list(topology.residues)
    out = []
    for k, res in enumerate(residues):
        if res.name in CAPS or k == 0 or k == len(residues) - 1:
            continue
        prev_c, nxt_n = _atom(residues[k - 1], "C"), _atom(residues[k + 1], "N")
        n, ca, c = (_atom(res, name) for name in BACKBONE)
        if None in (prev_c, nxt_n, n, ca, c):
            continue
        phi = (prev_c.index, n.index, ca.index, c.index)
        psi = (n.index, ca.index, c.index, nxt_n.index)
        out.append((f"{res.name}{res.resSeq}", phi, psi))
    return out


def residue_of(
    chain: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    phi_atoms: tuple[int, ...],
    psi_atoms: tuple[int, ...],
) -> str | None:
    """The label of the residue of ``chain`` (:func:`backbone_dihedrals`) whose φ and ψ are
    these atoms (a system's own, from its system.toml); None if no residue's are."""
    own = (tuple(phi_atoms), tuple(psi_atoms))
    return next((label for label, phi, psi in chain if (tuple(phi), tuple(psi)) == own), None)


def central_dihedrals(topology: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(φ atoms, ψ atoms) of :func:`central_residue`: the system's default φ/ψ."""
    centre = central_residue(topology)
    for label, phi, psi in backbone_dihedrals(topology):
        if label == f"{centre.name}{centre.resSeq}":
            return phi, psi
    raise LayoutError(f"the central residue {centre.name}{centre.resSeq} has no neighbour on "
                      "one side, so no φ or ψ; cap the chain (ACE, NME) or write [dihedrals]"
                      )  # fmt: skip


def chirality_centres(topology: Any) -> list[tuple[int, int, int, int]]:
    """(N, CA, C, CB) atom indices of every residue that has all four (glycine has no CB):
    the atoms whose handedness tells L from D (analysis.geometry.is_l_chirality)."""
    out = []
    for res in topology.residues:
        atoms = [_atom(res, name) for name in ("N", "CA", "C", "CB")]
        if None not in atoms:
            out.append(tuple(a.index for a in atoms))
    return out


def _sin_angle(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> float:
    u, v = p - q, r - q
    return float(np.linalg.norm(np.cross(u, v)) / (np.linalg.norm(u) * np.linalg.norm(v)))


def build_layout(
    topology: Any, positions: np.ndarray, constrained: Iterable[tuple[int, int]] = ()
) -> Layout:
    """The layout of the module docstring for an mdtraj Topology with bonds.

    positions: one structure, shape (n_atoms, 3), nm: only to refuse collinear references.
    constrained: the atom pairs whose distance the System constrains (``HBonds``): an atom
    constrained to the central CA stays out of the rigid block, so that every constrained
    distance is the bond of a Z-matrix row, which the coordinate transform holds fixed."""
    n = topology.n_atoms
    positions = np.asarray(positions, dtype=np.float64).reshape(n, 3)
    if topology.n_bonds == 0:
        raise LayoutError("the topology has no bonds (a PDB without CONECT records for "
                          "non-standard residues?); load it through OpenMM's PDBFile")  # fmt: skip
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for a, b in topology.bonds:
        neighbours[a.index].append(b.index)
        neighbours[b.index].append(a.index)
    atoms = list(topology.atoms)

    def rank(i: int) -> tuple[int, int]:
        atom = atoms[i]
        heavy = atom.element is not None and atom.element.symbol != "H"
        backbone = atom.name in BACKBONE  # the caps' peptide-bond C and N count too
        return (0 if backbone else 1 if heavy else 2, i)

    centre = _atom(central_residue(topology), "CA")
    fixed = {frozenset((int(i), int(j))) for i, j in constrained}
    block = sorted([centre.index, *(i for i in neighbours[centre.index]
                                    if frozenset((i, centre.index)) not in fixed)])  # fmt: skip
    if len(block) < 3:
        raise LayoutError(f"atom {centre.index} ({centre}) has {len(block) - 1} bonded atoms; "
                          "the rigid block needs at least 3 atoms")  # fmt: skip
    parent: dict[int, int | None] = dict.fromkeys(block)  # the atom each was placed on
    placed_on: dict[int, list[int]] = {i: [] for i in range(n)}  # b -> atoms placed on b
    rows: list[list[int]] = []
    queue = deque(sorted(block, key=rank))

    def ok(a: int, b: int, c: int, d: int) -> bool:
        lo = np.sin(np.radians(MIN_ANGLE_DEG))
        x = positions
        return _sin_angle(x[a], x[b], x[c]) > lo and _sin_angle(x[b], x[c], x[d]) > lo

    while queue:
        b = queue.popleft()
        for a in sorted((i for i in neighbours[b] if i not in parent), key=rank):
            placed_b = [i for i in neighbours[b] if i in parent]
            # b's own parent; for a block atom its block neighbours first
            first = [parent[b]] if parent[b] is not None else []
            first += sorted((i for i in placed_b if parent[b] is None and i in block), key=rank)
            angle_partners = first + sorted((i for i in placed_b if i not in first), key=rank)
            row = None
            for c in angle_partners:
                siblings = [i for i in placed_on[b] if i != c]
                chain = sorted((i for i in neighbours[c] if i in parent and i != b), key=rank)
                others = sorted((i for i in placed_b if i not in (c, *siblings)), key=rank)
                # on the central CA (an atom kept out of the block): a torsion within the block
                rigid = (
                    sorted((i for i in block if i not in (b, c)), key=rank)
                    if b == centre.index
                    else []
                )
                row = next(([a, b, c, d] for d in siblings + rigid + chain + others
                            if ok(a, b, c, d)), None)  # fmt: skip
                if row:
                    break
            if row is None:
                raise LayoutError(
                    f"atom {a} ({atoms[a]}): no three placed, non-collinear reference atoms "
                    f"around atom {b} ({atoms[b]}); write [coordinates] in system.toml by hand"
                )
            rows.append(row)
            parent[a] = b
            placed_on[b].append(a)
            queue.append(a)
    missing = [i for i in range(n) if i not in parent]
    if missing:
        raise LayoutError(f"atoms {missing[:10]} are not bonded to the rest of the molecule; "
                          "p4bg lays out one connected molecule")  # fmt: skip
    return Layout(np.asarray(block, dtype=np.int64), np.asarray(rows, dtype=np.int64))
