"""Equivalent hydrogens (docs/design.md §5): methyl labels are brought to the PDB's, energies unchanged."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import openmm
import pytest
import torch

from p4bg.data import DatasetError, load_dataset, read_chunk, write_chunk
from p4bg.equivalent import (
    EquivalentAtomsError,
    canonicalize_equivalent_atoms,
    canonicalize_equivalent_atoms_torch,
    equivalent_groups,
    labelling_orientation,
)
from p4bg.simulate import main as simulate_main
from p4bg.systems import load_system

HB = (11, 12, 13)  # ALA HB1 HB2 HB3 on CB (10)


@pytest.fixture(scope="module")
def system():
    return load_system("alanine_dipeptide")


@pytest.fixture(scope="module")
def groups(system):
    return equivalent_groups(system)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """2 replicas × 25 frames of 600 K MD written by p4bg.simulate (Reference platform)."""
    out = tmp_path_factory.mktemp("md") / "ala"
    simulate_main(["--ns", "0.01", "--replicas", "2", "--chunk-frames", "10", "--equilibration-ps",
                   "0.5", "--platform", "Reference", "--workers", "1", "--seed", "5",
                   "--no-progress", "--out", str(out)])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def md_frames(dataset):
    """The dataset's frames as written by OpenMM, (50, 22, 3) nm float64, not canonicalised."""
    return load_dataset(dataset, canonicalize=False).xyz.reshape(-1, 22, 3).astype(np.float64)


def energies(system, xyz: np.ndarray) -> np.ndarray:
    """OpenMM potential energies (kJ/mol) of frames (frames, 22, 3) nm."""
    context = openmm.Context(
        system.openmm_system,
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName("Reference"),
    )
    out = []
    for frame in xyz:
        context.setPositions(frame)
        out.append(context.getState(getEnergy=True).getPotentialEnergy()._value)
    return np.array(out)


def relabel(xyz: np.ndarray, old: tuple[int, ...], new: tuple[int, ...]) -> np.ndarray:
    """Frames in which the atoms ``old`` carry the positions of ``new`` (a relabelling)."""
    out = xyz.copy()
    out[:, list(old)] = xyz[:, list(new)]
    return out


def test_the_three_methyl_groups_of_alanine_dipeptide(system, groups):
    found = [(g.center, g.neighbor, g.hydrogens) for g in groups]
    assert found == [(1, 4, (0, 2, 3)), (10, 8, (11, 12, 13)), (18, 16, (19, 20, 21))]
    assert [g.reference_sign for g in groups] == [-1, -1, 1]  # of this PDB
    for g in groups:  # a well-formed methyl in the PDB: |orientation| ≈ 1
        s = labelling_orientation(system.positions[None], g)[0]
        assert np.sign(s) == g.reference_sign and abs(s) > 0.99


def test_orientation_flips_under_swaps_and_not_under_cyclic_relabelling(md_frames, groups):
    for g in groups:
        a, b, c = g.hydrogens
        s = labelling_orientation(md_frames, g)
        assert (np.sign(s) == g.reference_sign).all()  # p4bg's own MD is canonical
        for cyclic in ((b, c, a), (c, a, b)):
            np.testing.assert_allclose(
                labelling_orientation(relabel(md_frames, g.hydrogens, cyclic), g), s, atol=1e-12
            )
        for swap in ((b, a, c), (a, c, b), (c, b, a)):
            np.testing.assert_allclose(
                labelling_orientation(relabel(md_frames, g.hydrogens, swap), g), -s, atol=1e-12
            )


def test_own_md_data_needs_no_relabelling(dataset, md_frames, groups):
    canonical, n_swapped = canonicalize_equivalent_atoms(md_frames, groups)
    assert n_swapped == 0 and np.array_equal(canonical, md_frames)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "relabelled" warning either
        loaded = load_dataset(dataset).xyz
    np.testing.assert_array_equal(loaded, load_dataset(dataset, canonicalize=False).xyz)


