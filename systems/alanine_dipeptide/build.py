"""Build alanine_dipeptide.pdb (ACE-ALA-NME, L-alanine) from standard peptide geometry.

Heavy atoms are placed from textbook bond lengths and angles (Engh & Huber) with
φ = -70°, ψ = 140° and trans peptide bonds; OpenMM's ``Modeller.addHydrogens`` adds the
hydrogens with the Amber ff99SB-ILDN templates; the structure is energy-minimised in OBC implicit
solvent (no constraints) and written with the atom order the project's contract fixes
(docs/design.md §4):

    ACE HH31 CH3 HH32 HH33 C O · ALA N H CA HA CB HB1 HB2 HB3 C O · NME N H C H1 H2 H3

Run from anywhere: ``python systems/alanine_dipeptide/build.py`` (rewrites the PDB next to it).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ORDER = [
    ("ACE", ["HH31", "CH3", "HH32", "HH33", "C", "O"]),
    ("ALA", ["N", "H", "CA", "HA", "CB", "HB1", "HB2", "HB3", "C", "O"]),
    ("NME", ["N", "H", "C", "H1", "H2", "H3"]),
]
# OpenMM's internal names for atoms whose PDB names differ (its pdbNames.xml maps them back).
OPENMM_NAME = {("ACE", "HH31"): "H1", ("ACE", "HH32"): "H2", ("ACE", "HH33"): "H3"}


def place(
    a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle: float, torsion: float
) -> np.ndarray:
    """Position of d with |cd| = bond, angle(b, c, d) = angle, dihedral(a, b, c, d) = torsion
    (degrees)."""
    angle, torsion = math.radians(angle), math.radians(torsion)
    bc = (c - b) / np.linalg.norm(c - b)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    d = np.array(
        [
            -bond * math.cos(angle),
            bond * math.sin(angle) * math.cos(torsion),
            bond * math.sin(angle) * math.sin(torsion),
        ]
    )
    return c + d[0] * bc + d[1] * m + d[2] * n


def chirality(n: np.ndarray, ca: np.ndarray, c: np.ndarray, cb: np.ndarray) -> float:
    """> 0 for L-alanine (docs/design.md §5)."""
    return float(np.dot(n - ca, np.cross(c - ca, cb - ca)))


def heavy_atoms(phi: float = -70.0, psi: float = 140.0) -> dict[tuple[str, str], np.ndarray]:
    """Heavy-atom positions in Å from standard geometry."""
    N = np.zeros(3)
    CA = np.array([1.458, 0.0, 0.0])
    C = CA + 1.525 * np.array([-math.cos(math.radians(111.2)), math.sin(math.radians(111.2)), 0.0])
    O1 = place(N, CA, C, 1.231, 120.5, psi + 180.0)
    N2 = place(N, CA, C, 1.329, 116.2, psi)
    C2 = place(CA, C, N2, 1.458, 121.7, 180.0)
    C0 = place(C, CA, N, 1.329, 121.7, phi)  # dihedral C0-N-CA-C = phi
    O0 = place(CA, N, C0, 1.231, 122.7, 0.0)
    CH3 = place(CA, N, C0, 1.516, 116.2, 180.0)
    CB = place(C, N, CA, 1.521, 110.4, 122.5)
    if chirality(N, CA, C, CB) < 0:
        CB = place(C, N, CA, 1.521, 110.4, -122.5)
    assert chirality(N, CA, C, CB) > 0
    return {
        ("ACE", "CH3"): CH3, ("ACE", "C"): C0, ("ACE", "O"): O0,
        ("ALA", "N"): N, ("ALA", "CA"): CA, ("ALA", "CB"): CB, ("ALA", "C"): C, ("ALA", "O"): O1,
        ("NME", "N"): N2, ("NME", "C"): C2,
    }  # fmt: skip


def build(out: Path = HERE / "alanine_dipeptide.pdb") -> Path:
    import openmm
    import openmm.app as app
    import openmm.unit as unit

    atoms = heavy_atoms()
    lines, serial = [], 1
    for resid, (resname, names) in enumerate(ORDER, start=1):
        for name in names:
            if (resname, name) not in atoms:
                continue
            x, y, z = atoms[(resname, name)]
            element = name[0]
            lines.append(
                f"ATOM  {serial:5d} {name:<4s} {resname:3s} A{resid:4d}    "
                f"{x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00          {element:>2s}"
            )
            serial += 1
    pdb = app.PDBFile(io.StringIO("\n".join(lines) + "\nEND\n"))
    forcefield = app.ForceField("amber99sbildn.xml", "amber99_obc.xml")
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.addHydrogens(forcefield)

    # Reorder to the contract order.
    lookup = {}
    for atom in modeller.topology.atoms():
        lookup[(atom.residue.name, atom.name)] = atom
    topology = app.Topology()
    chain = topology.addChain("A")
    new_atoms, positions = {}, []
    for resname, names in ORDER:
        residue = topology.addResidue(resname, chain)
        for name in names:
            old = lookup[(resname, OPENMM_NAME.get((resname, name), name))]
            new_atoms[old] = topology.addAtom(name, old.element, residue)
            positions.append(modeller.positions[old.index].value_in_unit(unit.nanometer))
    for a, b in modeller.topology.bonds():
        topology.addBond(new_atoms[a], new_atoms[b])
    assert topology.getNumAtoms() == modeller.topology.getNumAtoms() == 22

    # Minimise with the production force field: OBC implicit solvent, no cutoff, no constraints.
    reread = app.PDBFile(io.StringIO(_pdb_text(topology, positions)))
    system = forcefield.createSystem(
        reread.topology, nonbondedMethod=app.NoCutoff, constraints=None
    )
    context = openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    context.setPositions(np.array(positions) * unit.nanometer)
    openmm.LocalEnergyMinimizer.minimize(context, 1.0, 0)
    state = context.getState(getPositions=True, getEnergy=True)
    minimized = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    out.write_text(_pdb_text(topology, minimized))
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    n, ca, c, cb = (minimized[i] for i in (6, 8, 14, 10))
    print(
        f"wrote {out}: 22 atoms, minimised energy {energy:.3f} kJ/mol, "
        f"chirality {'L' if chirality(n, ca, c, cb) > 0 else 'D'}"
    )
    return out


def _pdb_text(topology, positions) -> str:
    import openmm.app as app
    import openmm.unit as unit

    buffer = io.StringIO()
    app.PDBFile.writeFile(topology, np.asarray(positions) * unit.nanometer, buffer, keepIds=True)
    return buffer.getvalue()


if __name__ == "__main__":
    build()
