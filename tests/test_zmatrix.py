"""The coordinate layout built from a topology (p4bg.zmatrix): its rule, and its transform on MD."""

from __future__ import annotations

import dataclasses

import mdtraj
import numpy as np
import pytest
import torch
from md_helpers import capped_dipeptide_frames, rigid_motion_residuals, run_md

from p4bg.coordinates import MixedCoordinateTransform
from p4bg.geometry import placement_stages
from p4bg.systems import load_system
from p4bg.zmatrix import Layout, LayoutError, backbone_dihedrals, build_layout, central_residue


@pytest.fixture(scope="module")
def system():
    return load_system("alanine_dipeptide")


@pytest.fixture(scope="module")
def layout(system):
    return build_layout(system.topology, system.positions)


@pytest.fixture(scope="module")
def generated(system, layout):
    """Alanine dipeptide with the generated layout instead of its hand-written one."""
    return dataclasses.replace(system, rigid_atoms=layout.rigid_atoms, z_matrix=layout.z_matrix)


@pytest.fixture(scope="module")
def md(tmp_path_factory):
    return run_md(tmp_path_factory, frames=200, seed=5)


def test_alanine_dipeptide_rule_gives_the_hand_written_block_and_backbone_rows(system, layout):
    assert central_residue(system.topology).name == "ALA"
    np.testing.assert_array_equal(layout.rigid_atoms, system.rigid_atoms)
    rows = {tuple(r) for r in layout.z_matrix.tolist()}
    assert (4, 6, 8, 14) in rows and (16, 14, 8, 6) in rows  # φ and ψ are latent torsions
    hand = {tuple(r) for r in system.z_matrix.tolist()}
    # docs: the rule differs from the hand-written file in four torsion partners only
    assert {r[0] for r in rows - hand} == {0, 5, 7, 17}
    assert len(rows) == len(hand) == 17
    # every atom placed once, references placed before, all in batched stages
    assert sorted([*layout.rigid_atoms, *layout.z_matrix[:, 0]]) == list(range(22))
    placement_stages(layout.z_matrix, layout.rigid_atoms)
    # rows are bonded: atom–partner is a bond of the topology
    bonds = {frozenset((a.index, b.index)) for a, b in system.topology.bonds}
    assert all(frozenset((a, b)) in bonds for a, b, _, _ in layout.z_matrix.tolist())


def test_backbone_dihedrals_match_the_system_and_mdtraj(system):
    ((label, phi, psi),) = backbone_dihedrals(system.topology)
    assert label == "ALA2" and phi == system.phi_atoms and psi == system.psi_atoms
    traj = mdtraj.Trajectory(system.positions[None], system.topology)
    assert tuple(mdtraj.compute_phi(traj)[0][0]) == phi
    assert tuple(mdtraj.compute_psi(traj)[0][0]) == psi


def test_generated_layout_round_trips_md_frames_float64(generated, md):
    transform = MixedCoordinateTransform(generated, md[:150])
    x = torch.from_numpy(md[150:])
    z, ladj_inv = transform.inverse(x)
    x_back, ladj_fwd = transform(z)
    # the frames come back up to rigid motion: compare all interatomic distances
    d = torch.cdist(x.reshape(-1, 22, 3), x.reshape(-1, 22, 3))
    d_back = torch.cdist(x_back.reshape(-1, 22, 3), x_back.reshape(-1, 22, 3))
    assert float((d - d_back).abs().max()) < 1e-5  # nm
    torch.testing.assert_close(ladj_fwd + ladj_inv, torch.zeros(50, dtype=torch.float64),
                               atol=1e-9, rtol=0)  # fmt: skip
    # batched = single sample
    z1, l1 = transform.inverse(x[3:4])
    torch.testing.assert_close(z1[0], z[3], atol=1e-10, rtol=0)
    torch.testing.assert_close(l1[0], ladj_inv[3], atol=1e-10, rtol=0)


def test_generated_layout_ladj_is_the_full_jacobian(generated, md):
    """(z [60], rotation vector ω, translation t) -> R(ω) forward(z) + t is square, 66 -> 66; its
    log|det| (autograd, float64) is ladj(z) + log J(0) + log g(ω) for the generated layout too
    (the same identity as tests/test_coordinates.py checks for the hand-written one)."""
    t = MixedCoordinateTransform(generated, md[:150])
    z, _ = t.inverse(torch.from_numpy(md[150:153]))
    residuals = rigid_motion_residuals(t, z, seed=4)
    torch.testing.assert_close(residuals, torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)


def test_collinear_references_are_skipped(system):
    x = system.positions.copy()
    # put C (14) on the line N (6) -> CA (8): φ's partner 14 is collinear with 6-8, so the
    # C of ACE (4) takes the next torsion partner around CA, CB (10)
    x[14] = x[8] + (x[8] - x[6]) / np.linalg.norm(x[8] - x[6]) * 0.152
    layout = build_layout(system.topology, x)
    row = next(r for r in layout.z_matrix.tolist() if r[0] == 4)
    assert row == [4, 6, 8, 10]