@pytest.mark.parametrize("source", ["pdb", "md"])
def test_hb2_hb3_swap_is_undone_exactly_and_energy_is_unchanged(source, system, groups, md_frames):
    xyz = system.positions[None] if source == "pdb" else md_frames[::5]
    swapped = relabel(xyz, (12, 13), (13, 12))
    canonical, n_swapped = canonicalize_equivalent_atoms(swapped, groups)
    assert n_swapped == len(xyz)
    np.testing.assert_array_equal(canonical, xyz)
    e = energies(system, xyz)
    np.testing.assert_allclose(energies(system, swapped), e, rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(energies(system, canonical), e, rtol=1e-10, atol=1e-8)


def test_every_odd_relabelling_becomes_even_and_cyclic_ones_are_left_alone(md_frames, groups):
    for g in groups:
        a, b, c = g.hydrogens
        for cyclic in ((b, c, a), (c, a, b)):
            xyz = relabel(md_frames, g.hydrogens, cyclic)
            canonical, n_swapped = canonicalize_equivalent_atoms(xyz, groups)
            assert n_swapped == 0 and np.array_equal(canonical, xyz)
        for swap in ((b, a, c), (c, b, a)):
            canonical, n_swapped = canonicalize_equivalent_atoms(
                relabel(md_frames, g.hydrogens, swap), groups
            )
            # The last two exchanged: an even (cyclic) relabelling of the original frames.
            assert n_swapped == len(md_frames)
            even = relabel(md_frames, g.hydrogens, (swap[0], swap[2], swap[1]))
            np.testing.assert_array_equal(canonical, even)
            assert (np.sign(labelling_orientation(canonical, g)) == g.reference_sign).all()


def test_shapes_dtypes_and_frames_mixed(md_frames, groups):
    # Swap HB2/HB3 in even frames and NME H2/H3 in frames divisible by 3, in float32 (66,).
    xyz = md_frames.astype(np.float32)
    mixed = xyz.copy()
    mixed[::2] = relabel(xyz[::2], (12, 13), (13, 12))
    mixed[::3] = relabel(mixed[::3], (20, 21), (21, 20))
    flat = mixed.reshape(len(mixed), 66)
    canonical, n_swapped = canonicalize_equivalent_atoms(flat, groups)
    assert canonical.shape == (len(xyz), 66) and canonical.dtype == np.float32
    assert n_swapped == len(range(0, len(xyz), 2)) + len(range(3, len(xyz), 6))
    np.testing.assert_array_equal(canonical.reshape(xyz.shape), xyz)
    assert np.array_equal(flat, mixed.reshape(len(mixed), 66))  # the input is not modified
    empty, n_swapped = canonicalize_equivalent_atoms(np.zeros((0, 66)), groups)
    assert empty.shape == (0, 66) and n_swapped == 0


def test_degenerate_frame_is_refused_with_its_index(md_frames, groups):
    xyz = md_frames[:6].copy()
    cb = xyz[4, 10]
    axis = cb - xyz[4, 8]
    axis /= np.linalg.norm(axis)
    # Put HB1, HB2, HB3 on a plane containing the CA→CB axis: no sense of rotation is left.
    side = np.cross(axis, [0.0, 0.0, 1.0])
    side /= np.linalg.norm(side)
    xyz[4, 11], xyz[4, 12], xyz[4, 13] = cb + 0.1 * side, cb - 0.1 * side, cb + 0.1 * axis
    with pytest.raises(EquivalentAtomsError, match=r"frame 4 .*\(11, 12, 13\) on atom 10"):
        canonicalize_equivalent_atoms(xyz, groups)
    xyz[2, 0] = np.nan
    with pytest.raises(EquivalentAtomsError, match=r"frame 2 .*\(0, 2, 3\) on atom 1"):
        canonicalize_equivalent_atoms(xyz, groups)


def test_load_dataset_relabels_frames_written_with_swapped_hydrogens(dataset, tmp_path):
    reference = load_dataset(dataset)
    copy = tmp_path / "ala_swapped"
    shutil.copytree(dataset, copy)
    folder = copy / "replica_01"
    xyz, e, steps, checkpoint = read_chunk(folder, 1)  # global frames 35–44
    xyz = relabel(xyz, (12, 13), (13, 12))
    xyz[:3] = relabel(xyz[:3], (0, 2, 3), (2, 0, 3))  # ACE too, in three of them
    write_chunk(folder, 1, xyz, e, steps, checkpoint)

    raw = load_dataset(copy, canonicalize=False)
    assert not np.array_equal(raw.xyz, reference.xyz)
    with pytest.warns(UserWarning, match="10 of 50 frames"):
        loaded = load_dataset(copy)
    assert loaded.xyz.dtype == np.float32
    different = np.flatnonzero((loaded.xyz != reference.xyz).any(axis=1))
    assert different.tolist() == [35, 36, 37]  # ACE: an even relabelling of the original
    np.testing.assert_array_equal(loaded.energies, reference.energies)

    xyz[5, 11] = xyz[5, 12]  # HB1 on top of HB2: undefined labelling
    write_chunk(folder, 1, xyz, e, steps, checkpoint)
    with pytest.raises(DatasetError, match=r"ala_swapped: frame 40 .*atom 10"):
        load_dataset(copy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_version_agrees_with_numpy_and_passes_gradients(dtype, md_frames, groups):
    rng = np.random.default_rng(0)
    xyz = md_frames.copy()
    for g in groups:  # a random relabelling (any of the six) of every group in every frame
        for f in range(len(xyz)):
            xyz[f, list(g.hydrogens)] = xyz[f, list(rng.permutation(g.hydrogens))]
    expected, n_swapped = canonicalize_equivalent_atoms(xyz, groups)
    assert 0 < n_swapped < len(xyz)

    x = torch.tensor(xyz.reshape(len(xyz), 66), dtype=dtype, requires_grad=True)
    out = canonicalize_equivalent_atoms_torch(x, groups)
    assert out.shape == x.shape and out.dtype == dtype
    np.testing.assert_array_equal(
        out.detach().numpy(),
        expected.reshape(len(xyz), 66).astype(np.float32 if dtype == torch.float32 else np.float64),
    )
    # out is a per-frame permutation of atoms: the gradient of Σ w·out is w permuted back.
    w = torch.randn(out.shape, dtype=dtype)
    (out * w).sum().backward()
    moved = (out.detach() != x.detach()).reshape(len(xyz), 22, 3).any(-1)
    grad, w3 = x.grad.reshape(len(xyz), 22, 3), w.reshape(len(xyz), 22, 3)
    for g in groups:
        _, h2, h3 = g.hydrogens
        swapped = moved[:, h2]
        assert torch.equal(swapped, moved[:, h3])
        torch.testing.assert_close(grad[:, h2], torch.where(swapped[:, None], w3[:, h3], w3[:, h2]))
        torch.testing.assert_close(grad[:, h3], torch.where(swapped[:, None], w3[:, h2], w3[:, h3]))
    others = [i for i in range(22) if i not in {h for g in groups for h in g.hydrogens[1:]}]
    torch.testing.assert_close(grad[:, others], w3[:, others])
    # (batch, n_atoms, 3) works too.
    torch.testing.assert_close(
        canonicalize_equivalent_atoms_torch(x.detach().reshape(-1, 22, 3), groups),
        out.detach().reshape(-1, 22, 3),
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_version_on_cuda(md_frames, groups):
    xyz = relabel(md_frames, (12, 13), (13, 12)).reshape(len(md_frames), 66)
    out = canonicalize_equivalent_atoms_torch(torch.tensor(xyz, device="cuda"), groups)
    np.testing.assert_array_equal(out.cpu().numpy(), md_frames.reshape(len(md_frames), 66))


def test_torch_version_leaves_degenerate_frames_alone(md_frames, groups):
    x = torch.tensor(md_frames[:2].reshape(2, 66))
    x[0, 3 * 11 : 3 * 14] = x[0, 3 * 10 : 3 * 11].repeat(3)  # all of HB on CB
    x[1, 0] = torch.nan
    out = canonicalize_equivalent_atoms_torch(x, groups)
    assert torch.equal(out.isnan(), x.isnan())
    torch.testing.assert_close(out, x, equal_nan=True)


@pytest.fixture(scope="module")
def gly_lys(tmp_path_factory):
    """ACE-GLY-LYS-NME (made by p4bg.systems new) and 40 frames of its 600 K MD, nm."""
    from md_helpers import run_md

    from p4bg.systems.peptide import from_sequence, write_system

    folder = tmp_path_factory.mktemp("systems") / "gk"
    write_system(from_sequence("GK"), folder, "gk")
    molecule = load_system(folder)
    frames = run_md(tmp_path_factory, frames=40, seed=2, system_path=folder)
    return molecule, frames.reshape(40, -1, 3)


def test_ch2_pairs_of_any_peptide_are_found_and_swaps_undone(gly_lys):
    """Glycine's HA2/HA3 and lysine's four CH2 are pairs; lysine's NH3+ and the caps' methyls
    are rotors; a frame with a pair written the other way round comes back exactly, with the
    same energy, and the coordinate transform sees the same molecule."""
    from p4bg.coordinates import MixedCoordinateTransform

    molecule, xyz = gly_lys
    groups = equivalent_groups(molecule)
    names = {tuple(molecule.topology.atom(h).name for h in g.hydrogens) for g in groups}
    assert {("HA2", "HA3"), ("HB2", "HB3"), ("HG2", "HG3"), ("HD2", "HD3"),
            ("HE2", "HE3")} <= names  # fmt: skip
    assert ("HZ1", "HZ2", "HZ3") in names
    pairs = [g for g in groups if len(g.hydrogens) == 2]
    assert len(pairs) == 5 and all(g.second >= 0 for g in pairs)
    # p4bg's own MD keeps the PDB's sense for every pair
    for g in pairs:
        assert (np.sign(labelling_orientation(xyz, g)) == g.reference_sign).all()
    swapped = xyz.copy()
    for g in pairs:
        h1, h2 = g.hydrogens
        swapped[:, [h1, h2]] = swapped[:, [h2, h1]]
    back, n = canonicalize_equivalent_atoms(swapped, groups)
    assert n == len(xyz)
    np.testing.assert_array_equal(back, xyz)
    context = openmm.Context(molecule.openmm_system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))  # fmt: skip
    energies = []
    for frame in (xyz[0], swapped[0]):
        context.setPositions(frame)
        energies.append(context.getState(getEnergy=True).getPotentialEnergy()._value)
    assert energies[0] == pytest.approx(energies[1], rel=1e-9)
    transform = MixedCoordinateTransform(molecule, xyz[:30].reshape(30, -1))
    z, _ = transform.inverse(torch.from_numpy(xyz[30:].reshape(10, -1)))
    z_swapped, _ = transform.inverse(torch.from_numpy(swapped[30:].reshape(10, -1)))
    torch.testing.assert_close(z_swapped, z, atol=1e-10, rtol=0)
