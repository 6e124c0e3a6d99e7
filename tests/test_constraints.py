"""HBonds constraints in the coordinate transform (p4bg.constraints): constrained bonds held at
their length and out of the latent space, and ``ladj`` the volume of the constraint manifold in
mass-weighted coordinates, checked against ½ log det(Jᵀ M J) of the autograd Jacobian.

The molecule is ACE-(ALA)3-NME with HBonds (the tetrapeptide benchmark's force field), made by
``python -m p4bg.systems new`` and simulated with constrained MD.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from md_helpers import frame_log_volume, rotation, run_md
from torch.autograd.functional import jacobian

from p4bg.constraints import ConstraintVolume
from p4bg.coordinates import MixedCoordinateTransform
from p4bg.geometry import kabsch_align
from p4bg.systems import load_system
from p4bg.systems.__main__ import main as systems_main


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    out = tmp_path_factory.mktemp("systems")
    systems_main(["new", "tetra_hbonds", "--sequence", "AAA", "--constraints", "HBonds",
                  "--out", str(out)])  # fmt: skip
    return load_system(out / "tetra_hbonds")


@pytest.fixture(scope="module")
def md(system, tmp_path_factory):
    return run_md(tmp_path_factory, frames=160, seed=3, steps_per_frame=50,
                  system_path=system.path)  # fmt: skip


@pytest.fixture(scope="module")
def transform(system, md):
    return MixedCoordinateTransform(system, md[:150])


def distances(xyz: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
    x = xyz.reshape(len(xyz), -1, 3)
    i, j = np.array(pairs).T
    return np.linalg.norm(x[:, j] - x[:, i], axis=-1)


def test_system_and_layout_keep_every_constraint_a_zmatrix_bond(system, transform):
    assert system.constraints == "HBonds" and system.timestep_fs == 2.0
    pairs = system.constrained_bonds
    assert len(pairs) == 22  # every hydrogen of ACE-(ALA)3-NME
    names = [a.name for a in system.topology.atoms]
    assert [names[i] for i in system.rigid_atoms] == ["N", "CA", "C", "CB"]  # HA left out
    rows = {frozenset(map(int, r[:2])) for r in system.z_matrix}
    assert all(frozenset(p) in rows for p in pairs)
    assert transform.n_fixed == 22
    assert transform.dim == 3 * 42 - 6 - 22  # 98: the manifold modulo rigid motion


def test_md_frames_carry_the_constraint_lengths(system, md):
    pairs = sorted(system.constrained_bonds)
    lengths = np.array([system.constrained_bonds[p] for p in pairs])
    assert np.abs(distances(md, pairs) / lengths - 1).max() < 1e-4  # OpenMM's tolerance


def test_round_trip_on_md_frames_and_constraints_exact(system, transform, md):
    x = torch.from_numpy(md[150:])
    z, ladj_i = transform.inverse(x)
    assert z.shape == (10, 98)
    back, ladj_f = transform(z)
    target = x.reshape(10, -1, 3)
    centred = target - target.mean(1, keepdim=True)
    aligned = torch.cat([kabsch_align(back.reshape(10, -1, 3)[k : k + 1], centred[k])
                         for k in range(10)])  # fmt: skip
    assert (aligned - centred).abs().max() < 1e-5  # nm: MD's constraint tolerance
    pairs = sorted(system.constrained_bonds)
    lengths = np.array([system.constrained_bonds[p] for p in pairs])
    np.testing.assert_allclose(distances(back.numpy(), pairs), np.broadcast_to(lengths, (10, 22)),
                               rtol=1e-12)  # fmt: skip
    z2, ladj_i2 = transform.inverse(back)
    torch.testing.assert_close(z2, z, atol=1e-9, rtol=0)
    torch.testing.assert_close(ladj_f + ladj_i2, torch.zeros(10, dtype=torch.float64),
                               atol=1e-9, rtol=0)  # fmt: skip
    # on MD frames (constraints to 1e-5) forward and inverse ladj still agree closely
    assert (ladj_f + ladj_i).abs().max() < 1e-3


def test_random_latents_are_molecules_on_the_manifold(system, transform):
    z = torch.randn(
        64, transform.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    x, ladj = transform(z)
    assert torch.isfinite(x).all() and torch.isfinite(ladj).all()
    pairs = sorted(system.constrained_bonds)
    lengths = np.array([system.constrained_bonds[p] for p in pairs])
    np.testing.assert_allclose(distances(x.numpy(), pairs), np.broadcast_to(lengths, (64, 22)),
                               rtol=1e-12)  # fmt: skip
    for i in range(3):  # batched = single
        xi, li = transform(z[i : i + 1])
        torch.testing.assert_close(xi[0], x[i], atol=1e-12, rtol=0)
        torch.testing.assert_close(li[0], ladj[i], atol=1e-12, rtol=0)


def test_ladj_is_the_mass_weighted_volume_of_the_manifold(system, transform, md):
    """(z, ω, t) -> R(ω) forward(z) + t maps 104 dimensions into 126: its volume in mass-weighted
    coordinates, ½ log det(Jᵀ M J), is ladj + log J(0) + log g(ω) + ½ log det M for every z
    (the constrained bond lengths out, the Fixman factor ½ log det Z_M in)."""
    z, _ = transform.inverse(torch.from_numpy(md[150:153]))
    omm = system.openmm_system
    masses = torch.tensor([omm.getParticleMass(i)._value for i in range(system.n_atoms)],
                          dtype=torch.float64).repeat_interleave(3)  # fmt: skip
    log_j0 = float(frame_log_volume(transform.reference.unsqueeze(0), transform.basis)[0])
    half_log_det_m = 0.5 * float(torch.log(masses).sum())
    gen = torch.Generator().manual_seed(7)
    n = transform.dim
    for i in range(3):
        omega = torch.randn(3, dtype=torch.float64, generator=gen)
        shift = torch.randn(3, dtype=torch.float64, generator=gen)

        def placed(v: torch.Tensor) -> torch.Tensor:
            x, _ = transform(v[:n].unsqueeze(0))
            moved = x.reshape(-1, 3) @ rotation(v[n : n + 3]).T
            return (moved + v[n + 3 :]).reshape(-1)

        J = jacobian(placed, torch.cat([z[i], omega, shift]))
        assert J.shape == (126, 104)
        volume = 0.5 * float(torch.linalg.slogdet(J.T @ (masses[:, None] * J))[1])
        _, ladj = transform(z[i : i + 1])
        theta = float(omega.norm())
        log_g = math.log(2 * (1 - math.cos(theta)) / theta**2)
        assert abs(volume - float(ladj[0]) - log_j0 - log_g - half_log_det_m) < 1e-8


def test_constraint_volume_against_the_dense_gram_matrix(system, md):
    """½ log det(C M⁻¹ Cᵀ), C the autograd Jacobian of every constrained distance, on MD frames;
    and how much it varies there (documented: about 1e-3 nats)."""
    volume = ConstraintVolume.of(system)
    pairs = sorted(system.constrained_bonds)
    omm = system.openmm_system
    inv_m = torch.tensor([1 / omm.getParticleMass(i)._value for i in range(system.n_atoms)],
                         dtype=torch.float64).repeat_interleave(3)  # fmt: skip
    i, j = torch.tensor(pairs).T
    x = torch.from_numpy(md[:5])
    for frame in x:
        C = jacobian(lambda v: (v.reshape(-1, 3)[j] - v.reshape(-1, 3)[i]).norm(dim=1), frame)
        dense = 0.5 * torch.linalg.slogdet(C @ (inv_m[:, None] * C.T))[1]
        got = volume(frame.reshape(1, -1, 3))[0]
        assert abs(float(got - dense)) < 1e-12
    spread = volume(torch.from_numpy(md).reshape(len(md), -1, 3)).std()
    assert 0 < float(spread) < 0.01


def test_a_constraint_inside_the_rigid_block_is_refused(system, md):
    rigid = np.array(sorted([*system.rigid_atoms.tolist(), 19]))  # HA of the central residue
    names = [a.name for a in system.topology.atoms]
    assert names[19] == "HA"
    rows = np.array([r for r in system.z_matrix if r[0] != 19])
    bad = dataclasses.replace(system, rigid_atoms=rigid, z_matrix=rows)
    with pytest.raises(ValueError, match=r"distance 18-19 .* is constrained \(HBonds\)"):
        MixedCoordinateTransform(bad, md[:20])


def test_unconstrained_alanine_dipeptide_layout_is_unchanged():
    from p4bg.zmatrix import build_layout

    ala = load_system("alanine_dipeptide")
    assert ala.constrained_bonds == {}
    layout = build_layout(ala.topology, ala.positions)
    assert layout.rigid_atoms.tolist() == [6, 8, 9, 10, 14]
