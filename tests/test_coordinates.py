"""The mixed coordinate transform on real MD frames: round trip, exact Jacobians, invariances."""

from __future__ import annotations

import copy
import math

import mdtraj
import numpy as np
import pytest
import torch
from md_helpers import frame_log_volume, rigid_motion_residuals, run_md
from torch.autograd.functional import jacobian

from p4bg.coordinates import (
    MixedCoordinateTransform,
    cartesian_to_zmatrix,
    kabsch_align,
    zmatrix_to_cartesian,
)
from p4bg.geometry import block_log_volume
from p4bg.systems import load_system


@pytest.fixture(scope="module")
def system():
    return load_system("alanine_dipeptide")


@pytest.fixture(scope="module")
def md(tmp_path_factory):
    """300 frames of 600 K MD: the first 250 fit the transform, the last 50 test it."""
    return run_md(tmp_path_factory, frames=300, seed=11)


@pytest.fixture(scope="module")
def transform(system, md):
    return MixedCoordinateTransform(system, md[:250])


@pytest.fixture(scope="module")
def legacy(system, transform):
    """The same fit without the block's volume factor: the transform of runs from before it."""
    return MixedCoordinateTransform.from_state_dict(system, transform.state_dict(),
                                                    block_volume=False)  # fmt: skip


