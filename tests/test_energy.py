"""The energy bridge against direct OpenMM calls; its gradient against −F/kT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from md_helpers import run_md

from p4bg.energy import OpenMMEnergy
from p4bg.generator import linlogcut
from p4bg.systems import load_system

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def system():
    return load_system("alanine_dipeptide")


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """40 frames of 600 K MD (run here, in-process) and the same frames perturbed by 0.02 nm."""
    md = run_md(tmp_path_factory, frames=40, seed=7)
    rng = np.random.default_rng(0)
    return np.concatenate([md, md + 0.02 * rng.standard_normal(md.shape)])


@pytest.fixture(scope="module")
def bridge(system):
    with OpenMMEnergy(system, n_workers=2, platform="Reference") as energy:
        yield energy


def direct(system, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energies kJ/mol and forces kJ/mol/nm straight from an OpenMM Context."""
    context = openmm.Context(
        system.openmm_system,
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName("Reference"),
    )
    energies, forces = [], []
    for frame in xyz.reshape(len(xyz), -1, 3):
        context.setPositions(frame)
        state = context.getState(getEnergy=True, getForces=True)
        energies.append(state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole))
        forces.append(
            state.getForces(asNumpy=True).value_in_unit(
                openmm.unit.kilojoule_per_mole / openmm.unit.nanometer
            )
        )
    return np.array(energies), np.array(forces).reshape(len(xyz), -1)


@pytest.mark.parametrize("n_workers", [0, 2])
def test_energies_and_gradients_match_openmm(system, frames, bridge, n_workers):
    energy = bridge if n_workers else OpenMMEnergy(system, n_workers=0, platform="Reference")
    x = torch.tensor(frames, requires_grad=True)
    u = energy(x)
    assert u.shape == (80,) and u.dtype == torch.float64
    u.sum().backward()
    E, F = direct(system, frames)
    np.testing.assert_allclose(u.detach().numpy(), E / system.kT, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(x.grad.numpy(), -F / system.kT, rtol=1e-6, atol=1e-6)


def test_float32_and_weighted_backward(system, frames, bridge):
    x = torch.tensor(frames[:10], dtype=torch.float32, requires_grad=True)
    u = bridge(x)
    assert u.dtype == torch.float32
    weights = torch.arange(10, dtype=torch.float32)
    (weights * u).sum().backward()
    _, F = direct(system, x.detach().double().numpy())
    np.testing.assert_allclose(
        x.grad.numpy(), weights[:, None].numpy() * -F / system.kT, rtol=1e-4, atol=1e-3
    )


def test_gradcheck(frames, bridge):
    x = torch.tensor(frames[:3], requires_grad=True)
    assert torch.autograd.gradcheck(bridge, (x,), eps=1e-6, atol=1e-4, rtol=1e-4)


def test_analytic_toy_system_pins_units_and_sign():
    """U = Σ k/2 |r - r0|² (CustomExternalForce): u = U/kT and ∂u/∂x = k (x - x0)/kT."""
    k, temperature = 250.0, 300.0  # kJ/mol/nm², K
    toy = openmm.System()
    force = openmm.CustomExternalForce("0.5*k*((x-x0)^2+(y-y0)^2+(z-z0)^2)")
    for name in ("k", "x0", "y0", "z0"):
        force.addPerParticleParameter(name)
    centres = np.array([[0.1, 0.2, 0.3], [1.0, -0.5, 0.25]])
    for c in centres:
        toy.addParticle(1.0)
        force.addParticle(toy.getNumParticles() - 1, [k, *c])
    toy.addForce(force)
    kT = 0.00831446261815324 * temperature
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    with OpenMMEnergy(toy, n_workers=1, temperature=temperature, platform="Reference") as energy:
        u = energy(x)
        u.sum().backward()
    d = x.detach().numpy().reshape(5, 2, 3) - centres
    np.testing.assert_allclose(u.detach().numpy(), 0.5 * k * (d**2).sum((1, 2)) / kT, rtol=1e-10)
    np.testing.assert_allclose(x.grad.numpy(), (k * d / kT).reshape(5, 6), rtol=1e-10)


def test_failures_are_infinite_counted_and_have_zero_gradient(system, frames, bridge):
    x = torch.tensor(frames[:4])
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    x[2] = 0.0  # every atom on one point
    before = bridge.stats.failures
    x.requires_grad_()
    u = bridge(x)
    assert torch.isinf(u[:3]).all() and (u[:3] > 0).all() and torch.isfinite(u[3])
    assert bridge.stats.failures - before == 3
    assert bridge.last_failed.tolist() == [True, True, True, False]
    u[3].backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:3] == 0).all()
    # The KL term's regulariser maps +inf to its cap with zero gradient.
    y = torch.tensor([0.0, 5e3, float("inf")], requires_grad=True)
    cut = linlogcut(y, high=1e3, max=1e4)
    assert cut.detach().tolist() == pytest.approx([0.0, 1e3 + np.log1p(4e3), 1e4])
    cut.sum().backward()
    assert y.grad.tolist() == pytest.approx([1.0, 1.0 / (1.0 + 4e3), 0.0])


