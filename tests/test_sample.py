"""python -m p4bg.sample and python -m p4bg.analyze on a tiny trained run.

The oracle for the sample files is a second implementation: mdtraj reads the DCD and recomputes
φ/ψ, a fresh OpenMM Context re-evaluates the energies.
"""

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
import pytest
import torch

from p4bg.analyze import main as analyze_main
from p4bg.analyze import replica_segments
from p4bg.config import ConfigError
from p4bg.runs import load_run
from p4bg.sample import main as sample_main
from p4bg.sampling import sample_run
from p4bg.systems import load_system
from p4bg.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train_main(["--preset", "smoke", "--data", str(data), "--out", str(out), "--no-progress"])
    return out


@pytest.fixture(scope="module")
def sampled(run):
    sample_main([str(run), "--n", "120", "--batch", "50", "--seed", "3", "--no-progress"])
    return run


def read_npz(run: Path) -> dict[str, np.ndarray]:
    with np.load(run / "samples.npz") as data:
        return {k: data[k] for k in data.files}


def test_sample_files_are_complete_and_consistent(sampled):
    s = read_npz(sampled)
    assert all(len(v) == 120 for v in s.values())
    assert {"u", "log_q", "log_w", "phi", "psi", "finite", "is_l"} <= set(s)
    np.testing.assert_array_equal(s["log_w"], -s["u"] - s["log_q"])
    info = json.loads((sampled / "samples.json").read_text())
    assert info["status"] == "complete" and info["n_samples"] == 120 and info["seed"] == 3
    assert info["n_failed_energies"] == int((~np.isfinite(s["u"])).sum())


def test_mdtraj_reads_the_samples_and_recomputes_the_stored_dihedrals(sampled):
    system = load_system("alanine_dipeptide")
    traj = mdtraj.load(str(sampled / "samples.dcd"), top=str(sampled / "samples.pdb"))
    assert traj.n_frames == 120 and traj.n_atoms == 22
    assert [a.name for a in traj.topology.atoms] == [a.name for a in system.topology.atoms]
    assert [r.name for r in traj.topology.residues] == ["ACE", "ALA", "NME"]
    s = read_npz(sampled)
    np.testing.assert_allclose(mdtraj.compute_phi(traj)[1][:, 0], s["phi"], atol=2e-5)
    np.testing.assert_allclose(mdtraj.compute_psi(traj)[1][:, 0], s["psi"], atol=2e-5)
    first = mdtraj.load(str(sampled / "samples.pdb"))
    np.testing.assert_allclose(first.xyz[0], traj.xyz[0], atol=1e-4)  # PDB: 0.001 Å


def test_sample_energy_option_records_the_energy_and_both_agree(sampled, tmp_path):
    """The run's default (auto) scores samples with TorchEnergy; --energy openmm with the OpenMM
    workers; both give the same u (float64) for the same latent draws."""
    info = json.loads((sampled / "samples.json").read_text())
    assert info["energy"] == "torch" and info["energy_platform"] == "torch"
    other = tmp_path / "openmm"
    other.mkdir()
    (other / "checkpoint.pt").write_bytes((sampled / "checkpoint.pt").read_bytes())
    sample_main([str(other), "--n", "120", "--batch", "50", "--seed", "3", "--no-progress",
                 "--energy", "openmm"])  # fmt: skip
    info = json.loads((other / "samples.json").read_text())
    assert info["energy"] == "openmm" and info["energy_platform"] != "torch"
    a, b = read_npz(sampled), read_npz(other)
    np.testing.assert_array_equal(a["finite"], b["finite"])
    ok = np.isfinite(a["u"])
    np.testing.assert_array_equal(ok, np.isfinite(b["u"]))
    np.testing.assert_allclose(a["u"][ok], b["u"][ok], rtol=1e-9, atol=1e-9)


def test_openmm_reproduces_the_stored_energies_from_the_dcd(sampled):
    """Acceptance of the sample issue: energies from samples.dcd to 1e-4 kT (float64)."""
    import openmm
    import openmm.unit as unit
    from mdtraj.formats import DCDTrajectoryFile

    system = load_system("alanine_dipeptide")
    info = json.loads((sampled / "samples.json").read_text())
    with DCDTrajectoryFile(str(sampled / "samples.dcd")) as f:
        xyz = f.read()[0].astype(np.float64) / 10.0  # Å (float32) -> nm (float64)
    context = openmm.Context(
        system.openmm_system,
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName(
            "Reference" if info["energy_platform"] == "torch" else info["energy_platform"]
        ),
    )
    kT = info["kT_kJ_per_mol"]
    s = read_npz(sampled)
    for i, frame in enumerate(xyz):
        context.setPositions(frame * unit.nanometer)
        u = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(
            unit.kilojoule_per_mole
        ) / kT  # fmt: skip
        assert abs(u - s["u"][i]) <= max(1e-4, 1e-12 * abs(u)), i