def superpose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All atoms of ``a`` [batch, 66] rigidly superposed on ``b`` (Kabsch on all 22 atoms)."""
    a3, b3 = a.reshape(-1, 22, 3), b.reshape(-1, 22, 3)
    return (kabsch_align(a3, b3[0] - b3[0].mean(0)) if len(a3) == 1 else torch.stack(
        [kabsch_align(a3[i : i + 1], b3[i] - b3[i].mean(0))[0] for i in range(len(a3))]
    )) + b3.mean(1, keepdim=True)  # fmt: skip


def test_round_trip_on_md_frames_float64(transform, md):
    x = torch.from_numpy(md[250:])
    z, ladj_inv = transform.inverse(x)
    assert z.shape == (50, 60) and ladj_inv.shape == (50,)
    x_back, ladj_fwd = transform(z)
    assert x_back.shape == (50, 66)
    err = (superpose(x, x_back) - x_back.reshape(-1, 22, 3)).abs().max()
    assert err < 1e-6
    torch.testing.assert_close(ladj_fwd + ladj_inv, torch.zeros(50), atol=1e-9, rtol=0)
    z_again, _ = transform.inverse(x_back)
    torch.testing.assert_close(z_again, z, atol=1e-8, rtol=0)
    assert abs(float(z.mean())) < 1.0 and 0.5 < float(z.std()) < 2.0  # standardised latent


def test_round_trip_float32(system, md):
    t32 = MixedCoordinateTransform(system, md[:250]).float()
    x = torch.from_numpy(md[250:]).float()
    z, _ = t32.inverse(x)
    x_back, ladj = t32(z)
    assert x_back.dtype == torch.float32 and torch.isfinite(ladj).all()
    err = (superpose(x.double(), x_back.double()) - x_back.double().reshape(-1, 22, 3)).abs().max()
    assert err < 1e-4


def test_latent_is_invariant_to_rigid_motion(transform, md):
    x = torch.from_numpy(md[250:260])
    rotation, _ = torch.linalg.qr(torch.randn(3, 3))
    if torch.linalg.det(rotation) < 0:
        rotation[:, 0] *= -1
    moved = (x.reshape(-1, 22, 3) @ rotation.T + torch.tensor([1.5, -3.0, 0.7])).reshape(-1, 66)
    z, ladj = transform.inverse(x)
    z_moved, ladj_moved = transform.inverse(moved)
    torch.testing.assert_close(z_moved, z, atol=1e-9, rtol=0)
    torch.testing.assert_close(ladj_moved, ladj, atol=1e-9, rtol=0)


def test_zmatrix_ladj_matches_the_square_jacobian(system, transform, md):
    """51 internal + 15 rigid-block Cartesian -> 66 Cartesian is square: compare slogdet."""
    x = torch.from_numpy(md[250:253]).reshape(-1, 22, 3)
    internal, ladj_inv, _ = cartesian_to_zmatrix(x, system.z_matrix)
    rigid_xyz = x[:, system.rigid_atoms]
    for i in range(3):

        def square(v: torch.Tensor) -> torch.Tensor:
            xyz, _, _ = zmatrix_to_cartesian(v[:51].reshape(1, 17, 3), v[51:].reshape(1, 5, 3),
                                             system.z_matrix, system.rigid_atoms, 22)  # fmt: skip
            return xyz.reshape(66)

        v = torch.cat([internal[i].reshape(-1), rigid_xyz[i].reshape(-1)])
        _, ladj_fwd, _ = zmatrix_to_cartesian(internal[i : i + 1], rigid_xyz[i : i + 1],
                                              system.z_matrix, system.rigid_atoms, 22)  # fmt: skip
        sign, logdet = torch.linalg.slogdet(jacobian(square, v))
        assert sign != 0
        assert float(logdet) == pytest.approx(float(ladj_fwd[0]), abs=1e-9)
        assert float(ladj_inv[i]) == pytest.approx(-float(ladj_fwd[0]), abs=1e-9)
        # and the positions come back
        torch.testing.assert_close(square(v).reshape(22, 3), x[i], atol=1e-12, rtol=0)


def test_normalisation_and_whitening_ladj(transform, md):
    """The elementwise maps' log-derivatives (autograd) plus the 9 -> 15 embedding's volume
    ½ log det(JᵀJ) (linear algebra) equal the ladj of latent_to_internal."""
    z, _ = transform.inverse(torch.from_numpy(md[250:253]))
    for i in range(3):
        zi = z[i].clone().requires_grad_()
        internal, _, ladj = transform.latent_to_internal(zi.unsqueeze(0))
        flat = internal.reshape(-1)  # [17, 3] -> bonds/angles/torsions interleaved per row
        grads = torch.autograd.grad(flat.sum(), zi, retain_graph=True)[0][:51]  # elementwise maps
        head = zi.detach()[:51]
        J = jacobian(lambda w, head=head: transform.latent_to_internal(
            torch.cat([head, w]).unsqueeze(0))[1].reshape(-1), zi.detach()[51:])  # fmt: skip
        embed = 0.5 * torch.linalg.slogdet(J.T @ J)[1]
        assert float(ladj[0].detach()) == pytest.approx(
            float(torch.log(grads.abs()).sum() + embed), abs=1e-9
        )


def test_dihedrals_of_reconstructed_frames_equal_mdtraj(system, transform, md):
    x = torch.from_numpy(md[250:])
    x_back, _ = transform(transform.inverse(x)[0])
    original = mdtraj.Trajectory(md[250:].reshape(-1, 22, 3), system.topology)
    rebuilt = mdtraj.Trajectory(x_back.numpy().reshape(-1, 22, 3), system.topology)
    for compute in (mdtraj.compute_phi, mdtraj.compute_psi):
        np.testing.assert_allclose(compute(rebuilt)[1], compute(original)[1], atol=1e-6)


def test_batched_equals_single_and_every_latent_is_a_molecule(transform, md):
    z, ladj = transform.inverse(torch.from_numpy(md[250:254]))
    for i in range(4):
        zi, li = transform.inverse(torch.from_numpy(md[250 + i : 251 + i]))
        torch.testing.assert_close(zi[0], z[i], atol=1e-12, rtol=0)
        torch.testing.assert_close(li[0], ladj[i], atol=1e-12, rtol=0)
    # Wild latent vectors (far outside the data) still give finite, valid geometry.
    wild = 6.0 * torch.randn(100, 60)
    x, ladj = transform(wild)
    assert torch.isfinite(x).all() and torch.isfinite(ladj).all()
    internal, _, _ = cartesian_to_zmatrix(x.reshape(-1, 22, 3), transform.z_matrix)
    assert (
        (internal[..., 0] > 0).all()
        and (internal[..., 1] > 0).all()
        and (internal[..., 1] < math.pi).all()
    )


def test_degenerate_geometry_is_clamped_counted_and_finite(transform, md):
    x = torch.from_numpy(md[250:252]).clone().reshape(-1, 22, 3)
    x[0, 5] = x[0, 4] + 2.0 * (x[0, 4] - x[0, 6])  # O(ACE) collinear with C and N: angle = π
    before = int(transform.n_clamped)
    z, ladj = transform.inverse(x.reshape(-1, 66))
    assert torch.isfinite(z).all() and torch.isfinite(ladj).all()
    assert int(transform.n_clamped) > before


def test_bad_training_data(system, md):
    with pytest.raises(ValueError, match=r"\[frames >= 10, 66\]"):
        MixedCoordinateTransform(system, md[:5])
    with pytest.raises(ValueError, match=r"\[frames >= 10, 66\]"):
        MixedCoordinateTransform(system, md.reshape(-1, 22, 3))
    bad = md[:20].copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        MixedCoordinateTransform(system, bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torsion_tails_are_clamped_and_counted(transform, dtype):
    """Beyond the dtype's resolution the torsion map saturates: such latents are clamped to
    finite angles and counted, never turned into NaN or a silently wrong inverse."""
    from p4bg.coordinates import _probit_limit

    t = MixedCoordinateTransform.from_state_dict(load_system("alanine_dipeptide"),
                                                 transform.state_dict()).to(dtype)  # fmt: skip
    k = t.n_internal
    z = torch.zeros(3, 60, dtype=dtype)
    limit = _probit_limit(dtype)
    far = (limit + 1.0 - float(t.torsion_mu[5])) / float(t.torsion_s[5])  # y beyond the limit
    z[1, 2 * k + 5] = far
    z[2, 2 * k + 5] = -far - 2 * limit / float(t.torsion_s[5])
    before = int(t.n_clamped)
    x, ladj = t(z)
    assert torch.isfinite(x).all() and torch.isfinite(ladj).all()
    assert int(t.n_clamped) - before == 2
    z_back, _ = t.inverse(x)
    assert torch.isfinite(z_back).all()
    assert 5.0 < limit < 9.0


def test_inverse_canonicalises_swapped_methyl_hydrogens(transform, md):
    """HB2/HB3 (atoms 12, 13) labelled the other way round are the same molecule: same latent,
    same log-density, instead of an NLL in the tens of thousands."""
    x = torch.from_numpy(md[250:])
    swapped = x.reshape(-1, 22, 3)[:, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 12, 14, 15, 16,
                                        17, 18, 19, 21, 20]].reshape(-1, 66)  # fmt: skip
    z, ladj = transform.inverse(x)
    z_s, ladj_s = transform.inverse(swapped)
    torch.testing.assert_close(z_s, z, atol=1e-10, rtol=0)
    torch.testing.assert_close(ladj_s, ladj, atol=1e-10, rtol=0)


def test_block_log_volume_is_the_orientation_frame_determinant(transform, md):
    """The closed form (a 3 × 3 determinant) equals log|det[T, Ω(y), B]| − log J(0) on MD
    frames, and log J is not constant on them (the factor matters)."""
    x = torch.from_numpy(md).reshape(-1, 22, 3)
    aligned = kabsch_align(x[:, transform.rigid_index], transform.reference)
    log_j = block_log_volume(aligned, transform.reference)
    log_j0 = frame_log_volume(transform.reference.unsqueeze(0), transform.basis)
    direct = frame_log_volume(aligned, transform.basis) - log_j0
    torch.testing.assert_close(log_j, direct, atol=1e-12, rtol=0)
    assert 0.01 < float(log_j.std()) < 0.2


@pytest.mark.parametrize("block_volume", [True, False])
def test_ladj_is_the_jacobian_including_rigid_motion(transform, legacy, md, block_volume):
    """(z [60], rotation vector ω [3], translation t [3]) -> R(ω) forward(z) + t is square,
    66 -> 66, and its log|det| (autograd) is ladj(z) + log J(0) + log g(ω), g(ω) = 2(1 − cos|ω|)/
    |ω|² the Haar density of ω: every direction of the Cartesian volume, rigid ones included.
    Without the block's volume factor the difference is log J(c) − log J(0), not a constant."""
    t = transform if block_volume else legacy
    z, _ = t.inverse(torch.from_numpy(md[250:254]))
    residuals = rigid_motion_residuals(t, z, seed=3)
    if block_volume:
        torch.testing.assert_close(
            residuals, torch.zeros(4, dtype=torch.float64), atol=1e-9, rtol=0
        )
    else:
        x, _ = t(z)
        missing = block_log_volume(x.reshape(-1, 22, 3)[:, t.rigid_index], t.reference)
        torch.testing.assert_close(residuals, missing, atol=1e-9, rtol=0)
        assert float(residuals.max() - residuals.min()) > 1e-3


