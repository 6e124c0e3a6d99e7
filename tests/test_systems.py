"""The alanine dipeptide system against direct OpenMM and mdtraj evaluations."""

from __future__ import annotations

import shutil
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import pytest

from analysis.geometry import dihedral, is_l_chirality
from p4bg.systems import (
    SYSTEMS_DIR,
    SystemConfigError,
    load_system,
    measure_platforms,
)

FOLDER = SYSTEMS_DIR / "alanine_dipeptide"
CONTRACT_ORDER = [
    "HH31",
    "CH3",
    "HH32",
    "HH33",
    "C",
    "O",
    "N",
    "H",
    "CA",
    "HA",
    "CB",
    "HB1",
    "HB2",
    "HB3",
    "C",
    "O",
    "N",
    "H",
    "C",
    "H1",
    "H2",
    "H3",
]  # docs/design.md §4


@pytest.fixture(scope="module")
def system():
    return load_system("alanine_dipeptide")


def direct_energy(positions_nm: np.ndarray) -> float:
    """Energy in kJ/mol from a system built here, straight from OpenMM's force-field files."""
    pdb = app.PDBFile(str(FOLDER / "alanine_dipeptide.pdb"))
    ff = app.ForceField("amber99sbildn.xml", "amber99_obc.xml")
    sys_ = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    context = openmm.Context(
        sys_, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    context.setPositions(positions_nm)
    return (
        context.getState(getEnergy=True)
        .getPotentialEnergy()
        .value_in_unit(openmm.unit.kilojoule_per_mole)
    )


def test_system_fields(system):
    assert system.name == "alanine_dipeptide" and system.n_atoms == 22 and system.dim == 66
    assert system.temperature == 600.0
    R = openmm.unit.MOLAR_GAS_CONSTANT_R.value_in_unit(
        openmm.unit.kilojoule_per_mole / openmm.unit.kelvin
    )
    assert system.kT == pytest.approx(R * 600.0, rel=1e-9)
    assert system.positions.shape == (22, 3)
    assert system.z_matrix.shape == (17, 4)
    assert sorted(system.rigid_atoms.tolist()) == [6, 8, 9, 10, 14]
    assert system.phi_atoms == (4, 6, 8, 14) and system.psi_atoms == (6, 8, 14, 16)
    assert system.openmm_system.getNumConstraints() == 0
    forces = {type(f).__name__ for f in system.openmm_system.getForces()}
    assert "GBSAOBCForce" in forces
    assert load_system("alanine_dipeptide", temperature=300.0).kT == pytest.approx(
        R * 300.0, rel=1e-9
    )


def test_atom_order_is_the_contract():
    names = [line[12:16].strip() for line in (FOLDER / "alanine_dipeptide.pdb").read_text().splitlines()
             if line.startswith(("ATOM", "HETATM"))]  # fmt: skip
    assert names == CONTRACT_ORDER
    residues = [a.residue.name for a in load_system("alanine_dipeptide").topology.atoms]
    assert residues == ["ACE"] * 6 + ["ALA"] * 10 + ["NME"] * 6


def test_energy_matches_direct_openmm(system):
    context = openmm.Context(
        system.openmm_system,
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName("Reference"),
    )
    rng = np.random.default_rng(0)
    for positions in (system.positions, system.positions + 0.01 * rng.standard_normal((22, 3))):
        context.setPositions(positions)
        ours = context.getState(getEnergy=True).getPotentialEnergy()._value
        assert ours == pytest.approx(direct_energy(positions), rel=1e-10, abs=1e-8)
    assert direct_energy(system.positions) < -100.0  # a minimised structure, not a clash


def test_dihedral_indices_and_values_agree_with_mdtraj(system):
    traj = mdtraj.Trajectory(system.positions[None], system.topology)
    phi_idx, _ = mdtraj.compute_phi(traj)
    psi_idx, _ = mdtraj.compute_psi(traj)
    assert tuple(phi_idx[0]) == system.phi_atoms and tuple(psi_idx[0]) == system.psi_atoms
    rng = np.random.default_rng(1)
    xyz = system.positions[None] + 0.05 * rng.standard_normal((50, 22, 3))
    traj = mdtraj.Trajectory(xyz, system.topology)
    np.testing.assert_allclose(
        dihedral(xyz, system.phi_atoms), mdtraj.compute_phi(traj)[1][:, 0], atol=1e-5
    )
    np.testing.assert_allclose(
        dihedral(xyz, system.psi_atoms), mdtraj.compute_psi(traj)[1][:, 0], atol=1e-5
    )


def test_chirality_is_l(system):
    assert is_l_chirality(system.positions[None])[0]
    mirrored = system.positions * np.array([-1.0, 1.0, 1.0])
    assert not is_l_chirality(mirrored[None])[0]


def test_platform_measurement(system):
    rates = measure_platforms(system, ["Reference"], steps=200)
    assert set(rates) == {"Reference"} and rates["Reference"] > 0


# ------------------------------------------------------------------------------- bad input
def broken_copy(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(FOLDER, folder)
    toml = folder / "system.toml"
    toml.write_text(edit(toml.read_text()))
    return folder


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda t: t.replace("temperature = 600.0", 'temperature = "hot"'), "simulation.temperature"),
        (lambda t: t.replace("temperature = 600.0", "temperature = -1.0"), "simulation.temperature"),
        (lambda t: t.replace("timestep_fs = 1.0\n", ""), "simulation.timestep_fs"),
        (lambda t: t.replace("friction_per_ps", "fricton_per_ps"), "simulation.fricton_per_ps"),
        (lambda t: t.replace('constraints = "None"', 'constraints = "Some"'), "forcefield.constraints"),
        (lambda t: t.replace("phi = [4, 6, 8, 14]", "phi = [4, 6, 8]"), "dihedrals.phi"),
        (lambda t: t.replace("[13, 10, 8, 11]", "[13, 10, 8, 99]"), "coordinates.z_matrix[16]"),
        (lambda t: t.replace("[4, 6, 8, 14],\n  [5, 4, 6, 8]", "[5, 4, 6, 8],\n  [4, 6, 8, 14]"),
         "coordinates.z_matrix[0]"),
        (lambda t: t.replace("[13, 10, 8, 11],\n", ""), "coordinates"),
        (lambda t: t.replace('pdb = "alanine_dipeptide.pdb"', 'pdb = "missing.pdb"'), "pdb"),
    ],
)  # fmt: skip
def test_malformed_system_toml_names_file_and_key(tmp_path, edit, key):
    folder = broken_copy(tmp_path, edit)
    with pytest.raises(SystemConfigError) as err:
        load_system(folder)
    assert str(folder / "system.toml") in str(err.value)
    assert f"'{key}'" in str(err.value)


def test_unknown_system_and_missing_toml(tmp_path):
    with pytest.raises(
        SystemConfigError, match=r"unknown system 'no_such_molecule'.*alanine_dipeptide"
    ):
        load_system("no_such_molecule")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemConfigError, match=r"no system\.toml"):
        load_system(tmp_path / "empty")
    folder = broken_copy(tmp_path, lambda t: t + "\n[[[")
    with pytest.raises(SystemConfigError, match="not valid TOML"):
        load_system(folder)


def test_build_script_reproduces_the_committed_pdb(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_ala", FOLDER / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    out = build.build(tmp_path / "rebuilt.pdb")
    rebuilt = app.PDBFile(str(out))
    assert [a.name for a in rebuilt.topology.atoms()] == [
        a.name for a in app.PDBFile(str(FOLDER / "alanine_dipeptide.pdb")).topology.atoms()
    ]
    positions = np.array(rebuilt.getPositions(asNumpy=True)._value)
    assert is_l_chirality(positions[None])[0]
    assert direct_energy(positions) == pytest.approx(
        direct_energy(load_system("alanine_dipeptide").positions), abs=1.0
    )
