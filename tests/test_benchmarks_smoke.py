"""Smoke runs of the benchmark command lines: they must run end to end on tiny sizes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_linear_layers_benchmark_smoke():
    out = run("benchmarks/linear_layers.py", "--sizes", "16", "48", "--budget", "0.01")
    assert "std/P4Inv" in out and "train step" in out
    assert len([line for line in out.splitlines() if line.strip().startswith("48")]) == 4


def test_linear_problems_benchmark_smoke(tmp_path):
    out = run(
        "benchmarks/linear_problems.py",
        "--problems", "pd32", "neg_identity",
        "--losses", "mean",
        "--max-iters", "40",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert "P4Inv N=50" in out and "P4Inv inverse" in out
    for name in ("pd32_mean.png", "neg_identity_mean.png", "neg_identity_residual_det_mean.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_benchmark_arguments_fail_cleanly():
    result = subprocess.run(
        [sys.executable, "benchmarks/linear_layers.py", "--batch", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "--batch" in result.stderr


def test_md_throughput_benchmark_smoke():
    out = run("benchmarks/md_throughput.py", "--ns", "0.01", "--cpu-ns", "0.001")
    assert "Reference" in out and "bare loop" in out and "Reference / CPU" in out


def test_energy_throughput_benchmark_smoke():
    out = run("benchmarks/energy_throughput.py", "--batches", "16", "64", "--repeats", "1",
              "--naive-frames", "20", "--platforms", "Reference")  # fmt: skip
    assert "naive single-Context loop" in out and "batch 64" in out
    assert "TorchEnergy" in out and "float32" in out and "float64" in out


def test_flow_step_benchmark_smoke():
    out = run("benchmarks/flow_step.py", "--repeats", "2", "--batch", "8")
    assert "train step" in out and "735,050" in out and "744,050" in out


def test_densities_2d_benchmark_smoke(tmp_path):
    out = run("benchmarks/densities_2d.py", "--datasets", "moons", "--steps", "12",
              "--no-progress", "--out", str(tmp_path))  # fmt: skip
    assert "RNVP 1,230, P4Inv 1,200, P4Inv via inv 1,200" in out
    assert "| moons" in out and "merges accepted" in out
    assert (tmp_path / "densities_2d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_densities_2d_samplers_have_the_right_shape():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import numpy as np
        from densities_2d import DATASETS
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    for name, sampler in DATASETS.items():
        xy = sampler(rng, 500)
        assert xy.shape == (500, 2) and np.isfinite(xy).all(), name
        assert np.abs(xy).max() < 6, name  # inside the plotted and trained range


def test_runs_table_reads_training_runs(data, tmp_path):
    from p4bg.train import main as train_main

    for name, extra in (("a", []), ("b", ["--lr_schedule=cosine", "--train_stride=2"])):
        train_main(["--preset", "smoke", "--data", str(data), "--out", str(tmp_path / name),
                    "--no-progress", *extra])  # fmt: skip
    out = run("benchmarks/studies/runs_table.py", str(tmp_path / "a"), str(tmp_path / "b"))
    rows = [line for line in out.splitlines() if line.startswith("| a ") or line.startswith("| b ")]
    assert len(rows) == 2 and "| cosine |" in rows[1] and "| 1/2 |" in rows[1]
    assert "best val NLL" in out


def test_preset_walltime_prints_both_plans_and_their_ratio(data):
    out = run("benchmarks/preset_walltime.py", "--data", str(data), "--presets", "smoke", "quick",
              "--steps", "1")  # fmt: skip
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.strip().startswith(("smoke", "quick"))}  # fmt: skip
    assert rows["smoke"][1] == "20" and rows["smoke"][3] == "6" and rows["smoke"][-1] == "1.00"
    assert rows["quick"][1] == "3,000" and float(rows["quick"][-1]) > 1


def test_preset_walltime_takes_overrides(data):
    out = run("benchmarks/preset_walltime.py", "--data", str(data), "--presets", "smoke",
              "smoke:nll_steps=40,mixed_steps=0", "--steps", "1")  # fmt: skip
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("smoke")]
    assert rows[0][1] == "20" and rows[1][0] == "smoke:nll_steps=40,mixed_steps=0"
    assert rows[1][1] == "40" and rows[1][3] == "0"
    result = subprocess.run([sys.executable, "benchmarks/preset_walltime.py", "--presets",
                             "smoke:nll_steps"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode != 0 and "overrides look like NAME:key=value" in result.stderr


def test_spline_primitive_benchmark_smoke():
    out = run("benchmarks/studies/spline_primitive.py", "--batch", "4", "--features", "3",
              "--repeats", "2")  # fmt: skip
    assert "inverse + log-slopes, fwd+bwd" in out and "zuko/p4bg" in out


def test_preset_walltime_names_an_unknown_preset():
    result = subprocess.run([sys.executable, "benchmarks/preset_walltime.py", "--presets", "nope"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "unknown preset(s) ['nope']" in result.stderr


def test_seeds_table_gives_mean_and_spread_over_seeds(tmp_path):
    import json

    reference = {"delta_f": 3.0, "kl_rama_floor": 0.1}
    for seed, ess in enumerate((0.1, 0.2, 0.3)):
        folder = tmp_path / f"reweight_p4inv_s{seed}"
        (folder / "report").mkdir(parents=True)
        model = {"reverse_ess": ess, "reverse_ess_clipped": ess, "energy_shift_finite": 0.5,
                 "median_energy_shift": 0.1, "delta_f_reweighted": 2.9, "log_z_gap": 0.03,
                 "kl_rama_reweighted_matched": 0.15, "high_energy_fraction": 0.0,
                 "n_failed_energies": 0, "bg_value": 1000.0}  # fmt: skip
        (folder / "report" / "metrics.json").write_text(
            json.dumps({"models": {folder.name: model}, "reference": reference})
        )
        (folder / "metrics.csv").write_text("step,val_nll,seconds\n10,-5.0,1800\n20,-4.5,3600\n")
    (tmp_path / "reweight_swap_s0").mkdir()  # no report yet: named, not counted
    out = run("benchmarks/seeds_table.py", str(tmp_path))
    assert "reweight_swap: no report/metrics.json in reweight_swap_s0" in out
    assert "| reverse ESS, unclipped (%) | 20.0 ± 10.0 [10.0, 30.0] |" in out
    assert "| ΔF reweighted − reference (kT) | -0.10 ± 0.00 [-0.10, -0.10] |" in out
    assert "| … ÷ MD floor | 1.50 ± 0.00 [1.50, 1.50] |" in out
    assert "| final − best val NLL (nat) | 0.50 ± 0.00 [0.50, 0.50] |" in out
    assert "| training wall time (h) | 1.00 ± 0.00 [1.00, 1.00] |" in out
    # the first report folder that exists per run, and a choice of models
    (tmp_path / "reweight_p4inv_s0" / "report").rename(tmp_path / "reweight_p4inv_s0" / "tau1.0")
    out = run("benchmarks/seeds_table.py", str(tmp_path), "--models", "reweight_p4inv",
              "--report", "tau1.0", "report")  # fmt: skip
    assert (
        "reweight_p4inv: reweight_p4inv_s0, reweight_p4inv_s1, reweight_p4inv_s2 from report, tau1.0"
        in out
    )
    assert "reweight_swap" not in out and "| 20.0 ± 10.0 [10.0, 30.0] |" in out
    # --fill rewrites the marked tables of a markdown file from their own arguments
    doc = tmp_path / "results.md"
    marker = (f"<!-- ess table: python benchmarks/seeds_table.py {tmp_path} --models "
              "reweight_p4inv --report tau1.0 report -->")  # fmt: skip
    doc.write_text(f"# Results\n\n{marker}\nstale\n<!-- end ess table -->\n\nafter\n")
    out = run("benchmarks/seeds_table.py", "--fill", str(doc))
    assert "1 table(s) rewritten" in out
    text = doc.read_text()
    assert "stale" not in text and text.startswith(f"# Results\n\n{marker}\n| metric |")
    assert "| 20.0 ± 10.0 [10.0, 30.0] |" in text and text.endswith(
        "<!-- end ess table -->\n\nafter\n"
    )
    doc.write_text("no tables here\n")
    result = subprocess.run([sys.executable, "benchmarks/seeds_table.py", "--fill", str(doc)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0 and "no '<!-- NAME table" in result.stderr


def test_md_vs_md_compares_datasets(data):
    """Each dataset's ΔF and floor, and the cross KL; a dataset against itself is its floor."""
    out = run("benchmarks/studies/md_vs_md.py", str(data), str(data), "--max-frames", "500")
    name = data.name
    rows = [line for line in out.splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 4, out  # two in the ΔF table, two in the KL matrix
    assert "(1.00×) | " in rows[2] and rows[2].count("(1.00×)") == 2
    assert "every" in rows[0] and "±" in rows[0]


def test_train_step_compare_smoke(data):
    """Both checkouts (here HEAD against itself) run and the table has every row."""
    out = run("benchmarks/studies/train_step_compare.py", "--base", "HEAD", "--data", str(data),
              "--steps", "1", "--batch", "8", "--rounds", "1")  # fmt: skip
    assert "base/here" in out
    for model in ("swap", "p4inv"):
        for step in ("NLL", "mixed"):
            assert re.search(rf"^\s+{model}\s+{step}\s+[\d.]+\s+[\d.]+\s+[\d.]+x", out, re.M)


def test_cuda_mixed_step_smoke(data):
    """Prepared for a lent GPU; on the CPU it times both energies and reports no sync counts."""
    out = run("benchmarks/cuda_mixed_step.py", "--data", str(data), "--steps", "1", "--batch",
              "8", "--device", "cpu")  # fmt: skip
    assert re.search(r"^\s+torch\s+[\d.]+\s+n/a", out, re.M)
    assert re.search(r"^\s+openmm\s+[\d.]+\s+n/a", out, re.M)


def test_train_step_ddp_smoke(data):
    out = run("benchmarks/train_step.py", "--data", str(data), "--ddp", "--steps", "1",
              "--batch", "8", "--models", "p4inv", "--couplings", "rnvp", "--energies",
              "torch")  # fmt: skip
    rows = [line.split() for line in out.splitlines() if line.startswith("  ") and "x" in line]
    assert [r[0] for r in rows[1:]] == ["1", "2", "2", "1"], out  # 1, 2 (same global), 2, python


def test_sample_throughput_smoke(data, tmp_path):
    from p4bg.train import main as train_main

    run_dir = tmp_path / "run"
    train_main(["--preset", "smoke", f"--data={data}", f"--out={run_dir}", "--no-progress",
                "--nll_steps=4", "--mixed_steps=0"])  # fmt: skip
    out = run("benchmarks/sample_throughput.py", "--run", str(run_dir), "--n", "64", "--batch",
              "32", "--rounds", "1")  # fmt: skip
    assert "2 processes (torchrun, 1 thread each)" in out
    assert not (run_dir / "samples.npz").exists()  # the run's own folder is never sampled into


def test_every_benchmark_is_in_the_index():
    """docs/benchmarks.md names every script of benchmarks/ and benchmarks/studies/."""
    index = (ROOT / "docs" / "benchmarks.md").read_text()
    scripts = [p for folder in ("benchmarks", "benchmarks/studies")
               for p in sorted((ROOT / folder).glob("*")) if p.suffix in (".py", ".sh")]  # fmt: skip
    assert scripts
    missing = [p.name for p in scripts if f"`{p.name}" not in index]
    assert not missing, f"not in docs/benchmarks.md: {missing}"


def test_benchmark_system_smoke(tmp_path):
    """benchmarks/benchmark_system.py end to end on the tetrapeptide at tiny sizes: every step,
    the report, the energy evaluations; a rerun finds every step done."""
    import json

    args = ("benchmarks/benchmark_system.py", "alanine_tetrapeptide", "--smoke", "--samples",
            "200", "--workers", "1", "--out", str(tmp_path / "out"), "--data-root",
            str(tmp_path / "data"))  # fmt: skip
    out = run(*args)
    assert "analyze:" in out
    metrics = json.loads((tmp_path / "out" / "report" / "metrics.json").read_text())
    assert list(metrics["residues"]) == ["ALA2", "ALA3", "ALA4"]
    counts = metrics["energy_evaluations"]
    assert counts["sampling"] == 200 and counts["generator, all"] > counts["600 K MD"] > 0
    assert counts["300 K reference (replica exchange, every temperature)"] > 0
    assert set(metrics["bench_seconds"]) == {"reference", "data", "600K", "300K", "samples",
                                             "analyze"}  # fmt: skip
    again = run(*args)
    assert again.count("done before") == 6
    # its ESS against its cost: the chain bg600 -> bg300, the MD of bg600's data included
    table = run(
        "benchmarks/ess_budget.py",
        str(tmp_path / "out" / "bg300"),
        "--labels",
        "smoke",
        "--out",
        str(tmp_path / "budget.png"),
        "--json",
        str(tmp_path / "budget.json"),
    )
    row = json.loads((tmp_path / "budget.json").read_text())["smoke"]
    assert "| smoke |" in table and (tmp_path / "budget.png").stat().st_size > 1000
    assert row["evaluations"]["600 K MD"] == counts["600 K MD"] and row["n_samples"] == 200
    assert row["evaluations"]["generator, all"] == counts["generator, all"]


def test_benchmark_system_best_recipe_is_the_spline_route_on_100_ns(tmp_path):
    """--recipe best: 100 ns of 600 K MD into its own dataset, presets spline then spline300
    from that run, the same reference as the demo recipe's."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import benchmark_system
    finally:
        sys.path.pop(0)
    best = benchmark_system.commands("alanine_tetrapeptide", tmp_path / "o", 0, 1, 100,
                                     tmp_path, False, "best")  # fmt: skip
    demo = benchmark_system.commands("alanine_tetrapeptide", tmp_path / "o", 0, 1, 100,
                                     tmp_path, False)  # fmt: skip
    assert best["reference"] == demo["reference"]
    data = best["data"]
    assert data[data.index("--ns") + 1] == "100" and data[data.index("--out") + 1] == str(
        tmp_path / "alanine_tetrapeptide_600K_100ns"
    )
    assert demo["data"][demo["data"].index("--ns") + 1] == "4"
    assert (
        "spline" in best["600K"]
        and f"--data={tmp_path}/alanine_tetrapeptide_600K_100ns" in (best["600K"])
    )
    assert "spline300" in best["300K"] and f"--init={tmp_path / 'o' / 'bg600'}" in best["300K"]
    assert "demo600" in demo["600K"] and "demo300" in demo["300K"]
    # the ff96 dipeptide steps 1 fs: 40 ns, in a dataset named for its length
    ff96 = benchmark_system.commands("alanine_dipeptide_ff96", tmp_path / "o", 0, 1, 100,
                                     tmp_path, False, "best")["data"]  # fmt: skip
    assert ff96[ff96.index("--ns") + 1] == "40"
    assert ff96[ff96.index("--out") + 1] == str(tmp_path / "alanine_dipeptide_ff96_600K_40ns")
    # an independent reference: its own seed, dataset, length, report and step markers
    own = benchmark_system.commands("alanine_tetrapeptide", tmp_path / "o", 0, 1, 100,
                                    tmp_path, False, "best", 7, 3.5)  # fmt: skip
    ref = own["reference"]
    assert ref[ref.index("--seed") + 1] == "7" and ref[ref.index("--ns") + 1] == "3.5"
    assert ref[ref.index("--out") + 1] == str(tmp_path / "alanine_tetrapeptide_300K_remd_seed7")
    assert demo["reference"][demo["reference"].index("--seed") + 1] == "0"
    analyze = own["analyze"]
    assert analyze[analyze.index("--out") + 1] == str(tmp_path / "o" / "report_ref_seed7")
    assert analyze[analyze.index("--reference") + 1] == ref[ref.index("--out") + 1]
    assert own["600K"] == best["600K"] and own["data"] == best["data"]
    marker = benchmark_system.step_marker
    assert marker(tmp_path, "reference", 7).name == "reference_ref_seed7"
    assert marker(tmp_path, "600K", 7).name == "600K"
    assert marker(tmp_path, "reference").name == "reference"


def test_densities_2d_schedule_smoke(tmp_path):
    """The batched full-schedule runner at 16 steps: two kinds, a rerun that finds the work
    done, the report's table and figure."""
    common = ("--datasets", "moons", "rings", "--seeds", "0", "1", "--steps", "16",
              "--checkpoint-every", "8", "--out", str(tmp_path))  # fmt: skip
    out = run("benchmarks/densities_2d_schedule.py", "--models", "RNVP", "P4Inv", *common)
    assert "RNVP: done" in out and "P4Inv: done" in out
    result = __import__("json").loads((tmp_path / "P4Inv" / "result.json").read_text())
    assert set(result["models"]) == {"moons/0", "moons/1", "rings/0", "rings/1"}
    assert result["models"]["moons/0"]["merges"]["attempts"] == 200  # one event, 200 layers
    again = run("benchmarks/densities_2d_schedule.py", "--models", "RNVP", *common, "--report")
    assert "continuing at step 16 of 16" in again and "| moons |" in again
    assert "lowest mean test NLL" in again and "merges" in again
    assert (tmp_path / "densities_2d_schedule.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_densities_2d_speed_smoke():
    out = run("benchmarks/densities_2d_speed.py", "--models", "RNVP", "--seeds", "1",
              "--steps", "2")  # fmt: skip
    assert "| RNVP |" in out and "speed-up" in out and "all kinds, one core" in out
