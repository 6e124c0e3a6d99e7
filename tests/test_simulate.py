"""python -m p4bg.simulate: a few ps of MD, written, reloaded, resumed, checked against OpenMM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import pytest

from analysis.geometry import dihedral, is_l_chirality
from p4bg.data import DatasetError, chunk_paths, load_dataset, load_metadata
from p4bg.simulate import main
from p4bg.systems import SYSTEMS_DIR, load_system

ROOT = Path(__file__).resolve().parents[1]
# 2 replicas × 10 frames of 0.2 ps, in chunks of 4 frames (so each replica has 3 chunks).
ARGS = ["--ns", "0.004", "--replicas", "2", "--chunk-frames", "4", "--equilibration-ps", "0.5",
        "--seed", "3", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("md") / "ala_600K"
    main([*ARGS, "--out", str(out)])
    return out


def test_dataset_files_load(dataset):
    xyz, energies, split = load_dataset(dataset)
    assert xyz.shape == (20, 66) and xyz.dtype == np.float32
    assert energies.shape == (20,) and np.isfinite(energies).all()
    # Contiguous time blocks per replica: train first, then val, then test; disjoint, complete.
    assert split["train"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15, 16, 17]
    assert split["val"].tolist() == [8, 18] and split["test"].tolist() == [9, 19]
    meta = load_metadata(dataset)
    assert meta["status"] == "complete" and meta["temperature_K"] == 600.0
    assert meta["platform"] in ("Reference", "CPU", "CUDA", "OpenCL")
    assert len({r["seed"] for r in meta["replicas"]}) == 2
    assert meta["steps_per_frame"] == 200 and "openmm" in meta["versions"]
    assert "p4bg.simulate" in meta["command"] and 0.0 <= meta["phi_positive_fraction"] <= 1.0
    # The chunk files are ordinary DCDs that mdtraj (and VMD, PyMOL) read with the PDB.
    traj = mdtraj.load(str(chunk_paths(dataset / "replica_00", 0)[0]),
                       top=str(SYSTEMS_DIR / "alanine_dipeptide" / "alanine_dipeptide.pdb"))  # fmt: skip
    np.testing.assert_allclose(traj.xyz.reshape(len(traj), -1), xyz[:4], atol=1e-6)


def test_stored_energies_match_openmm(dataset):
    xyz, energies, _ = load_dataset(dataset)
    system = load_system("alanine_dipeptide")
    context = openmm.Context(
        system.openmm_system,
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName("Reference"),
    )
    for frame, stored in zip(xyz.reshape(-1, 22, 3).astype(np.float64), energies, strict=True):
        context.setPositions(frame)
        recomputed = context.getState(getEnergy=True).getPotentialEnergy()._value
        # float32 positions in the DCD shift the energy by far less than 0.01 kJ/mol.
        assert recomputed == pytest.approx(stored, abs=1e-2)


def test_frames_are_l_alanine_and_dihedrals_match_mdtraj(dataset):
    xyz = load_dataset(dataset).xyz.reshape(-1, 22, 3)
    assert is_l_chirality(xyz).all()
    system = load_system("alanine_dipeptide")
    traj = mdtraj.Trajectory(xyz, system.topology)
    np.testing.assert_allclose(dihedral(xyz.astype(np.float64), system.phi_atoms),
                               mdtraj.compute_phi(traj)[1][:, 0], atol=1e-4)  # fmt: skip


def test_resume_after_interruption_gives_the_same_frames(dataset, tmp_path):
    out = tmp_path / "interrupted"
    main([*ARGS, "--out", str(out), "--stop-after-chunks", "1"])
    assert load_metadata(out)["status"] == "interrupted"
    with pytest.raises(DatasetError, match="--resume"):
        load_dataset(out)
    # A kill in the middle of writing leaves a temporary file and a DCD without its .npz.
    folder = out / "replica_01"
    (folder / "chunk_00001.tmp.npz").write_bytes(b"partial")
    chunk_paths(folder, 1)[0].write_bytes(b"partial")
    main([*ARGS, "--out", str(out), "--resume"])
    resumed, reference = load_dataset(out), load_dataset(dataset)
    assert resumed.xyz.shape == reference.xyz.shape
    np.testing.assert_array_equal(resumed.xyz, reference.xyz)  # bitwise: RNG state is restored
    np.testing.assert_array_equal(resumed.energies, reference.energies)


def test_resume_of_a_complete_dataset_changes_nothing(dataset, capsys):
    before = (dataset / "metadata.json").read_bytes()
    main([*ARGS, "--out", str(dataset), "--resume"])
    assert "already complete" in capsys.readouterr().out
    assert (dataset / "metadata.json").read_bytes() == before  # timings of the real run kept


def test_resume_after_sigkill(tmp_path):
    """Kill the whole process group mid-run, as a scheduler or the OOM killer would, then resume."""
    out = tmp_path / "killed"
    args = ["--ns", "0.2", "--replicas", "2", "--chunk-frames", "50", "--equilibration-ps", "0.5",
            "--no-progress", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "p4bg.simulate", *args], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 120
    while not (out / "replica_00" / "chunk_00001.npz").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert load_metadata(out)["status"] == "running"
    main([*args, "--resume"])
    xyz, energies, _ = load_dataset(out)
    assert xyz.shape == (1000, 66) and np.isfinite(energies).all()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p4bg.simulate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_bad_inputs_give_clear_errors(dataset, tmp_path):
    r = run_cli("--system", "no_such_molecule", "--ns", "1", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "unknown system 'no_such_molecule'" in r.stderr
    r = run_cli("--ns", "-1", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "--ns must be > 0" in r.stderr
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    r = run_cli("--ns", "0.001", "--out", str(blocker / "sub"))
    assert r.returncode == 1 and "cannot write there" in r.stderr
    r = run_cli(*ARGS, "--out", str(dataset))
    assert r.returncode == 1 and "add --resume" in r.stderr
    r = run_cli(*[a if a != "3" else "4" for a in ARGS], "--out", str(dataset), "--resume")
    assert r.returncode == 1 and "different seed" in r.stderr
    r = run_cli("--ns", "0.001", "--save-every-ps", "0.0005", "--out", str(tmp_path / "c"))
    assert r.returncode == 1 and "whole number" in r.stderr
    with pytest.raises(DatasetError, match=r"python -m p4bg\.simulate --out"):
        load_dataset(tmp_path / "nothing_here")
    assert json.loads((dataset / "split.json").read_text())["test"] == [[9, 10], [19, 20]]


def test_the_md_pool_logs_lines_where_no_bar_is_drawn(tmp_path, capfd):
    """Without a terminal the pool draws no bar (no carriage-return redraws in a log file)
    and writes a progress line per interval instead."""
    from p4bg.md.plain import ReplicaJob, run_replica
    from p4bg.md.pool import run_jobs
    from p4bg.systems import SYSTEMS_DIR

    job = ReplicaJob(index=0, system_path=str(SYSTEMS_DIR / "alanine_dipeptide"),
                     temperature=600.0, platform="Reference", seed=1, frames=150,
                     steps_per_frame=10, equilibration_steps=10, chunk_frames=150,
                     folder=str(tmp_path / "replica_00"))  # fmt: skip
    run_jobs([job], run_replica, workers=1, ps_per_frame=0.01, label="test MD",
             progress_bar=True, log_every_s=0.0)  # fmt: skip
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("test MD:")]
    assert lines and "/150 frames" in lines[-1] and "ns/day" in lines[-1]
    assert "\r" not in err
