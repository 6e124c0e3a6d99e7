"""python -m p4bg.umbrella: the MBAR estimator against an exactly known free energy, the
estimator's bias energy against OpenMM's restraint on MD frames, a window resumed mid-run, and a
short run recorded in the dataset."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from analysis.geometry import dihedral
from p4bg.data import load_dataset
from p4bg.md.estimators import bias_energy, umbrella_delta_f
from p4bg.md.umbrella import WindowJob, restrained_system, run_window
from p4bg.systems import load_system
from p4bg.umbrella import main
from p4bg.units import R


def _sample_windows(free_energy, centers, k, temperature, n, rng):
    """Exact samples of each window's biased density exp(−β(F(φ) + bias)) on a fine grid."""
    grid = np.linspace(-np.pi, np.pi, 20_000, endpoint=False)
    beta = 1 / (R * temperature)
    out = []
    for c in centers:
        log_p = -beta * (free_energy(grid) + bias_energy(np.stack([grid, grid], 1), c, k))
        p = np.exp(log_p - log_p.max())
        phi = rng.choice(grid, size=n, p=p / p.sum()) + rng.uniform(0, 2 * np.pi / 20_000, n)
        out.append(np.stack([phi, np.zeros(n)], 1))
    return out, grid


@pytest.mark.parametrize("temperature", [300.0, 600.0])
def test_umbrella_estimator_recovers_a_known_free_energy(temperature):
    rng = np.random.default_rng(0)

    def free_energy(phi):  # kJ/mol: a deep φ<0 well, a shallow φ>0 one, barriers between
        return 8.0 * np.cos(phi) + 6.0 * np.cos(2 * phi) - 5.0 * np.sin(phi)

    centers = np.stack([np.linspace(-np.pi, np.pi, 24, endpoint=False), np.zeros(24)], 1)
    k = np.array([150.0, 0.0])
    windows, grid = _sample_windows(free_energy, centers, k, temperature, 3000, rng)
    weight = np.exp(-free_energy(grid) / (R * temperature))
    exact = math.log(weight[grid <= 0].sum() / weight[grid > 0].sum())
    result = umbrella_delta_f(windows, centers, k, temperature)
    assert abs(result["delta_f"] - exact) < 4 * result["delta_f_err"] + 0.01
    assert 0 < result["delta_f_err"] < 0.1
    assert all(abs(h - exact) < 0.2 for h in result["delta_f_halves"])


def test_bias_is_periodic_and_sums_the_restrained_angles():
    k = np.array([100.0, 40.0])
    c = np.array([3.0, 0.0])
    a = np.array([[-3.0, 0.5], [3.0, 0.0]])
    d = 2 * np.pi - 6.0  # -3 and 3 are 0.28 rad apart across ±π
    np.testing.assert_allclose(bias_energy(a, c, k), [0.5 * 100 * d**2 + 0.5 * 40 * 0.25, 0.0])


@pytest.mark.parametrize(
    ("center", "k", "wraps"),  # wraps: (φ, ψ) cross ±π from the centre in some frames
    [((-np.pi, 0.0), (300.0, 0.0), (False, False)), ((-1.2, 0.0), (300.0, 0.0), (False, False)),
     ((2.8, 0.0), (300.0, 0.0), (True, False)), ((2.8, -2.9), (300.0, 100.0), (True, True)),
     ((-1.2, 2.5), (300.0, 100.0), (False, True))],
)  # fmt: skip
def test_bias_energy_is_the_restraint_openmm_simulates(data, center, k, wraps):
    """The bias the estimator puts in every window's reduced potential equals the energy of the
    CustomTorsionForce restraints the window simulates with, on MD frames, for φ windows and
    (φ, ψ) windows; centres near ±π make the periodic wrap matter (|θ − θ0| > π)."""
    import openmm

    system = load_system("alanine_dipeptide", 600.0)
    omm = restrained_system(system, center, k)
    n_restraints = 2 if k[1] > 0 else 1
    for i in range(omm.getNumForces() - n_restraints, omm.getNumForces()):
        assert isinstance(omm.getForce(i), openmm.CustomTorsionForce)
        omm.getForce(i).setForceGroup(31)  # the restraints alone
    context = openmm.Context(omm, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))  # fmt: skip
    xyz = load_dataset(data).xyz.reshape(-1, 22, 3).astype(np.float64)[::4]
    angles = np.stack([dihedral(xyz, system.phi_atoms), dihedral(xyz, system.psi_atoms)], 1)
    openmm_energy = []
    for frame in xyz:
        context.setPositions(frame)
        state = context.getState(getEnergy=True, groups={31})
        openmm_energy.append(state.getPotentialEnergy()._value)  # kJ/mol
    ours = bias_energy(angles, np.array(center), np.array(k))
    np.testing.assert_allclose(ours, openmm_energy, rtol=1e-9, atol=1e-9)
    assert np.ptp(ours) > 1.0  # the frames see different restraint energies
    crossing = (np.abs(angles - np.array(center)) > np.pi).mean(0) * (np.array(k) > 0)
    assert tuple(crossing > 0.1) == wraps