def test_without_block_volume_the_transform_is_as_before(system, transform, legacy, md):
    """block_volume=False adds nothing: ladj is bitwise the sum of the parts it always was, the
    state_dict is the same for both flags (checkpoints load strictly either way), and the two
    ladj differ by exactly the block's log J(c) − log J(0)."""
    fitted = MixedCoordinateTransform(system, md[:250], block_volume=False)
    assert fitted.state_dict().keys() == transform.state_dict().keys()
    for name, value in fitted.state_dict().items():
        assert torch.equal(value, transform.state_dict()[name])
    copy.deepcopy(transform).load_state_dict(fitted.state_dict(), strict=True)
    x = torch.from_numpy(md[250:260])
    z, ladj_inv = legacy.inverse(x)
    xyz = x.reshape(-1, 22, 3)
    internal, ladj_z, _ = cartesian_to_zmatrix(xyz, system.z_matrix)
    aligned = kabsch_align(xyz[:, system.rigid_atoms], legacy.reference)
    assert torch.equal(ladj_inv, legacy.internal_to_latent(internal, aligned)[1] + ladj_z)
    _, ladj_fwd = legacy(z)
    internal, rigid_xyz, ladj = legacy.latent_to_internal(z)
    _, ladj_z, _ = zmatrix_to_cartesian(
        internal, rigid_xyz, system.z_matrix, system.rigid_atoms, 22
    )
    assert torch.equal(ladj_fwd, ladj + ladj_z)
    z_new, ladj_new = transform.inverse(x)
    assert torch.equal(z_new, z)
    torch.testing.assert_close(ladj_new - ladj_inv, -block_log_volume(aligned, legacy.reference),
                               atol=1e-12, rtol=0)  # fmt: skip
    assert "block_volume=False" in repr(legacy) and "block_volume=True" in repr(transform)


def test_forward_batched_equals_single(transform, md):
    z, _ = transform.inverse(torch.from_numpy(md[250:254]))
    x, ladj = transform(z)
    for i in range(4):
        xi, li = transform(z[i : i + 1])
        torch.testing.assert_close(xi[0], x[i], atol=1e-12, rtol=0)
        torch.testing.assert_close(li[0], ladj[i], atol=1e-12, rtol=0)
