"""TorchEnergy (the force field as batched torch code) against OpenMM's Reference platform.

The oracle is a second implementation: energies and forces from an OpenMM Context in float64,
on MD frames, perturbed frames and high-energy (compressed, clashing) configurations, for the
whole System and for each force on its own.
"""

from __future__ import annotations

import copy

import numpy as np
import openmm
import pytest
import torch
from md_helpers import run_md

from p4bg.energy import TorchEnergy, UnsupportedForceError
from p4bg.systems import load_system


@pytest.fixture(scope="module")
def system():
    return load_system("alanine_dipeptide")


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """20 frames of 600 K MD; the same perturbed by 0.02 nm; and 20 high-energy ones (perturbed by
    0.05 nm and compressed by 15 % about the centroid: clashes of 1e3–1e6 kJ/mol)."""
    md = run_md(tmp_path_factory, frames=20, seed=11)
    rng = np.random.default_rng(0)
    near = md + 0.02 * rng.standard_normal(md.shape)
    xyz = (md + 0.05 * rng.standard_normal(md.shape)).reshape(20, 22, 3)
    hot = (xyz.mean(1, keepdims=True) + 0.85 * (xyz - xyz.mean(1, keepdims=True))).reshape(20, 66)
    return np.concatenate([md, near, hot])