def test_a_window_resumed_after_a_kill_ends_as_an_uninterrupted_one(data, tmp_path):
    """A window killed after its first chunk continues from that chunk's checkpoint: the same
    φ, ψ series as a window run at once; its chunks are removed once its file is written."""
    system = load_system("alanine_dipeptide", 600.0)
    start = load_dataset(data).xyz[0].reshape(22, 3).astype(np.float64)

    def job(folder, stop_after_chunks=None):
        return WindowJob(index=0, system_path=str(system.path), temperature=600.0,
                         platform="Reference", seed=5, center=(-1.2, 0.0), k=(300.0, 0.0),
                         start=start, frames=30, steps_per_frame=50, equilibration_steps=200,
                         chunk_frames=10, folder=str(folder),
                         stop_after_chunks=stop_after_chunks)  # fmt: skip

    run_window(job(tmp_path / "a" / "window_000"))
    killed = tmp_path / "b" / "window_000"
    run_window(job(killed, stop_after_chunks=1))
    assert not killed.with_suffix(".npz").exists() and (killed / "chunk_00000.npz").is_file()
    run_window(job(killed))
    assert not killed.exists()
    with np.load(tmp_path / "a" / "window_000.npz") as a, np.load(killed.with_suffix(".npz")) as b:
        assert len(a["phi"]) == 30
        np.testing.assert_array_equal(a["phi"], b["phi"])
        np.testing.assert_array_equal(a["psi"], b["psi"])
        assert tuple(b["center"]) == (-1.2, 0.0) and int(b["seed"]) == 5


def test_umbrella_run_records_its_estimate_in_the_dataset(data, tmp_path):
    import shutil

    dataset = tmp_path / "ds"
    shutil.copytree(data, dataset)
    args = ["--windows", "4", "--psi-windows", "2", "--ns", "0.004", "--save-every-ps", "0.1",
            "--equilibration-ps", "0.5", "--platform", "Reference", "--no-progress"]  # fmt: skip
    main([str(dataset), *args])
    meta = json.loads((dataset / "metadata.json").read_text())
    u = meta["umbrella"]
    assert u["status"] == "complete" and u["plan"]["psi_windows"] == 2
    assert len(list((dataset / "umbrella").glob("window_*.npz"))) == 8
    assert u["n_samples"] == 8 * 40 and math.isfinite(u["delta_f"])
    with np.load(dataset / "umbrella" / "window_005.npz") as w:
        assert tuple(w["center"]) == pytest.approx((0.0, 0.0)) and len(w["phi"]) == 40
    # a lost window is simulated again, the others are kept
    kept = (dataset / "umbrella" / "window_000.npz").read_bytes()
    (dataset / "umbrella" / "window_003.npz").unlink()
    main([str(dataset), *args])
    assert (dataset / "umbrella" / "window_000.npz").read_bytes() == kept
    assert (dataset / "umbrella" / "window_003.npz").is_file()
    with pytest.raises(SystemExit, match="same options"):
        main([str(dataset), *args, "--k", "50"])


def test_umbrella_on_another_residue_restrains_its_phi_and_records_it_apart(tmp_path):
    """--residue ALA2 on the tetrapeptide: the windows hold ALA2's φ (not the central ALA3's),
    live in umbrella_ALA2/, and their record sits under umbrella_residues, where analyze's
    per-residue table finds it; the central residue's record is untouched. An unknown label is
    refused with the labels there are."""
    from p4bg.config import ConfigError
    from p4bg.md.umbrella import residue_torsions
    from p4bg.residue_report import recorded_free_energies
    from p4bg.simulate import main as simulate_main
    from p4bg.zmatrix import backbone_dihedrals

    system = load_system("alanine_tetrapeptide", 600.0)
    chain = {label: (phi, psi) for label, phi, psi in backbone_dihedrals(system.topology)}
    assert list(chain) == ["ALA2", "ALA3", "ALA4"]
    assert residue_torsions(system, None) == (None, *chain["ALA3"])
    assert residue_torsions(system, "ALA3")[0] is None  # the system's own φ/ψ
    assert residue_torsions(system, "ALA2") == ("ALA2", *chain["ALA2"])
    with pytest.raises(ConfigError, match="ALA2, ALA3, ALA4"):
        residue_torsions(system, "GLY7")
    omm = restrained_system(system, (1.0, 0.0), (300.0, 0.0), chain["ALA2"])
    force = omm.getForce(omm.getNumForces() - 1)
    assert tuple(force.getTorsionParameters(0)[:4]) == chain["ALA2"][0]

    dataset = tmp_path / "ds"
    simulate_main(["--system", "alanine_tetrapeptide", "--ns", "0.002", "--replicas", "1",
                   "--save-every-ps", "0.1", "--equilibration-ps", "0.2", "--platform",
                   "Reference", "--no-progress", "--out", str(dataset)])  # fmt: skip
    args = ["--residue", "ALA2", "--windows", "4", "--ns", "0.002", "--save-every-ps", "0.1",
            "--equilibration-ps", "1", "--platform", "Reference",
            "--no-progress"]  # fmt: skip
    main([str(dataset), *args])
    meta = json.loads((dataset / "metadata.json").read_text())
    assert "umbrella" not in meta
    u = meta["umbrella_residues"]["ALA2"]
    assert u["status"] == "complete" and u["plan"]["residue"] == "ALA2"
    assert math.isfinite(u["delta_f"]) and not (dataset / "umbrella").exists()
    # each window's recorded φ is ALA2's and sits near its centre
    for i, center in enumerate(-np.pi + 2 * np.pi * np.arange(4) / 4):
        with np.load(dataset / "umbrella_ALA2" / f"window_{i:03d}.npz") as w:
            d = np.angle(np.exp(1j * (w["phi"] - center)))
            assert np.abs(d).max() < 0.8, (i, np.abs(d).max())
    estimates = recorded_free_energies(meta, "ALA3")
    assert set(estimates) == {"ALA2"} and estimates["ALA2"][0] == u["delta_f"]
    assert "--residue ALA2" in estimates["ALA2"][2]
    with pytest.raises(SystemExit) as err:
        main([str(dataset), "--residue", "SER9", "--platform", "Reference", "--no-progress"])
    assert err.value.code == 2
