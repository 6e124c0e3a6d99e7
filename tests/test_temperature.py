"""A target temperature of its own: training (annealing phase, records), sampling and analysis
at another temperature than the data's, and the mismatches that are refused."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import stop_after

from p4bg.analyze import main as analyze_main
from p4bg.config import PRESETS, ConfigError, TrainConfig, apply_overrides, load_toml
from p4bg.remd import main as remd_main
from p4bg.sampling import sample_run
from p4bg.train import main, resolve_config
from p4bg.training import Trainer
from p4bg.training.schedules import (
    anneal_ladder,
    anneal_refills,
    anneal_temperature,
    learning_rate,
)

ANNEAL = {"target_temperature": 300.0, "anneal_steps": 8, "anneal_stages": 2,
          "anneal_samples": 64}  # fmt: skip


def smoke_config(data: Path, out: Path, **changes) -> TrainConfig:
    config = apply_overrides(TrainConfig(), PRESETS["smoke"], "smoke")
    return apply_overrides(config, {"data": str(data), "out": str(out), **changes}, "test")


@pytest.fixture(scope="module")
def annealed(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "annealed"
    main(["--preset", "smoke", "--data", str(data), "--out", str(out), "--no-progress",
          *[f"--{k}={v}" for k, v in ANNEAL.items()]])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def remd_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("md") / "remd300"
    remd_main(["--ns", "0.01", "--chains", "2", "--n-temperatures", "3",
               "--exchange-every-ps", "0.05", "--equilibration-ps", "1", "--platform",
               "Reference", "--no-progress", "--out", str(out)])  # fmt: skip
    return out


def test_anneal_ladder_ends_at_the_target():
    config = apply_overrides(TrainConfig(), {"nll_steps": 10, "mixed_steps": 0,
                                             **ANNEAL}, "test")  # fmt: skip
    temps = config.temperatures()
    assert anneal_ladder(config, temps) == pytest.approx([math.sqrt(600 * 300), 300.0])
    assert [anneal_temperature(config, temps, s) for s in (10, 13, 14, 17)] == pytest.approx(
        [math.sqrt(600 * 300)] * 2 + [300.0] * 2
    )
    assert config.total_steps == 18


def test_anneal_final_decay_spans_the_last_stage_only():
    # 10 NLL steps, then 7 annealing steps in 3 stages: stage starts 10, 13, 15 (ceil(2·7/3) = 5)
    config = apply_overrides(TrainConfig(), {"nll_steps": 10, "mixed_steps": 0, "nll_lr": 1e-3,
                                             **ANNEAL, "anneal_steps": 7, "anneal_stages": 3,
                                             "anneal_lr": 4e-4, "lr_final_factor": 0.1,
                                             "anneal_final_decay": True}, "test")  # fmt: skip
    temps = config.temperatures()
    last = [s for s in range(10, 17) if anneal_temperature(config, temps, s) == 300.0]
    assert last == [15, 16]
    lrs = [learning_rate(config, s) for s in range(17)]
    assert lrs[:10] == [1e-3] * 10 and lrs[10:15] == [4e-4] * 5
    assert lrs[15:] == pytest.approx([4e-4, 4e-5])  # cosine over the stage's 2 steps
    # off by default; a cosine schedule decays the whole phase as before
    plain = apply_overrides(config, {"anneal_final_decay": False}, "test")
    assert [learning_rate(plain, s) for s in range(10, 17)] == [4e-4] * 7
    cosine = apply_overrides(config, {"lr_schedule": "cosine"}, "test")
    assert learning_rate(cosine, 10) == pytest.approx(4e-4)
    assert learning_rate(cosine, 13) == pytest.approx(4e-4 * (0.1 + 0.9 * 0.5))


def test_target_temperature_configuration_errors(data, tmp_path):
    with pytest.raises(ConfigError, match="target_temperature"):
        smoke_config(data, tmp_path, target_temperature=-1.0).validate()
    with pytest.raises(ConfigError, match="anneal_steps = 5 needs a target_temperature"):
        smoke_config(data, tmp_path, anneal_steps=5).validate()
    with pytest.raises(ConfigError, match="anneal_stages"):
        smoke_config(data, tmp_path, **{**ANNEAL, "anneal_stages": 9}).validate()
    # a new run records the target's temperature itself, the data's when none is given
    flags = {"preset": "smoke", "config": None, "resume": None}
    assert resolve_config(flags, {"data": str(data)}).target_temperature == 600.0
    assert resolve_config(flags, {"target_temperature": "300"}).target_temperature == 300.0


def test_annealing_run_records_both_temperatures(annealed):
    saved = load_toml(annealed / "config.toml")
    assert saved["temperature"] == 600.0 and saved["target_temperature"] == 300.0
    state = torch.load(annealed / "checkpoint.pt", weights_only=False)
    assert state["temperature_K"] == 600.0 and state["target_temperature_K"] == 300.0
    assert state["step"] == 20 + 6 + 8
    with (annealed / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["phase"] == "anneal"]
    assert rows and float(rows[-1]["anneal_temperature"]) == 300.0
    assert all(0 < float(r["anneal_ess"]) <= 1 for r in rows)
    log = (annealed / "train.log").read_text()
    assert "at 300 K" in log and "annealing at 300 K" in log
    assert "T=300.0 K" in log  # the target energy


def test_resume_in_the_annealing_phase_is_exact(data, tmp_path):
    reference = Trainer(smoke_config(data, tmp_path / "a", **ANNEAL), progress=False)
    reference.run()
    interrupted = Trainer(smoke_config(data, tmp_path / "b", **ANNEAL), progress=False)
    stop_after(interrupted, 29)  # in the anneal phase
    interrupted.run()
    resumed = Trainer(smoke_config(data, tmp_path / "b", **ANNEAL), resume=True, progress=False)
    assert resumed.step == 29 and resumed.phase(29) == "anneal"
    resumed.run()
    for (name, a), (_, b) in zip(
        reference.flow.state_dict().items(), resumed.flow.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="target_temperature"):
        Trainer(smoke_config(data, tmp_path / "b", **{**ANNEAL, "target_temperature": 400.0}),
                resume=True, progress=False)  # fmt: skip


REUSED = {**ANNEAL, "anneal_refill_every": 3}


def test_reused_draws_resume_exactly_and_every_evaluation_is_counted(data, tmp_path):
    """Draws reused for 3 steps: 34 smoke steps are 20 NLL, 6 mixed, then two stages of 4
    annealing steps (26-29 at 424 K, 30-33 at 300 K), so fresh draws at 26, 29 (3 steps on),
    30 (a new stage) and 33. Stopped after step 28, the run resumes from the saved draws of
    step 26 and ends bit for bit as the uninterrupted one, with the same counts: the mixed
    phase's KL batches (6 × 32), four annealing draws (4 × 64) and four validations at steps
    10, 20, 30 and 34 (4 × 64)."""
    reference = Trainer(smoke_config(data, tmp_path / "a", **REUSED), progress=False)
    reference.run()
    expected = {"mixed": 6 * 32, "anneal": 4 * 64, "validation": 4 * 64}
    assert reference.evaluations == expected
    assert anneal_refills(reference.config) == 4  # the plan's count, as preset_walltime uses
    assert anneal_refills(smoke_config(data, tmp_path / "c", **ANNEAL)) == 8
    interrupted = Trainer(smoke_config(data, tmp_path / "b", **REUSED), progress=False)
    stop_after(interrupted, 28)
    interrupted.run()
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert saved["anneal_buffer"]["step"] == 26 and len(saved["anneal_buffer"]["x"]) == 64
    assert saved["evaluations"] == {"mixed": 192, "anneal": 64, "validation": 128}
    resumed = Trainer(smoke_config(data, tmp_path / "b", **REUSED), resume=True, progress=False)
    resumed.run()
    for (name, a), (_, b) in zip(
        reference.flow.state_dict().items(), resumed.flow.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert resumed.evaluations == expected
    with (tmp_path / "b" / "metrics.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    assert {k: int(last[f"evaluations_{k}"]) for k in expected} == expected


def test_fresh_draws_every_step_are_counted(annealed):
    """The default (anneal_refill_every = 1) draws anneal_samples at each of the 8 steps."""
    state = torch.load(annealed / "checkpoint.pt", weights_only=False)
    assert state["evaluations"] == {"mixed": 6 * 32, "anneal": 8 * 64, "validation": 4 * 64}


def test_generator_evaluations_read_the_counts_and_agree_with_the_arithmetic(
    annealed, data, tmp_path
):
    """The cost table reads the trainer's counts from metrics.csv; for a run from before them
    it falls back on its configuration's arithmetic, which must give the same numbers."""
    import shutil

    from p4bg.demo_report import generator_evaluations

    counted = generator_evaluations(data, [annealed], 10)
    assert counted["annealing"] == 8 * 64 and counted["validation"] == 4 * 64
    assert counted["energy phase (KL term)"] == 6 * 32 and counted["sampling"] == 10
    old = tmp_path / "old"
    shutil.copytree(annealed, old)
    with (old / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in rows[0] if not c.startswith("evaluations_")]
    with (old / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    assert generator_evaluations(data, [old], 10) == counted


def test_anneal_batch_resamples_by_the_boltzmann_weights(data, tmp_path):
    """With a target energy that is +inf except where φ > 0 (a failed evaluation elsewhere),
    every resampled frame has φ > 0, and the ESS is that share of the draws."""
    from analysis.geometry import dihedral
    from p4bg.systems import load_system

    atoms = load_system("alanine_dipeptide").phi_atoms

    def target(x):
        phi = dihedral(x.detach().double().reshape(len(x), -1, 3).numpy(), atoms)
        return torch.where(torch.from_numpy(phi > 0), 0.0, math.inf).to(x.dtype)

    trainer = Trainer(smoke_config(data, tmp_path / "w", **{**ANNEAL, "anneal_samples": 512}),
                      progress=False, energy=target)  # fmt: skip
    x, ess = trainer.anneal_batch(300.0)
    phi = dihedral(x.double().reshape(len(x), -1, 3).numpy(), atoms)
    assert (phi > 0).all()
    assert 0 < float(ess) < 0.5
    assert trainer.flush_counters()["energy_failures"] > 256


@pytest.mark.parametrize("temperature", [600.0, 424.26, 300.0])
def test_annealing_weights_resample_the_boltzmann_density_of_the_stage(temperature):
    """Proposals x ~ q = N(0, 1.5²) with their exact log q; the target's reduced energy at 300 K
    is u(x) = x²/2, so the Boltzmann density at T is N(0, T/300). The resampled batch must have
    that variance: a missing temperature factor gives 1 whatever T, a missing −log q gives
    (1/2.25 + 300/T)⁻¹ (0.78 at 424 K, 0.69 at 300 K), both far outside the tolerance."""
    from p4bg.training.objective import annealing_log_weights, resample

    g = torch.Generator().manual_seed(5)
    x = 1.5 * torch.randn(400_000, generator=g, dtype=torch.float64)
    log_q = -0.5 * (x / 1.5) ** 2 - math.log(1.5 * math.sqrt(2 * math.pi))
    u_300 = 0.5 * x**2
    log_w = annealing_log_weights(u_300, log_q, 300.0, temperature)
    idx, ess, ok = resample(log_w, 200_000, torch.Generator().manual_seed(6))
    assert bool(ok) and 0.3 < float(ess) <= 1.0
    variance = float(x[idx].var())
    assert variance == pytest.approx(temperature / 300.0, rel=0.02)
    # failed evaluations (u = +inf) and NaN get weight 0, never a finite stand-in
    u_bad = u_300.clone()
    u_bad[:1000] = math.inf
    u_bad[1000:2000] = math.nan
    log_w = annealing_log_weights(u_bad, log_q, 300.0, temperature)
    assert torch.isneginf(log_w[:2000]).all() and torch.isfinite(log_w[2000:]).all()
    idx, _, ok = resample(log_w, 10_000, torch.Generator().manual_seed(7))
    assert bool(ok) and int(idx.min()) >= 2000
    # no usable weight at all: flagged, so the caller discards the batch
    _, _, ok = resample(torch.full((10,), -math.inf, dtype=torch.float64), 4,
                        torch.Generator().manual_seed(8))  # fmt: skip
    assert not bool(ok)


def test_samples_are_weighted_at_the_target_and_record_both(annealed, tmp_path):
    info = sample_run(annealed, 40, batch=40, progress=False)
    assert info["temperature_K"] == 300.0 and info["data_temperature_K"] == 600.0
    assert math.isclose(info["kT_kJ_per_mol"], 8.314462618e-3 * 300.0)
    with np.load(annealed / "samples.npz") as s:
        u300 = s["u"].copy()
    info = sample_run(annealed, 40, batch=40, progress=False, target_temperature=600.0)
    assert info["temperature_K"] == 600.0 and info["run_target_temperature_K"] == 300.0
    with np.load(annealed / "samples.npz") as s:
        np.testing.assert_allclose(s["u"], u300 / 2.0, rtol=1e-9)  # the same draws, half 1/kT
    with pytest.raises(ConfigError, match="target-temperature"):
        sample_run(annealed, 4, progress=False, target_temperature=-3.0)


def test_analyze_refuses_samples_at_another_temperature_and_reads_a_remd_reference(
    annealed, data, remd_reference, tmp_path, capsys
):
    sample_run(annealed, 40, batch=40, progress=False)  # weighted at 300 K
    with pytest.raises(SystemExit):  # a 600 K reference for 300 K samples
        analyze_main([str(annealed), "--reference", str(data), "--out", str(tmp_path / "r1"),
                      "--n-workers", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert "at 300.0 K, the reference is at 600 K" in err
    assert "--target-temperature 600" in err
    out = tmp_path / "r2"
    analyze_main([str(annealed), "--reference", str(remd_reference), "--split", "all", "--out",
                  str(out), "--n-workers", "1"])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["info"]["temperature_K"] == 300.0
    model = metrics["models"]["annealed"]
    assert model["temperature_K"] == 300.0 and model["data_temperature_K"] == 600.0
    ref = metrics["reference"]
    meta = json.loads((remd_reference / "metadata.json").read_text())
    assert ref["delta_f"] == meta["mbar"]["delta_f"] and "MBAR" in ref["delta_f_source"]
    assert "delta_f_frames" in ref
    # the MD cost of a 300 K frame counts every temperature of the ladder
    assert metrics["info"]["md_timing"]["md_steps_per_frame"] == 3 * meta["steps_per_frame"]