def test_unplaceable_and_malformed_topologies_are_refused(system):
    x = system.positions.copy()
    x[4] = x[6] + (x[6] - x[8]) / np.linalg.norm(x[6] - x[8]) * 0.133  # C–N–CA straight
    with pytest.raises(LayoutError, match=r"atom 4 \(ACE1-C\)"):
        build_layout(system.topology, x)
    bare = mdtraj.Topology()
    chain = bare.add_chain()
    for name in ("ACE", "NME"):
        bare.add_atom("C", mdtraj.element.carbon, bare.add_residue(name, chain))
    with pytest.raises(LayoutError, match="no amino-acid residue"):
        central_residue(bare)
    loose = mdtraj.Topology()  # the same atoms, no bonds
    chain = loose.add_chain()
    for res in system.topology.residues:
        r = loose.add_residue(res.name, chain, res.resSeq)
        for atom in res.atoms:
            loose.add_atom(atom.name, atom.element, r)
    with pytest.raises(LayoutError, match="no bonds"):
        build_layout(loose, system.positions)


def test_layout_as_toml_is_what_load_system_reads(system, layout, tmp_path):
    import shutil
    import tomllib

    text = layout.as_toml()
    data = tomllib.loads(text)["coordinates"]
    assert data["rigid_atoms"] == layout.rigid_atoms.tolist()
    assert data["z_matrix"] == layout.z_matrix.tolist()
    folder = tmp_path / "ala_generated"
    shutil.copytree(system.path, folder)
    toml = (folder / "system.toml").read_text()
    start, end = toml.index("[coordinates]"), toml.index("[dihedrals]")
    (folder / "system.toml").write_text(toml[:start] + text + "\n" + toml[end:])
    loaded = load_system(folder)
    np.testing.assert_array_equal(loaded.z_matrix, layout.z_matrix)
    assert isinstance(layout, Layout)


def test_a_system_without_coordinates_gets_the_generated_layout(system, layout, tmp_path):
    """[coordinates] and [dihedrals] are optional: load_system builds them from the PDB."""
    import shutil

    folder = tmp_path / "ala_auto"
    shutil.copytree(system.path, folder)
    toml = (folder / "system.toml").read_text()
    (folder / "system.toml").write_text(toml[: toml.index("[coordinates]")])
    loaded = load_system(folder)
    np.testing.assert_array_equal(loaded.z_matrix, layout.z_matrix)
    np.testing.assert_array_equal(loaded.rigid_atoms, layout.rigid_atoms)
    assert loaded.phi_atoms == system.phi_atoms and loaded.psi_atoms == system.psi_atoms


@pytest.mark.parametrize("residue", ["GLY", "PRO", "PHE", "LYS", "ASP"])
def test_generated_layout_round_trips_capped_dipeptides(system, residue):
    """Glycine (no CB), proline (a ring through the backbone), an aromatic ring and both
    charges: the generated layout places every atom, and MD frames come back to 1e-5 nm."""
    topology, frames, openmm_system = capped_dipeptide_frames(residue, frames=60, seed=3)
    layout = build_layout(topology, frames[0])
    n = topology.n_atoms
    names = {topology.atom(int(i)).name for i in layout.rigid_atoms}
    assert names == ({"N", "CA", "C", "HA2", "HA3"} if residue == "GLY"
                     else {"N", "CA", "C", "HA", "CB"})  # fmt: skip
    assert sorted([*layout.rigid_atoms, *layout.z_matrix[:, 0]]) == list(range(n))
    ((_, phi, psi),) = backbone_dihedrals(topology)
    rows = {tuple(r) for r in layout.z_matrix.tolist()}
    assert phi in rows and psi[::-1] in rows
    molecule = dataclasses.replace(
        system, name=f"ace-{residue.lower()}-nme", topology=topology, positions=frames[0],
        openmm_system=openmm_system,
        z_matrix=layout.z_matrix, rigid_atoms=layout.rigid_atoms, phi_atoms=phi, psi_atoms=psi,
    )  # fmt: skip
    transform = MixedCoordinateTransform(molecule, frames[:50].reshape(50, -1))
    x = torch.from_numpy(frames[50:].reshape(10, -1))
    z, ladj_inv = transform.inverse(x)
    assert z.shape == (10, 3 * n - 6)
    x_back, ladj_fwd = transform(z)
    xyz, xyz_back = x.reshape(-1, n, 3), x_back.reshape(-1, n, 3)
    err = (torch.cdist(xyz, xyz) - torch.cdist(xyz_back, xyz_back)).abs().max()
    assert float(err) < 1e-5
    torch.testing.assert_close(ladj_fwd + ladj_inv, torch.zeros(10, dtype=torch.float64),
                               atol=1e-9, rtol=0)  # fmt: skip
    # ladj is the full Jacobian (rigid motion included), as for the hand-written layout
    residuals = rigid_motion_residuals(transform, z[:2], seed=1)
    torch.testing.assert_close(residuals, torch.zeros(2, dtype=torch.float64), atol=1e-8, rtol=0)
