"""The field's benchmark systems: the ff96 alanine dipeptide's System against openmmtools' own,
and TorchEnergy on the CustomGBForce (OBC-I) that Amber prmtops make, against OpenMM.

The oracle for the System is openmmtools' ``AlanineDipeptideImplicit(constraints=None)``, the
System that FAB, TA-BG and CMT report on; for TorchEnergy, OpenMM's Reference platform.
"""

from __future__ import annotations

import copy

import numpy as np
import openmm
import openmm.app as app
import pytest
import torch
from md_helpers import run_md
from test_forcefield import check, direct

from p4bg.energy import TorchEnergy, UnsupportedForceError
from p4bg.systems import SYSTEMS_DIR, load_system


@pytest.fixture(scope="module")
def ff96():
    return load_system("alanine_dipeptide_ff96")


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """20 frames of 600 K MD of the ff96 system, the same perturbed by 0.02 nm, and 20 clashing
    ones (perturbed by 0.05 nm and compressed by 15 %)."""
    md = run_md(tmp_path_factory, frames=20, seed=5,
                system_path=SYSTEMS_DIR / "alanine_dipeptide_ff96")  # fmt: skip
    rng = np.random.default_rng(1)
    near = md + 0.02 * rng.standard_normal(md.shape)
    xyz = (md + 0.05 * rng.standard_normal(md.shape)).reshape(20, 22, 3)
    hot = (xyz.mean(1, keepdims=True) + 0.85 * (xyz - xyz.mean(1, keepdims=True))).reshape(20, 66)
    return np.concatenate([md, near, hot])


def relative_errors(energy: TorchEnergy, omm_system, xyz: np.ndarray) -> tuple[float, float]:
    """Largest energy error relative to max(1, |E|), largest force error relative to the
    frame's largest force (the clashes here reach forces of 1e13 kJ/mol/nm)."""
    u, grad = energy.evaluate(xyz)
    E, F = direct(omm_system, xyz)
    rel = np.abs(u * energy.kT - E) / np.maximum(1.0, np.abs(E))
    force = np.abs(-grad * energy.kT - F).max(1) / np.abs(F).max(1)
    return float(rel.max()), float(force.max())


def test_ff96_system_is_openmmtools_alanine_dipeptide_implicit(ff96, frames):
    """Acceptance: the energies agree with openmmtools' System to ≤ 1e-6 relative on MD frames
    (they agree to rounding: the same prmtop, built the same way)."""
    testsystems = pytest.importorskip("openmmtools.testsystems")
    theirs = testsystems.AlanineDipeptideImplicit(constraints=None)
    assert [a.element.symbol for a in theirs.topology.atoms()] == [
        a.element.symbol for a in ff96.openmm_topology.atoms()
    ]
    names = sorted(type(f).__name__ for f in ff96.openmm_system.getForces())
    assert names == sorted(type(f).__name__ for f in theirs.system.getForces())
    assert ff96.openmm_system.getNumConstraints() == theirs.system.getNumConstraints() == 0
    ours, _ = direct(ff96.openmm_system, frames[:20])
    ref, _ = direct(theirs.system, frames[:20])
    rel = np.abs(ours - ref) / np.abs(ref)
    assert rel.max() <= 1e-6, rel.max()
    assert rel.max() < 1e-12  # what it is: the same System


def test_ff96_system_is_what_the_literature_states(ff96):
    forces = {type(f).__name__: f for f in ff96.openmm_system.getForces()}
    gb = forces["CustomGBForce"]
    assert gb.getNonbondedMethod() == openmm.CustomGBForce.NoCutoff
    assert "tanh(0.8*psi+2.909125*psi^3)" in gb.getComputedValueParameters(1)[1]  # OBC-I
    assert forces["NonbondedForce"].getNonbondedMethod() == openmm.NonbondedForce.NoCutoff
    assert ff96.prmtop == "alanine-dipeptide.prmtop" and ff96.implicit_solvent == "OBC1"
    assert ff96.rigid_atoms.tolist() == [6, 8, 9, 10, 14]  # N, CA, HA, CB, C: the rule
    assert (ff96.phi_atoms, ff96.psi_atoms) == ((4, 6, 8, 14), (6, 8, 14, 16))
    assert ff96.is_l(ff96.positions[None]).all()


def test_torch_energy_matches_openmm_on_the_obc1_custom_gb_force(ff96, frames):
    energy = TorchEnergy(ff96)
    assert energy.terms == ["angle", "bond", "gb", "nb", "torsion"]
    rel, force = relative_errors(energy, ff96.openmm_system, frames)
    assert rel < 1e-10 and force < 1e-12, (rel, force)
    assert max(check(energy, ff96.openmm_system, frames[:40])) < 1e-8  # kJ/mol/nm on MD
    gb = copy.deepcopy(ff96.openmm_system)
    for k in reversed(range(gb.getNumForces())):
        if not isinstance(gb.getForce(k), openmm.CustomGBForce):
            gb.removeForce(k)
    rel, force = relative_errors(TorchEnergy(gb, temperature=300.0), gb, frames)
    assert rel < 1e-10 and force < 1e-12, (rel, force)