def assert_log_q_is_the_model_density(run: Path, atol: float) -> None:
    """samples.npz's log q equals the reloaded model's density of the positions in the DCD, for
    every sample. What separates them is the DCD's rounding of the positions to float32 Å (log q
    was computed before it): in float64, 5.6e-5 nats at most over 2,000 samples of the smoke
    model (measured); ``atol`` leaves a few times that."""
    loaded = load_run(run, "cpu")
    dtype = getattr(torch, loaded.config.dtype)
    traj = mdtraj.load(str(run / "samples.dcd"), top=str(run / "samples.pdb"))
    x = torch.from_numpy(traj.xyz.reshape(traj.n_frames, -1)).to(dtype)
    with torch.no_grad():
        log_q = loaded.bg.log_prob(x).double().numpy()
    s = read_npz(run)
    assert np.isfinite(log_q).all() and np.isfinite(s["log_q"]).all()
    np.testing.assert_allclose(log_q, s["log_q"], rtol=0, atol=atol)


@pytest.mark.parametrize("coupling", ["rnvp", "spline"])
def test_log_q_is_the_model_density_of_the_stored_positions(data, tmp_path, coupling):
    """In float64 (RealNVP and spline couplings: the checkpoint rebuilds either from its
    config), the stored log q is the model's density of the written positions to 2e-4 nats."""
    run = tmp_path / coupling
    train_main(["--preset", "smoke", f"--coupling={coupling}", "--spline_bins=6",
                "--dtype=float64", "--data", str(data), "--out", str(run), "--no-progress"])  # fmt: skip
    sample_main([str(run), "--n", "200", "--seed", "1", "--no-progress"])
    loaded = load_run(run, "cpu")
    assert loaded.config.coupling == coupling and loaded.config.dtype == "float64"
    assert_log_q_is_the_model_density(run, atol=2e-4)


def test_log_q_of_a_float32_model(sampled):
    """The float32 model: the same check, within float32's own rounding of the passes."""
    assert_log_q_is_the_model_density(sampled, atol=0.05)


def test_same_seed_gives_the_same_samples(run, tmp_path):
    other = tmp_path / "copy"
    other.mkdir()
    for name in ("checkpoint.pt", "config.toml"):
        (other / name).write_bytes((run / name).read_bytes())
    sample_run(other, 30, batch=30, seed=11, progress=False)
    a = read_npz(other)
    sample_run(other, 30, batch=30, seed=11, progress=False)
    np.testing.assert_array_equal(a["u"], read_npz(other)["u"])
    sample_run(other, 30, batch=7, seed=11, progress=False)  # same draws, other chunks
    b = read_npz(other)  # float32 matrix products may round differently with the batch size
    np.testing.assert_allclose(a["phi"], b["phi"], atol=1e-5)
    np.testing.assert_allclose(a["u"], b["u"], rtol=1e-4, atol=1e-3)


def test_the_runs_sample_prior_scale_is_the_default(run, tmp_path):
    other = tmp_path / "tempered"
    other.mkdir()
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["config"]["sample_prior_scale"] = 0.7
    torch.save(state, other / "checkpoint.pt")
    assert sample_run(other, 10, batch=10, progress=False)["prior_scale"] == 0.7
    info = sample_run(other, 10, batch=10, progress=False, prior_scale=1.0)  # the flag wins
    assert info["prior_scale"] == 1.0


def test_best_checkpoint_is_sampled_on_request(run, tmp_path, capsys):
    best = torch.load(run / "best.pt", weights_only=False)
    last = torch.load(run / "checkpoint.pt", weights_only=False)
    assert best["step"] == best["best"]["step"] <= last["step"]
    other = tmp_path / "best"
    other.mkdir()
    for name in ("checkpoint.pt", "best.pt", "config.toml"):
        (other / name).write_bytes((run / name).read_bytes())
    info = sample_run(other, 12, batch=12, seed=3, progress=False, checkpoint="best")
    assert info["checkpoint"] == "best" and info["checkpoint_step"] == best["step"]
    (other / "best.pt").unlink()
    with pytest.raises(SystemExit):
        sample_main([str(other), "--n", "5", "--checkpoint", "best", "--overwrite"])
    assert "no best.pt" in capsys.readouterr().err