def test_bad_input_shapes_and_arguments(system, bridge):
    with pytest.raises(ValueError, match=r"\[batch, 66\]"):
        bridge(torch.zeros(3, 22, 3))
    with pytest.raises(ValueError, match="temperature"):
        OpenMMEnergy(openmm.System(), n_workers=0)
    with pytest.raises(TypeError, match="MolecularSystem"):
        OpenMMEnergy("alanine_dipeptide", n_workers=0)
    assert bridge(torch.zeros(0, 66)).shape == (0,)


def test_worker_killed_mid_batch_is_replaced(system, frames):
    xyz = np.repeat(frames, 40, axis=0)  # 3200 frames: long enough to kill a worker during it
    expected, _ = direct(system, frames)
    with OpenMMEnergy(system, n_workers=2, platform="Reference") as energy:
        victim = energy._workers[1].pid
        threading.Timer(0.05, os.kill, (victim, signal.SIGKILL)).start()
        u, _ = energy.evaluate(xyz)
        assert energy.stats.worker_restarts == 1 and energy._workers[1].pid != victim
        np.testing.assert_allclose(u, np.repeat(expected, 40) / system.kT, rtol=1e-9)


def test_hung_worker_times_out_and_is_replaced(system, frames):
    expected, _ = direct(system, frames)
    with OpenMMEnergy(system, n_workers=2, platform="Reference", timeout=2.0) as energy:
        os.kill(energy._workers[0].pid, signal.SIGSTOP)  # alive but never answers
        start = time.monotonic()
        u, _ = energy.evaluate(frames)
        assert 2.0 <= time.monotonic() - start < 30
        assert energy.stats.worker_restarts == 1
        np.testing.assert_allclose(u, expected / system.kT, rtol=1e-9)


def test_create_close_cycles_leave_no_process(system, frames):
    pids = []
    for _ in range(4):
        energy = OpenMMEnergy(system, n_workers=2, platform="Reference")
        pids += [w.pid for w in energy._workers]
        energy.evaluate(frames[:5])
        energy.close()
        energy.close()  # idempotent
    time.sleep(0.2)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="after close"):
        energy.evaluate(frames[:1])


def test_interpreter_exit_without_close_does_not_hang(tmp_path):
    script = tmp_path / "no_close.py"
    script.write_text(
        "import torch\n"
        "from p4bg.energy import OpenMMEnergy\n"
        "from p4bg.systems import load_system\n"
        "s = load_system('alanine_dipeptide')\n"
        "e = OpenMMEnergy(s, n_workers=2, platform='Reference')\n"
        "print(float(e(torch.tensor(s.positions.reshape(1, 66)))[0]), [w.pid for w in e._workers])\n"
    )  # no __main__ guard needed, no close()
    result = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    pids = eval(result.stdout.split(" ", 1)[1])
    time.sleep(0.2)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors(system, frames, bridge):
    x = torch.tensor(frames[:4], device="cuda", requires_grad=True)
    u = bridge(x)
    assert u.device.type == "cuda"
    u.sum().backward()
    assert x.grad.device.type == "cuda"
