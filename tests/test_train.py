"""python -m p4bg.train: smoke training, merges, exact resume, configuration errors."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import stop_after

from p4bg.config import PRESETS, ConfigError, TrainConfig, apply_overrides, load_toml, to_toml
from p4bg.train import main, parse_args, resolve_config
from p4bg.training import Trainer, host_row
from p4bg.training.plan import energy_plan

ROOT = Path(__file__).resolve().parents[1]


def smoke_config(data: Path, out: Path, **changes) -> TrainConfig:
    config = apply_overrides(TrainConfig(), PRESETS["smoke"], "smoke")
    return apply_overrides(config, {"data": str(data), "out": str(out), **changes}, "test")


def read_metrics(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    ("flow", "coupling"),
    [("p4inv", "rnvp"), ("swap", "rnvp"), ("p4inv", "spline"), ("swap", "spline")],
)
def test_smoke_training_writes_a_complete_run(data, tmp_path, flow, coupling):
    main(["--preset", "smoke", f"--flow={flow}", f"--coupling={coupling}", "--data", str(data),
          "--out", str(tmp_path / "run"), "--no-progress"])  # fmt: skip
    run = tmp_path / "run"
    for name in ("config.toml", "checkpoint.pt", "metrics.csv", "train.log"):
        assert (run / name).is_file(), name
    saved = apply_overrides(TrainConfig(), load_toml(run / "config.toml"), "saved")
    assert saved.mixing == flow and saved.nll_steps == 20 and saved.data == str(data)
    assert saved.coupling == coupling
    rows = read_metrics(run)
    assert int(rows[-1]["step"]) == 26 and rows[-1]["phase"] == "mixed"
    assert rows[-1]["val_nll"] and rows[-1]["mean_u"]
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 26 and state["config"]["mixing"] == flow
    # the cost: 6 mixed steps of 32 KL draws, 3 validations (steps 10, 20, 26) of 64 samples
    assert state["evaluations"] == {"mixed": 192, "anneal": 0, "validation": 192}
    assert int(rows[-1]["evaluations_mixed"]) == 192
    assert "machine: " in (run / "train.log").read_text()  # what its wall times were on
    if flow == "p4inv":
        merged = [r for r in rows if r["merges_accepted"]]
        assert merged and all(float(r["max_residual"]) < 1e-8 for r in merged)
        assert any(int(r["merges_accepted"]) > 0 for r in merged)


def test_nll_decreases(data, tmp_path):
    config = smoke_config(data, tmp_path / "run", nll_steps=120, mixed_steps=0, log_every=1,
                          val_every=60, checkpoint_every=120, merge_every=10)  # fmt: skip
    Trainer(config, progress=False).run()
    losses = [float(r["loss"]) for r in read_metrics(tmp_path / "run")]
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 1.0


@pytest.mark.parametrize("coupling", ["rnvp", "spline"])
def test_resume_gives_identical_parameters(data, tmp_path, coupling):
    reference = Trainer(smoke_config(data, tmp_path / "a", coupling=coupling), progress=False)
    reference.run()

    interrupted = Trainer(smoke_config(data, tmp_path / "b", coupling=coupling), progress=False)
    stop_after(interrupted, 13)
    interrupted.run()
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 13
    resumed = Trainer(smoke_config(data, tmp_path / "b", coupling=coupling), resume=True,
                      progress=False)  # fmt: skip
    assert resumed.step == 13
    resumed.run()
    for (name, a), (_, b) in zip(
        reference.flow.state_dict().items(), resumed.flow.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    steps = [int(r["step"]) for r in read_metrics(tmp_path / "b")]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicated rows


def test_dry_run_prints_model_and_paper_parameter_counts(data, capsys):
    main(["--preset", "paper", "--data", str(data), "--dry-run"])
    out = capsys.readouterr().out
    assert "RNVP 735,050, P4Inv 9,000 (50 layers), total 744,050" in out
    assert "40,000 NLL steps at lr 0.001, then 2,000 mixed steps at lr 1e-05" in out


@pytest.mark.parametrize(("preset", "mixing"), [("spline", "p4inv"), ("spline_swap", "swap")])
def test_dry_run_of_the_spline_presets(data, capsys, preset, mixing):
    main(["--preset", preset, "--data", str(data), "--dry-run"])
    out = capsys.readouterr().out
    cfg = apply_overrides(TrainConfig(), PRESETS[preset], preset)
    assert f"(spline coupling, {mixing} mixing, spline coupling, {mixing} mixing)" in out
    per_coupling = (30 * cfg.hidden + cfg.hidden + cfg.hidden**2 + cfg.hidden
                    + (cfg.hidden + 1) * 30 * (3 * cfg.spline_bins - 1))  # fmt: skip
    n_p4 = 2 * cfg.n_blocks if mixing == "p4inv" else 0
    assert (f"parameters: spline {2 * cfg.n_blocks * per_coupling:,}, P4Inv {180 * n_p4:,} "
            f"({n_p4} layers)") in out  # fmt: skip
    # maximum likelihood only (docs/results.md §7); --mixed_steps brings reweight's phase back
    assert (
        "16,000 NLL steps at lr 0.001 and no energy phase (cosine to x0.01); batch 256; Adam\n"
        in out
    )
    main(["--preset", preset, "--data", str(data), "--mixed_steps=2000", "--dry-run"])
    out = capsys.readouterr().out
    assert (
        "then 2,000 mixed steps at lr 0.0001 (cosine to x0.01); w_e/w_l = 0.25 reached over "
        "200 steps; batch 256, KL batch 256; Adam, moments cleared at the mixed phase"
    ) in out


def test_configuration_errors(data, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'batchsize'"):
        resolve_config(*parse_args(["--batchsize=3"]))
    with pytest.raises(ConfigError, match="key 'nll_steps' needs a int"):
        resolve_config(*parse_args(["--nll_steps=many"]))
    with pytest.raises(ConfigError, match="mixing must be"):
        resolve_config(*parse_args(["--flow=glow"]))
    with pytest.raises(ConfigError, match="--preset"):
        parse_args(["--preset", "fast"])
    assert resolve_config(*parse_args(["--nll_steps=4e4", "--batch-size", "8"])).nll_steps == 40_000
    assert parse_args(["--energy_high", "-1e3", "--penalty", "-0.5"])[1] == {
        "energy_high": "-1e3",
        "penalty": "-0.5",
    }
    assert resolve_config(*parse_args(["--seed=9007199254740993"])).seed == 9007199254740993
    with pytest.raises(ConfigError, match="finite"):
        resolve_config(*parse_args(["--energy_weight_ratio=inf"]))
    with pytest.raises(ConfigError, match="--dry-run: ignored explicit argument 'false'"):
        parse_args(["--dry-run=false"])
    with pytest.raises(ConfigError, match="--out: expected one argument"):
        parse_args(["--out", "--no-progress"])
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        parse_args(["stray"])
    bad = tmp_path / "bad.toml"
    bad.write_text("nll_lr = 'fast'\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: key 'nll_lr' needs a float"):
        resolve_config(*parse_args(["--config", str(bad)]))
    assert load_toml_round_trip()


def load_toml_round_trip() -> bool:
    config = apply_overrides(TrainConfig(), {"out": 'runs/"quoted"', "penalty": 0.1}, "test")
    path = Path(__import__("tempfile").mkdtemp()) / "c.toml"
    path.write_text(to_toml(config))
    return apply_overrides(TrainConfig(), load_toml(path), "file") == config


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p4bg.train", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_cli_errors_name_the_problem(data, tmp_path):
    r = run_cli(
        "--preset", "smoke", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")
    )
    assert r.returncode == 2 and "python -m p4bg.simulate --out" in r.stderr
    r = run_cli("--preset", "smoke", "--lr=0.1")
    assert r.returncode == 2 and "unknown key 'lr'" in r.stderr
    r = run_cli("--resume", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "config.toml" in r.stderr
    run = tmp_path / "done"
    main(["--preset", "smoke", "--data", str(data), "--out", str(run), "--no-progress"])
    r = run_cli("--preset", "smoke", "--data", str(data), "--out", str(run))
    assert r.returncode == 2 and "--resume" in r.stderr
    r = run_cli("--resume", str(run), "--batch_size=4")
    assert (
        r.returncode == 2 and "only compile, device, energy, n_workers may be changed" in r.stderr
    )
    r = run_cli("--resume", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "no run there" in r.stderr
    toml = run / "config.toml"
    toml.write_text(toml.read_text().replace("hidden = 16", "hidden = 17"))
    r = run_cli("--resume", str(run), "--device=cpu")
    assert r.returncode == 2 and "differs from the checkpoint in ['hidden']" in r.stderr


def test_train_step_benchmark_smoke(data):
    result = subprocess.run([sys.executable, "benchmarks/train_step.py", "--data", str(data), "--steps", "1",
                             "--batch", "8", "--workers", "1"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "p4inv" in result.stdout and "energy share" in result.stdout
    rows = [line.split()[:2] for line in result.stdout.splitlines() if line.startswith("  ")]
    for combination in (
        ["rnvp", "swap"],
        ["rnvp", "p4inv"],
        ["spline", "swap"],
        ["spline", "p4inv"],
    ):
        assert combination in rows, result.stdout


def test_init_starts_from_another_runs_model(data, tmp_path):
    first = Trainer(smoke_config(data, tmp_path / "a"), progress=False)
    first.run()
    config = smoke_config(data, tmp_path / "b", init=str(tmp_path / "a"), nll_steps=0,
                          mixed_steps=2, seed=3)  # fmt: skip
    tuned = Trainer(config, progress=False)
    assert tuned.step == 0
    for name, tensor in first.flow.state_dict().items():
        assert torch.equal(tensor, tuned.flow.state_dict()[name]), name
    assert torch.equal(first.coordinates.pca_std, tuned.coordinates.pca_std)
    tuned.run()
    assert tuned.step == 2
    with pytest.raises(ConfigError, match="differs in"):
        Trainer(smoke_config(data, tmp_path / "c", init=str(tmp_path / "a"), hidden=8),
                progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match=r"no checkpoint\.pt"):
        Trainer(smoke_config(data, tmp_path / "d", init=str(tmp_path / "none")), progress=False)


def test_resume_accepts_checkpoints_from_before_a_config_key_existed(data, tmp_path):
    """A key added to TrainConfig later (e.g. init) is its default for old checkpoints."""
    first = Trainer(smoke_config(data, tmp_path / "a", mixed_steps=0, nll_steps=4), progress=False)
    first.run()
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    del state["config"]["init"]
    torch.save(state, tmp_path / "a" / "checkpoint.pt")
    config = resolve_config(*parse_args(["--resume", str(tmp_path / "a")]))
    assert Trainer(config, resume=True, progress=False).step == 4


@pytest.mark.parametrize("energy", ["openmm", "torch"])
def test_energy_option_picks_the_target_and_records_it(data, tmp_path, energy):
    from p4bg.energy import OpenMMEnergy, TorchEnergy

    trainer = Trainer(smoke_config(data, tmp_path / "run", energy=energy), progress=False)
    result = trainer.run()
    assert isinstance(trainer.target, TorchEnergy if energy == "torch" else OpenMMEnergy)
    assert math.isfinite(result["val_nll"])
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["config"]["energy"] == energy
    assert (state["energy_platform"] == "torch") == (energy == "torch")
    assert "target energy: " in (tmp_path / "run" / "train.log").read_text()
    trainer.target.close()


def test_energy_option_errors_and_legacy_runs(data, tmp_path):
    import openmm

    with pytest.raises(ConfigError, match="energy must be auto, openmm or torch"):
        resolve_config(*parse_args(["--energy=gpu"]))
    # a run from before the key trained against the OpenMM workers and resumes with them
    first = Trainer(smoke_config(data, tmp_path / "a", mixed_steps=0, nll_steps=4), progress=False)
    first.run()
    toml = tmp_path / "a" / "config.toml"
    toml.write_text("".join(line for line in toml.read_text().splitlines(keepends=True)
                            if not line.startswith("energy =")))  # fmt: skip
    assert resolve_config(*parse_args(["--resume", str(tmp_path / "a")])).energy == "openmm"
    # energy=torch on a System TorchEnergy cannot evaluate fails at the start, by name
    trainer = Trainer(smoke_config(data, tmp_path / "b"), progress=False)
    trainer.system.openmm_system.addForce(openmm.CustomExternalForce("x^2"))
    trainer.config.energy = "torch"
    with pytest.raises(ConfigError, match="CustomExternalForce"):
        energy_plan(trainer.config, trainer.system, trainer.device)


# ------------------------------------------------------------------ recipe and diagnostics
def test_temperature_must_match_the_data(data, tmp_path):
    with pytest.raises(ConfigError, match=r"simulated at 600 K but temperature=300 K"):
        Trainer(smoke_config(data, tmp_path / "run", temperature=300.0), progress=False)
    r = run_cli("--preset", "smoke", "--data", str(data), "--out", str(tmp_path / "x"),
                "--temperature=300")  # fmt: skip
    assert r.returncode == 2 and "--temperature=600" in r.stderr


def test_training_frames_cut_each_replica_block():
    from p4bg.data import training_frames

    train = torch.cat([torch.arange(0, 80), torch.arange(100, 180)]).numpy()
    assert training_frames(train).tolist() == train.tolist()
    half = training_frames(train, fraction=0.5)
    assert half.tolist() == list(range(0, 40)) + list(range(100, 140))
    assert training_frames(train, 0.25, 5).tolist() == [0, 5, 10, 15, 100, 105, 110, 115]


def test_learning_rate_and_energy_weight_schedules():
    from p4bg.training.schedules import energy_weight, learning_rate

    c = apply_overrides(TrainConfig(), {"nll_steps": 101, "mixed_steps": 11, "nll_lr": 1e-3,
                        "mixed_lr": 1e-4, "lr_schedule": "cosine", "lr_final_factor": 0.1,
                        "warmup_steps": 10, "energy_weight_ratio": 1.0,
                        "energy_ramp_steps": 4}, "test")  # fmt: skip
    assert learning_rate(c, 0) == pytest.approx(1e-3 * (1 / 10) * (0.1 + 0.9 * 1.0))
    assert learning_rate(c, 50) == pytest.approx(1e-3 * 0.55)  # half-way: mean of the ends
    assert learning_rate(c, 100) == pytest.approx(1e-4)  # end of the phase: lr × 0.1
    assert learning_rate(c, 101) == pytest.approx(1e-4) and learning_rate(c, 111) == pytest.approx(
        1e-5
    )
    assert [energy_weight(c, s) for s in (100, 101, 102, 104, 111)] == [0.0, 0.125, 0.25, 0.5, 0.5]
    paper = TrainConfig()
    assert {learning_rate(paper, s) for s in (0, 39_999)} == {1e-3}
    assert learning_rate(paper, 40_000) == 1e-5
    assert energy_weight(paper, 40_000) == pytest.approx(0.05 / 1.05)


def test_validation_settings_do_not_change_the_training_trajectory(data, tmp_path):
    a = Trainer(smoke_config(data, tmp_path / "a", val_samples=32), progress=False)
    a.run()
    b = Trainer(smoke_config(data, tmp_path / "b", val_samples=100, val_every=3), progress=False)
    b.run()
    for (name, x), (_, y) in zip(a.flow.state_dict().items(), b.flow.state_dict().items(),
                                 strict=True):  # fmt: skip
        assert torch.equal(x, y), name


def test_validation_diagnostics_and_best_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    Trainer(smoke_config(data, run, weight_decay=0.01, lr_schedule="cosine", warmup_steps=3,
                         kl_batch_size=8, energy_ramp_steps=3, max_grad_norm=10.0,
                         val_samples=10_001), progress=False).run()  # fmt: skip
    rows = [r for r in read_metrics(run) if r["val_nll"]]
    assert len(rows) == 3  # steps 10, 20 and the end
    for r in rows:
        ess, clipped = float(r["val_ess"]), float(r["val_ess_clipped"])
        assert 0 < ess <= 1 and ess <= clipped <= 1
        assert float(r["val_nll_phi_neg"]) == float(r["val_nll_phi_neg"])  # phi < 0 frames exist
        assert float(r["val_logz_reverse"]) < float("inf")
        assert float(r["best_val_nll"]) <= float(r["val_nll"])
    best = torch.load(run / "best.pt", weights_only=False)
    assert best["best"]["val_nll"] == min(float(r["val_nll"]) for r in rows)
    assert best["step"] == best["best"]["step"]
    assert best["temperature_K"] == 600.0 and best["config"]["temperature"] == 600.0
    assert "reverse ESS" in (run / "train.log").read_text()
    # below 10,000 samples clipping the top 1e-4 would touch only the largest weight: not logged
    small = tmp_path / "small"
    Trainer(smoke_config(data, small, val_samples=64), progress=False).run()
    rows = [r for r in read_metrics(small) if r["val_nll"]]
    assert all(r["val_ess"] and not r["val_ess_clipped"] for r in rows)
    assert "clipped" not in (small / "train.log").read_text()


def test_weight_decay_spares_p4inv_and_biases(data, tmp_path):
    from p4bg.nn import P4Inv

    trainer = Trainer(smoke_config(data, tmp_path / "run", weight_decay=0.1), progress=False)
    # the optimizer's decayed tensors: flat buffers whose members are the 2-D weight matrices
    decayed = [q for g in trainer.optimizer.param_groups if g["weight_decay"] > 0
               for q in g["params"]]  # fmt: skip
    members = [p for q in decayed for p, _ in trainer.flat.members.get(id(q), [(q, 0)])]
    p4 = [p for m in trainer.flow.modules() if isinstance(m, P4Inv) for p in m.parameters()]
    assert p4 and not any(p is q for p in p4 for q in members)
    assert members and all(p.ndim == 2 for p in members)
    weights = [p for p in trainer.flow.parameters() if p.ndim == 2 and not any(p is q for q in p4)]
    assert len(members) == len(weights)


def test_failed_energies_are_left_out_of_the_kl_loss():
    from p4bg.flows import build_flow
    from p4bg.generator import BoltzmannGenerator
    from p4bg.nn import Sequential

    class Identity(torch.nn.Module):
        dim = 4

        def forward(self, z):
            return z, z.new_zeros(len(z))

    def target(x):  # the second sample "fails", as OpenMMEnergy reports it: +inf
        u = x.square().sum(1)
        return torch.where(torch.arange(len(x)) == 1, torch.full_like(u, float("inf")), u)

    flow: Sequential = build_flow("swap", 4, 1, 4)
    bg = BoltzmannGenerator(flow, Identity(), target)
    z = torch.randn(3, 4)
    loss, u = bg.reverse_kl(3, z=z)
    x, log_q = bg.generate(z)
    expected = (x.square().sum(1) + log_q)[[0, 2]].mean()
    assert torch.isinf(u[1]) and float(loss.detach()) == pytest.approx(float(expected.detach()))
    loss.backward()  # finite, with gradients
    bg_all_fail = BoltzmannGenerator(flow, Identity(), lambda x: torch.full((len(x),), torch.inf))
    assert torch.isnan(bg_all_fail.reverse_kl(2, z=z[:2])[0])


def test_validation_samples_use_the_sample_prior_scale(data, tmp_path):
    """Validation draws its fresh samples at τ = sample_prior_scale, as p4bg.sample will; the
    validation NLL and the training trajectory stay those of the trained model (τ = 1)."""
    a = Trainer(smoke_config(data, tmp_path / "a", val_samples=64), progress=False)
    a.run()
    b = Trainer(smoke_config(data, tmp_path / "b", val_samples=64, sample_prior_scale=0.5),
                progress=False)  # fmt: skip
    b.run()
    assert b.bg.prior_scale == 1.0  # restored after validation
    for (name, x), (_, y) in zip(a.flow.state_dict().items(), b.flow.state_dict().items(),
                                 strict=True):  # fmt: skip
        assert torch.equal(x, y), name
    ra = [r for r in read_metrics(tmp_path / "a") if r["val_nll"]]
    rb = [r for r in read_metrics(tmp_path / "b") if r["val_nll"]]
    assert [r["val_nll"] for r in ra] == [r["val_nll"] for r in rb]
    assert [r["mean_u"] for r in ra] != [r["mean_u"] for r in rb]
    with pytest.raises(ConfigError, match="sample_prior_scale must be in"):
        resolve_config(*parse_args(["--sample_prior_scale=0"]))


@pytest.mark.parametrize("fresh", [False, True])
def test_mixed_fresh_optimizer_clears_adams_moments_once(data, tmp_path, fresh):
    """With mixed_fresh_optimizer the first mixed step starts Adam anew (step count 1 after
    it); without it (the paper) the moments run on from the NLL phase."""
    config = smoke_config(data, tmp_path / str(fresh), nll_steps=5, mixed_steps=3,
                          mixed_fresh_optimizer=fresh)  # fmt: skip
    trainer = Trainer(config, progress=False)
    param = next(p for p in trainer.flow.parameters() if p.ndim == 2)
    counts = []
    for _ in range(config.total_steps):
        trainer.train_step()
        counts.append(int(trainer.flat.state_of(trainer.optimizer, param)["step"]))
    if fresh:
        assert counts == [1, 2, 3, 4, 5, 1, 2, 3]
    else:
        assert counts == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_non_finite_step_is_skipped_on_the_device_and_counted(data, tmp_path):
    """A NaN loss: the fused optimizer skips the update (parameters and Adam's moments are
    untouched), the step is counted as skipped, and training goes on."""
    trainer = Trainer(smoke_config(data, tmp_path / "run"), progress=False)
    trainer.train_step()
    params = [p.detach().clone() for p in trainer.flow.parameters()]
    state = [trainer.flat.state_of(trainer.optimizer, p) for p in trainer.flow.parameters()]
    moments = [s["exp_avg"].clone() for s in state]
    nll = trainer.objective.nll
    trainer.objective.nll = lambda x: nll(x) * float("nan")
    row = host_row(trainer.train_step())
    trainer.objective.nll = nll
    assert math.isnan(row["loss"])
    for p, before, m in zip(trainer.flow.parameters(), params, moments, strict=True):
        assert torch.equal(p.detach(), before)
        assert torch.equal(trainer.flat.state_of(trainer.optimizer, p)["exp_avg"], m)
    assert trainer.flush_counters()["skipped_steps"] == 1
    trainer.train_step()
    assert not all(
        torch.equal(p.detach(), b) for p, b in zip(trainer.flow.parameters(), params, strict=True)
    )
    assert trainer.flush_counters()["skipped_steps"] == 1


@pytest.mark.parametrize("phase", ["nll", "mixed", "anneal"])
def test_a_training_step_never_reads_a_tensor_on_the_host(data, tmp_path, monkeypatch, phase):
    """The step leaves its values on the device: no .item(), float(), bool(), .tolist() or
    .cpu() of a tensor outside logging and merge events (on a GPU each would wait for the
    device). Checked on the CPU by making those calls raise."""
    anneal = {"mixed_steps": 0, "target_temperature": 300.0, "anneal_steps": 10,
              "anneal_samples": 64}  # fmt: skip
    config = smoke_config(data, tmp_path / phase, energy="torch", nll_steps=3, merge_every=1000,
                          **(anneal if phase == "anneal" else {}))  # fmt: skip
    trainer = Trainer(config, progress=False)
    for _ in range(1 if phase == "nll" else 3):
        trainer.train_step()  # the mixed phase's first step creates the energy
    calls = []

    def forbid(name):
        def call(self, *args, **kwargs):
            calls.append(name)
            raise AssertionError(f"Tensor.{name} in the training step")

        return call

    for name in ("item", "__float__", "__bool__", "__int__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    trainer.train_step()
    trainer.train_step()
    monkeypatch.undo()
    assert calls == []
    assert trainer.phase(trainer.step - 1) == phase


@pytest.mark.slow
def test_compiled_training_matches_eager_and_resumes(data, tmp_path):
    """compile=true trains the same model as eager up to rounding (the graphs have no breaks:
    a break would make compilation silently partial), and a compiled run resumes eagerly."""
    import torch._dynamo

    eager = Trainer(smoke_config(data, tmp_path / "eager"), progress=False)
    compiled = Trainer(smoke_config(data, tmp_path / "compiled", compile=True), progress=False)
    x = compiled.parts.train_x[:16]
    assert torch._dynamo.explain(compiled.bg.nll)(x).graph_break_count == 0
    z = compiled._prior(16, "validation")
    assert torch._dynamo.explain(compiled.bg.generate)(z).graph_break_count == 0
    assert torch._dynamo.explain(compiled.bg.nll_and_generate)(x, z).graph_break_count == 0
    a, b = eager.run(), compiled.run()
    assert a["step"] == b["step"] == eager.config.total_steps
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-2)
    main(["--resume", str(tmp_path / "compiled"), "--no-progress", "--compile=false"])
