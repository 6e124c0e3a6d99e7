"""A capped peptide's system folder, made from a one-letter sequence or from a PDB file.

OpenMM's Modeller and PDBFixer complete residues that are there (missing heavy atoms, hydrogens)
but start no chain from nothing, and the field's other builders (tleap, PeptideBuilder) bring a
toolchain or leave the caps out; so the backbone of ACE-sequence-NME is laid here, from standard
peptide geometry (Engh & Huber bond lengths and angles, trans peptide bonds, the
polyproline II conformation φ = −75°, ψ = 145°) with each residue's CB on the L side, and
PDBFixer adds the rest of every side chain and the hydrogens, then OpenMM minimises the result
in the chosen force field. The CB matters: fitted to N, CA, C and O alone, PDBFixer's templates
came out D for isoleucine, methionine, proline, threonine and valine. Every residue of the
result is checked to be L.

Everything is in nm and degrees at the edges; the PDB written is the system's atom order.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "AMINO_ACIDS",
    "FORCEFIELD",
    "PeptideError",
    "PreparedMolecule",
    "backbone_pdb",
    "from_pdb",
    "from_sequence",
    "write_system",
]

AMINO_ACIDS = {
    "A": "ALA", "R": "ARG", "N": "ASN", "D": "ASP", "C": "CYS", "Q": "GLN", "E": "GLU",
    "G": "GLY", "H": "HIS", "I": "ILE", "L": "LEU", "K": "LYS", "M": "MET", "F": "PHE",
    "P": "PRO", "S": "SER", "T": "THR", "W": "TRP", "Y": "TYR", "V": "VAL",
}  # fmt: skip
CAP_NAMES = ("ACE", "NME")
WATER = ("HOH", "WAT", "SOL", "TIP3", "TIP")
FORCEFIELD = ("amber99sbildn.xml", "amber99_obc.xml")  # the default system's force field

# Standard peptide geometry, nm and degrees (Engh & Huber 1991)
N_CA, CA_C, C_N, C_O, CH3_C = 0.1458, 0.1525, 0.1329, 0.1231, 0.1520
ANGLE_C_N_CA, ANGLE_N_CA_C, ANGLE_CA_C_N, ANGLE_N_C_O = 121.7, 111.2, 116.2, 122.7
PHI, PSI, OMEGA = -75.0, 145.0, 180.0
# CB of an L residue: |CA–CB|, ∠C–CA–CB and the improper torsion N–C–CA–CB
CA_CB, ANGLE_C_CA_CB, CB_TORSION = 0.1530, 110.1, 122.6


class PeptideError(ValueError):
    """A sequence or PDB that cannot become a system (the message names the residue or atom)."""


@dataclass
class PreparedMolecule:
    """An OpenMM topology and positions (nm), with what was done to get there."""

    topology: Any  # openmm.app.Topology
    positions: np.ndarray  # (n_atoms, 3) nm
    notes: list[str] = field(default_factory=list)


def _place(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle: float,
           torsion: float) -> np.ndarray:  # fmt: skip
    """The point d with |cd| = bond, ∠bcd = angle and dihedral a-b-c-d = torsion (degrees)."""
    theta, chi = math.radians(angle), math.radians(torsion)
    bc = (c - b) / np.linalg.norm(c - b)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    return c + bond * (-math.cos(theta) * bc + math.sin(theta) * math.cos(chi) * m
                       + math.sin(theta) * math.sin(chi) * n)  # fmt: skip


def backbone_pdb(residues: list[str]) -> str:
    """PDB text of the heavy backbone of ACE-residues-NME: ACE's CH3, C, O; N, CA, C, O of each
    residue; NME's N and methyl C (named as in alanine dipeptide's PDB, which OpenMM reads)."""
    chain: list[tuple[str, str, int, np.ndarray]] = []  # (atom, residue, number, xyz nm)
    ch3 = np.zeros(3)
    c = np.array([CH3_C, 0.0, 0.0])
    a = np.array([CH3_C, 0.1, 0.0])  # only orients the first angle's plane
    n = _place(a, ch3, c, C_N, ANGLE_CA_C_N, 180.0)
    chain += [("CH3", "ACE", 1, ch3), ("C", "ACE", 1, c)]
    prev_ca, prev_c = ch3, c
    for k, name in enumerate(residues, start=2):
        ca = _place(prev_ca, prev_c, n, N_CA, ANGLE_C_N_CA, OMEGA)
        cc = _place(prev_c, n, ca, CA_C, ANGLE_N_CA_C, PHI)
        chain += [("N", name, k, n), ("CA", name, k, ca), ("C", name, k, cc)]
        if name != "GLY":  # CB fixes the handedness PDBFixer's side chain is fitted to: L
            chain.append(("CB", name, k, _place(n, cc, ca, CA_CB, ANGLE_C_CA_CB, CB_TORSION)))
        n_next = _place(n, ca, cc, C_N, ANGLE_CA_C_N, PSI)
        prev_ca, prev_c, n = ca, cc, n_next
    last = len(residues) + 2
    methyl = _place(prev_ca, prev_c, n, N_CA, ANGLE_C_N_CA, OMEGA)
    chain += [("N", "NME", last, n), ("C", "NME", last, methyl)]
    # every carbonyl O: in the peptide plane, cis to the next residue's CA (trans peptide)
    by_residue: dict[int, dict[str, np.ndarray]] = {}
    for atom, _, number, xyz in chain:
        by_residue.setdefault(number, {})[atom] = xyz
    atoms = []
    for number in range(1, last):
        here, nxt = by_residue[number], by_residue[number + 1]
        nxt_ca = nxt.get("CA", nxt.get("C"))  # NME's methyl C stands where a CA would
        o = _place(nxt_ca, nxt["N"], here["C"], C_O, ANGLE_N_C_O, 0.0)
        atoms += [(a_, r_, k_, x_) for a_, r_, k_, x_ in chain if k_ == number] + [
            ("O", "ACE" if number == 1 else residues[number - 2], number, o)]  # fmt: skip
    atoms += [item for item in chain if item[2] == last]
    lines = []
    for i, (atom, res, number, xyz) in enumerate(atoms, start=1):
        x, y, z = xyz * 10.0  # Å
        element = atom[0]
        lines.append(f"ATOM  {i:5d} {atom:<4s} {res:3s} A{number:4d}    "
                     f"{x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00          {element:>2s}")  # fmt: skip
    return "\n".join([*lines, "TER", "END"]) + "\n"


def _residues_of(sequence: str) -> list[str]:
    residues = []
    for i, letter in enumerate(sequence.strip().upper()):
        if letter not in AMINO_ACIDS:
            raise PeptideError(
                f"sequence position {i + 1}: {letter!r} is not one of the 20 standard amino "
                f"acids ({''.join(sorted(AMINO_ACIDS))}); give one-letter codes"
            )
        residues.append(AMINO_ACIDS[letter])
    if not residues:
        raise PeptideError("the sequence is empty; give one-letter codes, e.g. --sequence AAA")
    return residues


def _complete(fixer: Any, ph: float, notes: list[str], seed: int) -> None:
    """PDBFixer: missing heavy atoms of standard residues, then hydrogens at ``ph``."""
    fixer.findMissingResidues()
    fixer.missingResidues = {}  # no loops or termini are invented
    fixer.findMissingAtoms()
    heavy = sum(len(v) for v in fixer.missingAtoms.values())
    if heavy:
        notes.append(f"PDBFixer added {heavy} missing heavy atoms")
    n_before = sum(1 for _ in fixer.topology.atoms())
    fixer.addMissingAtoms(seed=seed)
    fixer.addMissingHydrogens(ph)
    added = sum(1 for _ in fixer.topology.atoms()) - n_before - heavy
    if added:
        notes.append(f"PDBFixer added {added} hydrogens (pH {ph:g})")


def _minimise(topology: Any, positions: Any, forcefield: tuple[str, ...]) -> np.ndarray:
    import openmm
    import openmm.app as app
    import openmm.unit as unit

    try:
        system = app.ForceField(*forcefield).createSystem(topology, nonbondedMethod=app.NoCutoff)
    except ValueError as err:  # no template for a residue, or a file OpenMM does not know
        raise PeptideError(f"{' + '.join(forcefield)} cannot parametrise the molecule: {err}"
                           ) from None  # fmt: skip
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))  # fmt: skip
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context, 1.0, 5000)
    state = context.getState(getPositions=True, getEnergy=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    if not math.isfinite(energy):
        raise PeptideError("the minimised structure has a non-finite energy; check the input")
    return np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))


def _d_residues(topology: Any, positions: np.ndarray) -> list[str]:
    """Residues (like ``"ALA2"``) whose CA is not L-handed in ``positions`` (n_atoms, 3) nm."""
    import mdtraj

    from analysis.geometry import is_l_chirality
    from p4bg.zmatrix import chirality_centres

    top = mdtraj.Topology.from_openmm(topology)
    return [str(top.atom(centre[1]).residue) for centre in chirality_centres(top)
            if not is_l_chirality(positions[None], *centre)[0]]  # fmt: skip


def from_sequence(sequence: str, forcefield: tuple[str, ...] = FORCEFIELD, ph: float = 7.0,
                  seed: int = 0) -> PreparedMolecule:  # fmt: skip
    """ACE-``sequence``-NME (one-letter codes), side chains and hydrogens added, minimised."""
    from pdbfixer import PDBFixer

    residues = _residues_of(sequence)
    notes = [f"ACE-{'-'.join(residues)}-NME built in the polyproline II conformation "
             f"(φ {PHI:g}°, ψ {PSI:g}°)"]  # fmt: skip
    fixer = PDBFixer(pdbfile=io.StringIO(backbone_pdb(residues)))
    _complete(fixer, ph, notes, seed)
    positions = _minimise(fixer.topology, fixer.positions, forcefield)
    notes.append("minimised in " + " + ".join(forcefield))
    wrong = _d_residues(fixer.topology, positions)
    if wrong:  # the built CB makes every residue L; a D one here is a bug, not an input
        raise PeptideError(f"the built structure has D residues {wrong}; please report it")
    return PreparedMolecule(fixer.topology, positions, notes)


def from_pdb(path: str | Path, forcefield: tuple[str, ...] = FORCEFIELD, ph: float = 7.0,
             seed: int = 0) -> PreparedMolecule:  # fmt: skip
    """A PDB's standard residues (water and other heterogens removed and said so), missing
    heavy atoms and hydrogens added by PDBFixer, minimised."""
    from pdbfixer import PDBFixer

    path = Path(path)
    if not path.is_file():
        raise PeptideError(f"{path}: no such file")
    fixer = PDBFixer(filename=str(path))
    nonstandard = fixer.findNonstandardResidues() or fixer.nonstandardResidues
    if nonstandard:
        names = ", ".join(f"{r.name}{r.id}" for r, _ in nonstandard)
        raise PeptideError(f"{path}: non-standard residues {names}; replace them by standard "
                           "ones (PDBFixer.replaceNonstandardResidues) or remove them"
                           )  # fmt: skip
    import openmm.app as app

    notes = []
    known = set(AMINO_ACIDS.values()) | set(CAP_NAMES) | {"HID", "HIE", "HIP", "CYX", "ASH",
                                                          "GLH", "LYN"}  # fmt: skip
    solvent = [r for r in fixer.topology.residues()  # water, and ions (one-atom residues)
               if r.name in WATER or (r.name not in known and len(list(r.atoms())) == 1)
               ]  # fmt: skip
    for residue in fixer.topology.residues():
        if residue.name not in known and residue not in solvent:
            raise PeptideError(f"{path}: residue {residue.name}{residue.id} is not a standard "
                               "amino acid or an ACE/NME cap; p4bg builds peptides in "
                               "implicit solvent: remove it from the file")  # fmt: skip
    if solvent:
        modeller = app.Modeller(fixer.topology, fixer.positions)
        modeller.delete(solvent)
        fixer.topology, fixer.positions = modeller.topology, modeller.positions
        notes.append(f"{len(solvent)} solvent residues (water, ions) removed: solvent is implicit")
    _complete(fixer, ph, notes, seed)
    positions = _minimise(fixer.topology, fixer.positions, forcefield)
    notes.append("minimised in " + " + ".join(forcefield))
    wrong = _d_residues(fixer.topology, positions)
    if wrong:  # kept as given, but said: p4bg's chirality checks count these as violations
        notes.append(f"D residues in the structure: {', '.join(wrong)}")
    return PreparedMolecule(fixer.topology, positions, notes)


def write_system(molecule: PreparedMolecule, folder: str | Path, name: str,
                 forcefield: tuple[str, ...] = FORCEFIELD, temperature: float = 600.0,
                 source: str = "", constraints: str = "None") -> Path:  # fmt: skip
    """``folder/`` with ``NAME.pdb`` and a ``system.toml`` holding the force field, the MD
    defaults, the generated coordinate layout and the central residue's φ/ψ. Returns the
    system.toml's path. An existing folder is an error (nothing is overwritten).

    constraints: "None", or "HBonds": every bond to a hydrogen is constrained (OpenMM's rule),
    the layout keeps those bonds as Z-matrix bonds, and the MD step is 2 fs instead of 1 fs."""
    import mdtraj
    import openmm.app as app

    from p4bg.files import write_atomic
    from p4bg.zmatrix import build_layout, central_dihedrals, central_residue

    folder = Path(folder)
    if folder.exists():
        raise PeptideError(f"{folder} exists; choose another name or remove it")
    topology = mdtraj.Topology.from_openmm(molecule.topology)
    if constraints not in ("None", "HBonds"):
        raise PeptideError(f"constraints {constraints!r}: use None or HBonds")
    hydrogen = {a.index for a in topology.atoms if a.element.symbol == "H"}
    pairs = [(a.index, b.index) for a, b in topology.bonds if constraints == "HBonds"
             and (a.index in hydrogen or b.index in hydrogen)]  # fmt: skip
    layout = build_layout(topology, molecule.positions, pairs)
    centre = central_residue(topology)
    phi, psi = central_dihedrals(topology)
    folder.mkdir(parents=True)
    pdb = folder / f"{name}.pdb"
    with io.StringIO() as text:
        app.PDBFile.writeFile(molecule.topology, molecule.positions * 10.0, text, keepIds=True)
        write_atomic(pdb, text.getvalue())
    residues = "-".join(r.name for r in topology.residues)
    notes = "".join(f"# {note}\n" for note in molecule.notes)
    toml = (
        f"# {residues} in implicit solvent, made by `python -m p4bg.systems new` {source}\n"
        f"{notes}"
        "# Atom indices are 0-based, in the PDB's order. Edit freely; docs/design.md §5.\n"
        f'name = "{name}"\n'
        f'pdb = "{pdb.name}"\n\n'
        "[forcefield]\n"
        f"files = {json.dumps(list(forcefield))}\n"  # a JSON list of strings is TOML too
        'nonbonded_method = "NoCutoff"\n'
        f'constraints = "{constraints}"\n\n'
        "[simulation]\n"
        f"temperature = {float(temperature)}\n"
        'integrator = "LangevinMiddle"\n'
        f"timestep_fs = {2.0 if constraints == 'HBonds' else 1.0}\n"
        "friction_per_ps = 1.0\n\n"
        f"{layout.as_toml()}\n"
        "[dihedrals]\n"
        f"# the central residue's ({centre.name}{centre.resSeq}) backbone torsions\n"
        f"phi = [{', '.join(map(str, phi))}]\n"
        f"psi = [{', '.join(map(str, psi))}]\n"
    )
    return write_atomic(folder / "system.toml", toml)