def test_nonfinite_samples_are_kept_flagged_and_counted(run, tmp_path, monkeypatch):
    import p4bg.sampling as sample_module

    other = tmp_path / "nan"
    other.mkdir()
    (other / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    original = sample_module.load_run

    def broken_load_run(path, device="auto", checkpoint="last"):
        loaded = original(path, device, checkpoint)
        generate = loaded.bg.generate

        def generate_with_nan(z):
            x, log_q = generate(z)
            x = x.clone()
            x[::4, 5] = float("nan")
            return x, log_q

        loaded.bg.generate = generate_with_nan
        return loaded

    monkeypatch.setattr(sample_module, "load_run", broken_load_run)
    info = sample_run(other, 20, batch=8, progress=False)
    s = read_npz(other)
    bad = np.arange(20) % 8 % 4 == 0  # every 4th sample of each chunk
    assert len(s["u"]) == 20 and info["n_nonfinite_positions"] == bad.sum()
    np.testing.assert_array_equal(~s["finite"], bad)
    assert np.isinf(s["u"][bad]).all() and np.isfinite(s["u"][~bad]).all()
    assert info["n_failed_energies"] == bad.sum()
    assert (np.isnan(s["log_w"][bad]) | np.isneginf(s["log_w"][bad])).all()


@pytest.mark.parametrize("energy", ["openmm", "torch"])
def test_a_failure_mid_run_leaves_valid_files_of_the_finished_chunks(
    run, tmp_path, monkeypatch, energy
):
    from p4bg.energy import OpenMMEnergy, TorchEnergy

    other = tmp_path / "crash"
    other.mkdir()
    (other / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    target = OpenMMEnergy if energy == "openmm" else TorchEnergy
    original = target.evaluate
    calls = []

    def failing_evaluate(self, xyz, forces=True):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return original(self, xyz, forces)

    monkeypatch.setattr(target, "evaluate", failing_evaluate)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sample_run(other, 50, batch=10, progress=False, energy=energy)
    info = json.loads((other / "samples.json").read_text())
    assert info["status"] == "failed: RuntimeError: simulated crash" and info["n_samples"] == 20
    assert len(read_npz(other)["u"]) == 20
    traj = mdtraj.load(str(other / "samples.dcd"), top=str(other / "samples.pdb"))
    assert traj.n_frames == 20


def test_sigkill_leaves_readable_files(run, tmp_path):
    other = tmp_path / "killed"
    other.mkdir()
    (other / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "p4bg.sample", str(other), "--n", "1000000", "--batch", "200",
         "--no-progress", "--n-workers", "1"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (other / "samples.npz").exists() and json.loads(
                (other / "samples.json").read_text()
            )["n_samples"] >= 400:
                break
            time.sleep(0.2)
        else:
            pytest.fail("p4bg.sample wrote no chunk in 120 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    n = len(read_npz(other)["u"])
    assert n >= 400 and n % 200 == 0
    traj = mdtraj.load(str(other / "samples.dcd"), top=str(other / "samples.pdb"))
    assert n <= traj.n_frames <= n + 200
    assert json.loads((other / "samples.json").read_text())["status"] == "running"


def test_sample_cli_errors(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample_main([str(tmp_path / "nothing"), "--n", "5"])
    assert exit_info.value.code == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--n-samples and --batch"):
        sample_run(run, 0)
    with pytest.raises(SystemExit):
        sample_main([str(tmp_path), "--verify"])
    assert "nothing to verify" in capsys.readouterr().err


def test_sample_refuses_to_overwrite_without_the_flag(sampled, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample_main([str(sampled), "--n", "5"])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err


# -------------------------------------------------------------------------------- analyze
def test_analyze_writes_the_report(sampled, data):
    analyze_main([str(sampled), "--reference", str(data), "--n-workers", "1"])
    report = sampled / "report"
    for name in ("energies.png", "ramachandran.png", "free_energy_phi.png", "training.png"):
        assert (report / name).read_bytes()[:8] == PNG_MAGIC, name
    metrics = json.loads((report / "metrics.json").read_text())
    model = metrics["models"][sampled.name]
    for key in ("energy_shift", "low_energy_fraction", "reverse_ess", "forward_ess", "kl_rama",
                "kl_rama_reweighted", "kl_phi", "kl_phi_reweighted", "kl_psi",
                "kl_psi_reweighted", "delta_f", "delta_f_reweighted", "chirality_violations",
                "n_samples"):  # fmt: skip
        assert key in model, key
    assert model["n_samples"] == 120
    reference = metrics["reference"]
    for key in ("kl_rama_floor", "kl_phi_floor", "kl_psi_floor", "delta_f", "perturbed"):
        assert key in reference, key
    assert 0 < model["reverse_ess"] <= 1 and 0 <= model["forward_ess"] <= 1
    text = (report / "report.md").read_text()
    assert f"| metric | MD (reference) | {sampled.name} |" in text


def test_analyze_reports_the_reweighting_diagnostics(sampled, data, tmp_path, capsys):
    """The issue "Samples that reweight": log Z sandwich, clipped ESS, ΔF ± error, MD τ, the
    BG value, the share above the training maximum; --split all; the training threshold from
    the run's own training data (here the reference itself, which the report notes)."""
    out = tmp_path / "all"
    analyze_main([str(sampled), "--reference", str(data), "--split", "all", "--out", str(out),
                  "--n-workers", "1"])  # fmt: skip
    assert "its own training dataset" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    model = metrics["models"][sampled.name]
    for key in ("log_z_reverse", "log_z_forward", "log_z_gap", "reverse_ess",
                "reverse_ess_clipped", "forward_n_nonfinite", "delta_f_err",
                "delta_f_reweighted_err", "high_energy_fraction", "low_energy_fraction",
                "d_form_fraction", "u_train_max", "u_train_max_source", "sampling_seconds",
                "bg_effective_samples_per_second", "md_independent_samples_per_second",
                "bg_value"):  # fmt: skip
        assert key in model, key
    assert model["u_train_max_source"] == "training data"
    assert model["u_train_max_dataset"] == str(data)
    assert model["low_energy_fraction"] + model["high_energy_fraction"] == pytest.approx(1.0)
    assert model["sampling_seconds"] > 0 and model["bg_effective_samples_per_second"] > 0
    for key in ("log_z_reverse", "log_z_forward", "log_z_gap"):
        assert isinstance(model[key], float), key  # finite for a working model
    reference = metrics["reference"]
    for key in ("delta_f", "delta_f_err", "delta_f_err_block", "delta_f_err_replicas",
                "tau_phi_frames", "tau_phi_ps", "basin_transitions", "independent_samples",
                "seconds_per_frame", "independent_samples_per_second", "high_energy_fraction",
                "d_form_fraction"):  # fmt: skip
        assert key in reference, key
    assert reference["n"] == 200 and reference["n_replicas"] == 2
    assert metrics["info"]["split"] == "all" and metrics["info"]["n_replica_series"] == 2
    assert reference["seconds_per_frame"] > 0  # from metadata.json's steps_per_second_total
    text = (out / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ΔF")]
    # every ΔF cell is a value with its error, or says why there is none
    cells = [c.strip() for row in rows for c in row.strip("|").split("|")[1:]]
    assert (
        len(rows) == 2
        and cells
        and all(
            c == "–" or ("±" in c and c.endswith("kT")) or c.startswith("not measurable here: ")
            for c in cells
        )
    ), cells
    assert "| reverse ESS (clipped top 1e-4) |" in text and "## BG value" in text
    assert "log Z gap forward − reverse" in text


def test_analyze_threshold_falls_back_to_the_reference_with_a_note(sampled, data, tmp_path,
                                                                   capsys):  # fmt: skip
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    for name in ("samples.npz", "samples.json", "checkpoint.pt"):
        (copy / name).write_bytes((sampled / name).read_bytes())
    (copy / "config.toml").write_text('data = "no/such/dataset"\n')
    analyze_main([str(copy), "--reference", str(data), "--n-workers", "1"])
    assert "reference's train split instead" in capsys.readouterr().err
    metrics = json.loads((copy / "report" / "metrics.json").read_text())
    model = metrics["models"]["elsewhere"]
    assert model["u_train_max_source"] == "reference train split (fallback)"
    assert model["u_train_max_dataset"] == "no/such/dataset"
    assert any("no/such/dataset" in note for note in metrics["info"]["notes"])


def test_training_metrics_read_the_optional_columns(tmp_path):
    from p4bg.runs import read_training_metrics

    (tmp_path / "metrics.csv").write_text("step,nll,val_nll,val_ess\n1,2.0,,\n2,1.5,1.7,0.01\n")
    m = read_training_metrics(tmp_path)
    assert set(m) == {"step", "nll", "val_nll", "val_ess"}  # absent columns stay absent
    np.testing.assert_array_equal(m["val_ess"], [np.nan, 0.01])


def test_replica_segments_cut_the_reference_into_time_series():
    as_lists = lambda segs: [s.tolist() for s in segs]  # noqa: E731
    # test blocks of two replicas of 10 frames: positions 0-1 and 2-3 of the reference arrays
    assert as_lists(replica_segments([10, 10], np.array([8, 9, 18, 19]))) == [[0, 1], [2, 3]]
    assert as_lists(replica_segments([3, 2], np.arange(5))) == [[0, 1, 2], [3, 4]]  # --split all
    assert as_lists(replica_segments([10], np.array([0, 1, 5, 6]))) == [[0, 1], [2, 3]]


def test_analyze_refuses_unfinished_samples_and_duplicate_names(sampled, data, tmp_path, capsys):
    copy = tmp_path / "a" / sampled.name
    copy.mkdir(parents=True)
    for name in ("samples.npz", "samples.json", "checkpoint.pt"):
        (copy / name).write_bytes((sampled / name).read_bytes())
    with pytest.raises(SystemExit):
        analyze_main([str(sampled), str(copy), "--reference", str(data)])
    assert "distinct folder names" in capsys.readouterr().err
    meta = json.loads((copy / "samples.json").read_text())
    (copy / "samples.json").write_text(json.dumps({**meta, "status": "running"}))
    with pytest.raises(SystemExit):
        analyze_main([str(copy), "--reference", str(data)])
    assert "did not finish" in capsys.readouterr().err


def test_analyze_works_on_md_alone(data, tmp_path):
    out = tmp_path / "md_report"
    analyze_main(["--reference", str(data), "--out", str(out), "--n-workers", "1"])
    assert (out / "ramachandran.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "metrics.json").read_text())["models"] == {}


def test_analyze_errors_name_what_to_do(run, data, tmp_path, capsys):
    other = tmp_path / "unsampled"
    other.mkdir()
    with pytest.raises(SystemExit):
        analyze_main([str(other), "--reference", str(data)])
    assert "python -m p4bg.sample" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        analyze_main(["--reference", str(data)])
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        analyze_main(["--reference", str(tmp_path / "none"), "--out", str(tmp_path / "r")])
    assert "p4bg.simulate" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["p4bg.sample", "p4bg.analyze", "p4bg.remd", "p4bg.umbrella"])
def test_command_lines_start(module):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", module, "--help"], env=env, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert f"python -m {module}" in out


def test_verify_recomputes_the_samples(sampled, capsys):
    sample_main([str(sampled), "--verify"])
    result = json.loads(capsys.readouterr().out)
    assert result["frames"] == 120 and result["same_failures"]
    assert result["max_abs_du_kT"] <= 1e-4
    assert result["max_abs_dphi_rad"] < 1e-5 and result["max_abs_dpsi_rad"] < 1e-5


def test_prior_scale_keeps_log_q_exact(run, tmp_path):
    """With z ~ N(0, τ²I), log q is the tempered model's density: it must equal log_prob of the
    stored positions under the same τ, and differ from the τ = 1 density."""
    other = tmp_path / "cool"
    other.mkdir()
    (other / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    info = sample_run(other, 40, batch=40, seed=5, progress=False, prior_scale=0.7)
    assert info["prior_scale"] == 0.7
    loaded = load_run(other, "cpu")
    traj = mdtraj.load(str(other / "samples.dcd"), top=str(other / "samples.pdb"))
    x = torch.from_numpy(traj.xyz.reshape(traj.n_frames, -1)).float()
    with torch.no_grad():
        log_q_unit = loaded.bg.log_prob(x).double().numpy()
        log_q_cool = loaded.bg.tempered(0.7).log_prob(x).double().numpy()
    stored = read_npz(other)["log_q"]
    np.testing.assert_allclose(log_q_cool, stored, atol=0.05)
    assert np.abs(log_q_unit - stored).max() > 1.0
    with pytest.raises(ConfigError, match="prior-scale"):
        sample_run(other, 5, prior_scale=0.0)
