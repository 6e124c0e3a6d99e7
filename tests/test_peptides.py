"""New systems from a sequence or a PDB (p4bg.systems.peptide and ``python -m p4bg.systems``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mdtraj
import numpy as np
import pytest

from analysis.geometry import is_l_chirality
from p4bg.systems import SYSTEMS_DIR, load_system
from p4bg.systems.peptide import (
    PHI,
    PSI,
    PeptideError,
    backbone_pdb,
    from_pdb,
    from_sequence,
    write_system,
)
from p4bg.zmatrix import backbone_dihedrals, chirality_centres

ROOT = Path(__file__).resolve().parents[1]
ALA_PDB = SYSTEMS_DIR / "alanine_dipeptide" / "alanine_dipeptide.pdb"


def _systems(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p4bg.systems", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_backbone_geometry_is_the_standard_one(tmp_path):
    path = tmp_path / "backbone.pdb"
    path.write_text(backbone_pdb(["ALA", "GLY", "ALA"]))
    traj = mdtraj.load(str(path))
    names = [f"{a.residue.name}-{a.name}" for a in traj.topology.atoms]
    assert names[:3] == ["ACE-CH3", "ACE-C", "ACE-O"] and names[-2:] == ["NME-N", "NME-C"]
    phi = np.degrees(mdtraj.compute_phi(traj)[1][0])
    psi = np.degrees(mdtraj.compute_psi(traj)[1][0])
    np.testing.assert_allclose(phi, PHI, atol=0.05)  # PDB coordinates: 0.001 Å
    np.testing.assert_allclose(psi, PSI, atol=0.05)
    omega = np.degrees(mdtraj.compute_omega(traj)[1][0])
    np.testing.assert_allclose(np.abs(omega), 180.0, atol=0.05)
    n_ca = mdtraj.compute_distances(traj, [[3, 4]])[0, 0]  # ALA2 N–CA, nm
    assert abs(n_ca - 0.1458) < 1e-4


@pytest.fixture(scope="module")
def tripeptide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("systems") / "akd"
    write_system(from_sequence("AKD"), folder, "akd", source="--sequence AKD")
    return load_system(folder)


def test_a_sequence_becomes_a_loadable_capped_l_peptide(tripeptide):
    s = tripeptide
    assert [r.name for r in s.topology.residues] == ["ACE", "ALA", "LYS", "ASP", "NME"]
    assert s.n_atoms == 6 + 10 + 22 + 12 + 6  # ACE, ALA, LYS+ (NH3+), ASP− (pH 7), NME
    traj = mdtraj.Trajectory(s.positions[None], s.topology)
    for res in s.topology.residues:
        if res.name in ("ACE", "NME"):
            continue
        idx = {a.name: a.index for a in res.atoms}
        assert is_l_chirality(s.positions[None], idx["N"], idx["CA"], idx["C"], idx["CB"])[0]
    # minimised near the built polyproline II conformation, on the central residue's φ/ψ
    phi = np.degrees(mdtraj.compute_phi(traj)[1][0])
    assert np.all(np.abs(phi - PHI) < 40)
    labels = [label for label, _, _ in backbone_dihedrals(s.topology)]
    assert labels == ["ALA2", "LYS3", "ASP4"]
    assert (s.phi_atoms, s.psi_atoms) == backbone_dihedrals(s.topology)[1][1:]
    text = (s.path / "system.toml").read_text()
    assert "--sequence AKD" in text and "PDBFixer added" in text and "[coordinates]" in text


def test_a_pdb_without_hydrogens_gets_them_and_loses_its_water(tmp_path):
    lines = [line for line in ALA_PDB.read_text().splitlines()
             if line.startswith(("ATOM", "HETATM")) and line[76:78].strip() != "H"]  # fmt: skip
    lines.append("HETATM 9999  O   HOH W   9       9.000   9.000   9.000  1.00  0.00"
                 "           O")  # fmt: skip
    path = tmp_path / "ala_heavy.pdb"
    path.write_text("\n".join([*lines, "END"]) + "\n")
    molecule = from_pdb(path)
    assert molecule.topology.getNumAtoms() == 22
    assert any("12 hydrogens" in note for note in molecule.notes)
    assert any("solvent residues" in note for note in molecule.notes)
    original = mdtraj.load(str(ALA_PDB)).topology
    names = sorted(f"{a.residue.name}{a.element.symbol}" for a in original.atoms)
    assert sorted(f"{a.residue.name}{a.element.symbol}"
                  for a in mdtraj.Topology.from_openmm(molecule.topology).atoms) == names  # fmt: skip


def test_bad_inputs_name_what_is_wrong(tmp_path):
    with pytest.raises(PeptideError, match="sequence position 2: 'B'"):
        from_sequence("AB")
    with pytest.raises(PeptideError, match="empty"):
        from_sequence("  ")
    with pytest.raises(PeptideError, match="no such file"):
        from_pdb(tmp_path / "missing.pdb")
    ligand = tmp_path / "ligand.pdb"
    text = ALA_PDB.read_text().replace("NME A   3", "LIG A   3")
    ligand.write_text(text)
    with pytest.raises(PeptideError, match="residue LIG3 is not a standard amino acid"):
        from_pdb(ligand)


def test_the_command_makes_lists_and_refuses(tmp_path):
    result = _systems("new", "ala2", "--sequence", "AA", "--out", "mine", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote mine/ala2: 32 atoms, ACE-ALA-ALA-NME" in result.stdout
    assert load_system(tmp_path / "mine" / "ala2").n_atoms == 32
    again = _systems("new", "ala2", "--sequence", "AA", "--out", "mine", cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr
    both = _systems("new", "x", "--sequence", "AA", "--pdb", str(ALA_PDB), cwd=tmp_path)
    assert both.returncode == 2 and "exactly one of --sequence and --pdb" in both.stderr
    # a system made in ./systems is found by name from that folder
    made = _systems("new", "gly", "--sequence", "G", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    listed = _systems("list", cwd=tmp_path)
    assert "gly" in listed.stdout and "alanine_dipeptide" in listed.stdout


def test_chirality_of_every_residue(tripeptide):
    """is_l holds for the built peptide, fails for its mirror image and for one residue's CB and
    HA exchanged (a single D residue); glycine-free alanine dipeptide keeps its old answer."""
    xyz = tripeptide.positions[None]
    assert tripeptide.is_l(xyz).tolist() == [True]
    assert tripeptide.is_l(xyz * np.array([-1.0, 1.0, 1.0])).tolist() == [False]
    lys = next(r for r in tripeptide.topology.residues if r.name == "LYS")
    idx = {a.name: a.index for a in lys.atoms}
    d_lys = xyz.copy()
    d_lys[0, [idx["CB"], idx["HA"]]] = d_lys[0, [idx["HA"], idx["CB"]]]
    assert tripeptide.is_l(d_lys).tolist() == [False]
    ala = load_system("alanine_dipeptide")
    frames = np.stack([ala.positions, ala.positions * np.array([1.0, -1.0, 1.0])])
    assert ala.is_l(frames).tolist() == is_l_chirality(frames).tolist() == [True, False]


def test_the_whole_pipeline_runs_on_a_new_tetrapeptide(tmp_path):
    """ACE-(ALA)3-NME with HBonds constraints (the tetrapeptide benchmark's setup) from its
    sequence through MD, training, sampling and analysis, each as the README runs it (tiny
    sizes: the numbers mean nothing, the plumbing is what is tested); the samples carry the
    constraint lengths."""
    steps = [
        ["p4bg.systems", "new", "ala4", "--sequence", "AAA", "--constraints", "HBonds"],
        ["p4bg.simulate", "--system", "ala4", "--ns", "0.01", "--save-every-ps", "0.1",
         "--replicas", "1", "--workers", "1", "--equilibration-ps", "1", "--out", "data/ala4",
         "--no-progress"],
        ["p4bg.train", "--preset", "smoke", "--system", "ala4", "--data", "data/ala4", "--out",
         "runs/ala4", "--no-progress"],
        ["p4bg.sample", "runs/ala4", "--n-samples", "300", "--no-progress"],
        ["p4bg.analyze", "runs/ala4", "--reference", "data/ala4", "--tica-lag-ps", "0.1"],
    ]  # fmt: skip
    for argv in steps:
        result = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, capture_output=True,
                                text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, f"{argv[0]}: {result.stderr[-2000:]}"
    samples = np.load(tmp_path / "runs" / "ala4" / "samples.npz")
    assert samples["u"].shape == (300,) and samples["is_l"].dtype == bool
    traj = mdtraj.load(str(tmp_path / "runs" / "ala4" / "samples.dcd"),
                       top=str(tmp_path / "runs" / "ala4" / "samples.pdb"))  # fmt: skip
    assert traj.n_atoms == 42 and traj.n_frames == 300
    system = load_system(tmp_path / "systems" / "ala4")
    pairs = np.array(sorted(system.constrained_bonds))
    lengths = np.array([system.constrained_bonds[tuple(p)] for p in pairs])
    bonds = np.linalg.norm(traj.xyz[:, pairs[:, 1]] - traj.xyz[:, pairs[:, 0]], axis=-1)
    finite = np.isfinite(bonds).all(1)
    assert len(pairs) == 22 and np.abs(bonds[finite] / lengths - 1).max() < 1e-5  # float32 DCD
    report = (tmp_path / "runs" / "ala4" / "report" / "report.md").read_text()
    assert "| ΔF, reweighted |" in report
    assert "## Per residue" in report and "| ALA4 |" in report and "## Joint view: TICA" in report
    metrics = json.loads((tmp_path / "runs" / "ala4" / "report" / "metrics.json").read_text())
    assert list(metrics["residues"]) == ["ALA2", "ALA3", "ALA4"]
    assert metrics["tica"]["lag_frames"] == 1 and len(metrics["tica"]["eigenvalues"]) == 2
    for figure in ("residues.png", "tica.png"):
        assert (tmp_path / "runs" / "ala4" / "report" / figure).stat().st_size > 10_000


def test_all_twenty_amino_acids_are_built_l_and_load():
    """Every standard residue: side chains placed by PDBFixer on the built CB come out L (ILE,
    MET, PRO, THR and VAL came out D when PDBFixer fitted them to N, CA, C and O alone)."""
    molecule = from_sequence("ACDEFGHIKLMNPQRSTVWY")
    top = mdtraj.Topology.from_openmm(molecule.topology)
    assert [r.name for r in top.residues][1:-1] == [
        "ALA", "CYS", "ASP", "GLU", "PHE", "GLY", "HIS", "ILE", "LYS", "LEU", "MET", "ASN",
        "PRO", "GLN", "ARG", "SER", "THR", "VAL", "TRP", "TYR"]  # fmt: skip
    for n, ca, c, cb in chirality_centres(top):
        assert is_l_chirality(molecule.positions[None], n, ca, c, cb)[0], top.atom(ca).residue
    assert len(chirality_centres(top)) == 19  # all but glycine