def direct(omm_system, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energies kJ/mol and forces kJ/mol/nm straight from an OpenMM Reference Context."""
    context = openmm.Context(
        omm_system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    energies, forces = [], []
    for frame in xyz.reshape(len(xyz), -1, 3):
        context.setPositions(frame)
        state = context.getState(getEnergy=True, getForces=True)
        energies.append(state.getPotentialEnergy()._value)
        forces.append(state.getForces(asNumpy=True)._value)
    return np.array(energies), np.array(forces).reshape(len(xyz), -1)


def only(omm_system, name: str):
    """A copy of the System with a single one of its forces."""
    single = copy.deepcopy(omm_system)
    for k in reversed(range(single.getNumForces())):
        if type(single.getForce(k)).__name__ != name:
            single.removeForce(k)
    return single


def check(energy: TorchEnergy, omm_system, xyz: np.ndarray) -> tuple[float, float]:
    """Largest energy error relative to max(1, |E|) and largest force error (kJ/mol/nm)."""
    u, grad = energy.evaluate(xyz)
    E, F = direct(omm_system, xyz)
    rel = np.abs(u * energy.kT - E) / np.maximum(1.0, np.abs(E))
    return float(rel.max()), float(np.abs(-grad * energy.kT - F).max())


def test_whole_system_matches_openmm_float64(system, frames):
    energy = TorchEnergy(system)
    assert energy.terms == ["angle", "bond", "gb", "nb", "torsion"]
    E, _ = direct(system.openmm_system, frames)
    assert E[40:].min() > 1e3  # the hot frames are high-energy
    rel, force = check(energy, system.openmm_system, frames)
    assert rel < 1e-4 and force < 1e-3, (rel, force)
    # what float64 actually gives: 2e-14 relative, 3e-5 kJ/mol/nm on forces of ~1e7 (clashes)
    assert rel < 1e-10 and force < 1e-4
    assert max(check(energy, system.openmm_system, frames[:40])) < 1e-8  # MD and near-MD


FORCES = ("HarmonicBondForce", "HarmonicAngleForce", "PeriodicTorsionForce", "NonbondedForce",
          "GBSAOBCForce")  # fmt: skip


@pytest.mark.parametrize("force", FORCES)
def test_each_force_alone_matches_openmm(system, frames, force):
    single = only(system.openmm_system, force)
    rel, err = check(TorchEnergy(single, temperature=600.0), single, frames)
    assert rel < 1e-10 and err < 1e-4, (force, rel, err)  # clashes: forces ~1e7 kJ/mol/nm


def test_float32_errors_stay_within_the_documented_bounds(system, frames):
    """float32 positions, measured on 1,000 MD frames: ≤ 2.4e-4 kJ/mol (2e-5 kT at 600 K) in the
    energy and ≤ 0.011 kJ/mol/nm (median 6e-4) in the forces; ≤ 1.6e-6 relative on clashes.
    Documented in the README; the bounds here leave a margin of about 10."""
    energy = TorchEnergy(system)
    x = torch.tensor(frames, dtype=torch.float32, requires_grad=True)
    u = energy(x)
    assert u.dtype == torch.float32
    u.sum().backward()
    E, F = direct(system.openmm_system, x.detach().double().numpy())
    rel = np.abs(u.detach().double().numpy() * energy.kT - E) / np.maximum(1.0, np.abs(E))
    f_err = np.abs(-x.grad.double().numpy() * energy.kT - F)
    dE = np.abs(u.detach().double().numpy() * energy.kT - E)
    assert dE[:40].max() < 2.5e-3, dE[:40].max()
    assert f_err[:40].max() < 0.2, f_err[:40].max()
    assert rel[40:].max() < 2e-5, rel[40:].max()  # clashes: large E, tiny relative error


def test_gradient_is_minus_forces_over_kT_and_gradchecks(system, frames):
    energy = TorchEnergy(system)
    x = torch.tensor(frames[:3], requires_grad=True)
    assert torch.autograd.gradcheck(energy, (x,), eps=1e-6, atol=1e-5, rtol=1e-5)
    weights = torch.tensor([1.0, -2.0, 0.5])
    (weights * energy(x)).sum().backward()
    _, F = direct(system.openmm_system, frames[:3])
    np.testing.assert_allclose(x.grad.numpy(), weights[:, None].numpy() * -F / energy.kT,
                               rtol=1e-8, atol=1e-8)  # fmt: skip


def _close_contacts(energy: TorchEnergy, md: np.ndarray) -> np.ndarray:
    """MD frames with one atom moved to 0.002–0.2 nm from another: close enough that every
    branch of the OBC integral is taken (|r − s| below the atom's own radius, and the receiving
    atom entirely inside the other's scaled sphere). The pair is the one whose source sphere
    reaches furthest beyond the receiver's radius."""
    b = energy.buffers
    k = int(torch.argmax(b["gb_scaled_src"] - b["gb_offset_recv"]))
    i, j = np.triu_indices(energy.n_atoms, 1)
    receiver, source = (i[k], j[k]) if k < len(i) else (j[k - len(i)], i[k - len(i)])
    out = []
    for n, r in enumerate((0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)):
        xyz = md[n].reshape(-1, 3).copy()
        direction = np.array([1.0, 0.3 * n - 0.7, 0.2])
        xyz[receiver] = xyz[source] + r * direction / np.linalg.norm(direction)
        out.append(xyz.reshape(-1))
    return np.array(out)


def test_analytic_gradient_matches_autograd_on_every_branch(system, frames):
    """The hand-written gradient of energy_and_gradient against autograd through energy_kj (the
    same energy as plain torch code), float64, on MD, perturbed, clashing and close-contact
    frames; and the close contacts do reach the OBC branches that ordinary frames never take."""
    energy = TorchEnergy(system)
    xyz = np.concatenate([frames, _close_contacts(energy, frames[:20])])
    x = torch.tensor(xyz, requires_grad=True)
    e_auto = energy.energy_kj(x)
    (g_auto,) = torch.autograd.grad(e_auto.sum(), x)
    e, g = energy.energy_and_gradient(x.detach())
    np.testing.assert_array_equal(e.numpy(), e_auto.detach().numpy())
    scale = g_auto.abs().amax(1, keepdim=True)
    assert ((g - g_auto).abs() / scale).max() < 1e-12
    # the branches: r from the pair distances of both directions, as _obc forms them
    b = energy.buffers
    d = x.detach().reshape(len(x), 22, 3)
    i, j = np.triu_indices(22, 1)
    r = torch.cat([(d[:, j] - d[:, i]).norm(dim=2)] * 2, 1)
    offset, scaled = b["gb_offset_recv"], b["gb_scaled_src"]
    assert ((r - scaled).abs() <= offset).any()  # the lower limit is the atom's own radius
    assert (offset < scaled - r).any()  # inside the other's scaled sphere
    assert not (offset < scaled - r)[:40].any()  # which MD never reaches


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_evaluation_matches_eager(system, frames, dtype):
    eager, compiled = TorchEnergy(system), TorchEnergy(system, compile=True, chunk=32)
    x = torch.tensor(frames, dtype=dtype, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    u, v = eager(x), compiled(y)
    u.sum().backward()
    v.sum().backward()
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(v, u, rtol=tol, atol=tol)
    torch.testing.assert_close(y.grad, x.grad, rtol=tol, atol=tol * x.grad.abs().max().item())
    # u of an MD frame (a few kT) is a sum of terms thousands of times larger that cancel, so
    # float32 promises agreement only to its own rounding error of that sum: measured against
    # float64 on the 20 MD frames, another float32 evaluation (the compiled graph for a batch
    # of 5: other kernels, another summation order) must agree to within a few times it.
    atol = tol
    if dtype == torch.float32:
        u64 = eager(torch.tensor(frames[:20], dtype=torch.float64)).detach()
        atol = max(tol, 4 * float((u[:20].detach().double() - u64).abs().max()))
        assert atol < 1e-3  # kT: a rounding error, not a different energy
    with torch.no_grad():
        torch.testing.assert_close(compiled(x[:5]), u[:5].detach(), rtol=0, atol=atol)


def test_batched_equals_single_and_chunks_do_not_matter(system, frames):
    whole = TorchEnergy(system)
    chunked = TorchEnergy(system, chunk=7)
    x = torch.tensor(frames)
    u = whole(x)
    np.testing.assert_allclose(chunked(x).numpy(), u.numpy(), rtol=1e-12)
    single = torch.stack([whole(x[i : i + 1])[0] for i in range(len(x))])
    np.testing.assert_allclose(single.numpy(), u.numpy(), rtol=1e-12)
    assert whole(x[:0]).shape == (0,)


def test_failures_are_infinite_counted_and_have_zero_gradient(system, frames):
    energy = TorchEnergy(system)
    x = torch.tensor(frames[:5])
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    x[2] = 0.0  # every atom on one point
    x[3, 3:6] = x[3, 0:3]  # two atoms on top of each other
    x.requires_grad_()
    u = energy(x)
    assert torch.isinf(u[:4]).all() and (u[:4] > 0).all() and torch.isfinite(u[4])
    assert energy.stats.failures == 4 and energy.stats.evaluations == 5
    assert energy.last_failed.tolist() == [True, True, True, True, False]
    u[4].backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:4] == 0).all()
    energy(torch.tensor(frames[:2]))
    assert energy.stats.failures == 4 and energy.stats.evaluations == 7


def test_unsupported_forces_and_settings_are_refused_by_name(system):
    extra = copy.deepcopy(system.openmm_system)
    extra.addForce(openmm.CustomExternalForce("x^2"))
    with pytest.raises(UnsupportedForceError, match=r"CustomExternalForce.*--energy openmm"):
        TorchEnergy(extra, temperature=600.0)
    cutoff = copy.deepcopy(system.openmm_system)
    for force in cutoff.getForces():
        if isinstance(force, openmm.NonbondedForce):
            force.setNonbondedMethod(openmm.NonbondedForce.CutoffNonPeriodic)
    with pytest.raises(UnsupportedForceError, match="NonbondedForce uses nonbonded method"):
        TorchEnergy(cutoff, temperature=600.0)
    with pytest.raises(ValueError, match="temperature"):
        TorchEnergy(openmm.System())
    with pytest.raises(TypeError, match=r"MolecularSystem or an openmm\.System"):
        TorchEnergy("alanine_dipeptide")


def test_bad_input_is_refused_with_the_expected_shape(system):
    energy = TorchEnergy(system)
    with pytest.raises(ValueError, match=r"\[batch, 66\]"):
        energy(torch.zeros(3, 22, 3))
    with pytest.raises(TypeError, match="float32 or float64"):
        energy(torch.zeros(3, 66, dtype=torch.int64))


def test_temperature_sets_kT(system, frames):
    hot, cold = TorchEnergy(system, temperature=600.0), TorchEnergy(system, temperature=300.0)
    x = torch.tensor(frames[:4])
    np.testing.assert_allclose(cold(x).numpy(), 2 * hot(x).numpy(), rtol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(system, frames):
    energy = TorchEnergy(system)
    x = torch.tensor(frames, requires_grad=True)
    energy(x).sum().backward()
    gpu = TorchEnergy(system).to("cuda")
    y = torch.tensor(frames, device="cuda", requires_grad=True)
    u = gpu(y)
    assert u.device.type == "cuda"
    u.sum().backward()
    np.testing.assert_allclose(u.detach().cpu().numpy(), energy(x).detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(y.grad.cpu().numpy(), x.grad.numpy(), rtol=1e-8, atol=1e-8)