def test_obc1_gradient_matches_autograd_inside_another_atoms_sphere(ff96, frames):
    """The custom form has no correction for an atom inside another's scaled sphere: on close
    contacts that reach it, energy and hand-written gradient still match OpenMM and autograd."""
    energy = TorchEnergy(ff96)
    b = energy.buffers
    assert torch.isinf(b["gb_inside_recv"]).all() and float(b["gb_ace_floor"]) == -np.inf
    k = int(torch.argmax(b["gb_scaled_src"] - b["gb_offset_recv"]))
    i, j = np.triu_indices(22, 1)
    receiver, source = (i[k], j[k]) if k < len(i) else (j[k - len(i)], i[k - len(i)])
    close = []
    for n, r in enumerate((0.005, 0.01, 0.02, 0.05, 0.1)):
        xyz = frames[n].reshape(22, 3).copy()
        xyz[receiver] = xyz[source] + r * np.array([1.0, 0.2 * n, -0.3]) / np.linalg.norm(
            [1.0, 0.2 * n, -0.3])  # fmt: skip
        close.append(xyz.reshape(-1))
    close = np.array(close)
    offset, scaled = b["gb_offset_recv"][k], b["gb_scaled_src"][k]
    assert offset < scaled - 0.005  # the closest contact is inside the scaled sphere
    x = torch.tensor(close, requires_grad=True)
    (g_auto,) = torch.autograd.grad(energy.energy_kj(x).sum(), x)
    _, g = energy.energy_and_gradient(x.detach())
    assert ((g - g_auto).abs() / g_auto.abs().amax(1, keepdim=True)).max() < 1e-12
    u, _ = energy.evaluate(close)
    E, _ = direct(ff96.openmm_system, close)
    assert (np.abs(u * energy.kT - E) / np.maximum(1.0, np.abs(E))).max() < 1e-10


def test_obc2_custom_form_matches_and_other_custom_gb_models_are_refused():
    """OpenMM's ``implicit/obc2.xml`` (the CustomGBForce form of OBC-II) is read with its own α,
    β, γ; GBn (another model) and a salt-screened OBC-I are refused by name."""
    pdb = app.PDBFile(str(SYSTEMS_DIR / "alanine_dipeptide" / "alanine_dipeptide.pdb"))
    xyz = np.array(pdb.getPositions(asNumpy=True)._value)
    rng = np.random.default_rng(3)
    frames = (xyz[None] + 0.01 * rng.standard_normal((6, 22, 3))).reshape(6, 66)

    def make(*files: str, **kwargs: object) -> openmm.System:
        return app.ForceField("amber99sbildn.xml", *files).createSystem(
            pdb.topology, nonbondedMethod=app.NoCutoff, **kwargs)  # fmt: skip

    obc2 = make("implicit/obc2.xml")
    rel, force = check(TorchEnergy(obc2, temperature=300.0), obc2, frames)
    assert rel < 1e-10 and force < 1e-6, (rel, force)
    with pytest.raises(UnsupportedForceError, match="not one of OpenMM's OBC forms"):
        TorchEnergy(make("implicit/gbn.xml"), temperature=300.0)
    salty = app.AmberPrmtopFile(
        str(SYSTEMS_DIR / "alanine_dipeptide_ff96" / "alanine-dipeptide.prmtop")
    )
    with pytest.raises(UnsupportedForceError, match="salt"):
        TorchEnergy(salty.createSystem(implicitSolvent=app.OBC1, implicitSolventSaltConc=0.15),
                    temperature=300.0)  # fmt: skip


BENCHMARKS = ("alanine_dipeptide_ff96", "alanine_tetrapeptide", "alanine_hexapeptide")


@pytest.fixture(scope="module", params=BENCHMARKS)
def benchmark(request, tmp_path_factory):
    system = load_system(request.param)
    md = run_md(tmp_path_factory, frames=60, seed=2, steps_per_frame=50,
                system_path=SYSTEMS_DIR / request.param)  # fmt: skip
    return system, md


def test_benchmark_layout_round_trips_md_frames(benchmark):
    """The generated layout of each benchmark system: MD frames -> latent -> frames to 1e-5 nm
    (the constraint tolerance of MD; rigid motion aside), latent -> frames -> latent exactly,
    forward and inverse ladj cancelling, constrained lengths held."""
    from p4bg.coordinates import MixedCoordinateTransform
    from p4bg.geometry import kabsch_align

    system, md = benchmark
    transform = MixedCoordinateTransform(system, md[:50])
    assert transform.dim == 3 * system.n_atoms - 6 - len(system.constrained_bonds)
    x = torch.from_numpy(md[50:])
    z, _ = transform.inverse(x)
    back, ladj_f = transform(z)
    target = x.reshape(len(x), -1, 3)
    centred = target - target.mean(1, keepdim=True)
    aligned = torch.cat([kabsch_align(back.reshape(len(x), -1, 3)[k : k + 1], centred[k])
                         for k in range(len(x))])  # fmt: skip
    assert (aligned - centred).abs().max() < 1e-5
    z2, ladj_i2 = transform.inverse(back)
    torch.testing.assert_close(z2, z, atol=1e-9, rtol=0)
    torch.testing.assert_close(ladj_f + ladj_i2, torch.zeros_like(ladj_f), atol=1e-9, rtol=0)


def test_torch_energy_evaluates_every_benchmark_system(benchmark):
    """TorchEnergy on the benchmark Systems (OBC1 custom form; HBonds Systems, whose constrained
    bonds have no energy term) against OpenMM on their MD frames."""
    system, md = benchmark
    energy = TorchEnergy(system)
    rel, force = check(energy, system.openmm_system, md[:10])
    assert rel < 1e-10 and force < 1e-6, (system.name, rel, force)
