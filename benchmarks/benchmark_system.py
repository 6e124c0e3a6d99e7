"""One benchmark system from nothing to its report: 300 K reference, 600 K data, the generator,
100,000 samples, and analyze against the reference (docs/results.md, "Benchmark systems").

    python benchmarks/benchmark_system.py alanine_tetrapeptide
    python benchmarks/benchmark_system.py alanine_tetrapeptide          # again: continues
    python benchmarks/benchmark_system.py alanine_dipeptide_ff96 --only reference data
    python benchmarks/benchmark_system.py alanine_hexapeptide --workers 1
    python benchmarks/benchmark_system.py alanine_tetrapeptide --recipe best     # §7-8's recipe

Steps, each skipped once done (a marker in OUT/done/) and each resumable when killed, since
every command it runs is (`--resume`):

  reference  replica exchange at 300-600 K (p4bg.remd) into data/SYSTEM_300K_remd: the 300 K
             frames are the reference, its MBAR the ΔF of the central residue
  data       600 K MD (p4bg.simulate): the training data
  600K       a spline + P4Inv flow learns the frames by maximum likelihood
  300K       annealed to 300 K on its own reweighted samples
  samples    100,000 conformations at 300 K with energies and weights (p4bg.sample)
  analyze    p4bg.analyze against the reference (--split all): per-residue KLs and ΔF, TICA

Two recipes, the same steps (--recipe):

  demo  the demo's (docs/results.md §10): 4 ns of 600 K MD into data/SYSTEM_600K, presets
        demo600 and demo300; about 15 minutes of generator on one core for alanine dipeptide
  best  the project's best (docs/results.md §7-8): 100 ns of 600 K MD into
        data/SYSTEM_600K_100ns (the ff96 dipeptide, at 1 fs a step: 40 ns into
        data/alanine_dipeptide_ff96_600K_40ns), presets spline (16,000 likelihood steps, 6
        blocks of hidden 128) and spline300; hours per system on one core, resumable across
        sessions

Both share the reference. OUT (default runs/bench/SYSTEM, runs/bench/SYSTEM-best) gets
log.txt (every command and its output), bench.json (wall and CPU seconds of each step, and the
machine) and, from analyze, report/. The energy evaluations each step spent are added to
report/metrics.json under "energy_evaluations".

An independent reference (--reference-seed S, S > 0): replica exchange from its own seed into
data/SYSTEM_300K_remd_seedS (--reference-ns: its length per temperature and chain), and the
same generator analysed against it into OUT/report_ref_seedS. Seed 0 is the reference the
training data's seed also drew its replicas from; issue 29's reports use it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# replica exchange per system: temperatures in the 300-600 K ladder, ns per temperature per chain
REFERENCE = {
    "alanine_dipeptide_ff96": {"n_temperatures": 5, "ns": 2.0},
    "alanine_tetrapeptide": {"n_temperatures": 6, "ns": 5.0},
    "alanine_hexapeptide": {"n_temperatures": 8, "ns": 5.0},
}
STEPS = ("reference", "data", "600K", "300K", "samples", "analyze")
# per recipe: the 600 K data (ns over both replicas; the dataset's name), the two presets
RECIPES = {
    "demo": {"ns": "4", "chunk_frames": "2500", "presets": ("demo600", "demo300")},
    "best": {"ns": "100", "chunk_frames": "12500", "presets": ("spline", "spline300")},
}  # fmt: skip
# The ff96 dipeptide has no constraints, so its MD steps 1 fs: 100 ns would be 1e8 evaluations
# (issue 30's whole budget for this system) and 7 hours of OBC1 on one core. 40 ns still give
# 1,000,000 training frames, the size §6 found near the top of its data study.
BEST_NS = {"alanine_dipeptide_ff96": "40"}


def data_ns(system: str, recipe: str) -> str:
    """ns of 600 K MD (both replicas together) a recipe trains on."""
    return BEST_NS.get(system, RECIPES["best"]["ns"]) if recipe == "best" else RECIPES[recipe]["ns"]


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def training_data(system: str, recipe: str, data_root: Path) -> Path:
    """The 600 K dataset a recipe trains on: SYSTEM_600K (demo), SYSTEM_600K_{ns}ns (best)."""
    return data_root / (f"{system}_600K" if recipe == "demo"
                        else f"{system}_600K_{data_ns(system, recipe)}ns")  # fmt: skip


def reference_dir(system: str, data_root: Path, reference_seed: int = 0) -> Path:
    """The 300 K reference's dataset: SYSTEM_300K_remd (seed 0), SYSTEM_300K_remd_seedS."""
    suffix = f"_seed{reference_seed}" if reference_seed else ""
    return data_root / f"{system}_300K_remd{suffix}"


def report_dir(out: Path, reference_seed: int = 0) -> Path:
    """Where analyze writes: OUT/report against seed 0's reference, else OUT/report_ref_seedS."""
    return out / (f"report_ref_seed{reference_seed}" if reference_seed else "report")


def step_marker(out: Path, name: str, reference_seed: int = 0) -> Path:
    """OUT/done/NAME; the reference and analyze steps of another reference seed have their own."""
    own = reference_seed and name in ("reference", "analyze")
    return out / "done" / (f"{name}_ref_seed{reference_seed}" if own else name)


def commands(
    system: str,
    out: Path,
    seed: int,
    workers: int,
    samples: int,
    data_root: Path,
    smoke: bool,
    recipe: str = "demo",
    reference_seed: int = 0,
    reference_ns: float | None = None,
) -> dict[str, list]:
    """The command of every step (``smoke``: every size tiny, for the tests)."""
    from p4bg.demo import SMOKE

    ref = dict(REFERENCE.get(system, {"n_temperatures": 6, "ns": 5.0}))
    if reference_ns is not None:
        ref["ns"] = reference_ns
    reference = reference_dir(system, data_root, reference_seed)
    data = training_data(system, recipe, data_root)
    bg600, bg300 = out / "bg600", out / "bg300"
    preset600, preset300 = RECIPES[recipe]["presets"]
    md_ns, equilibration = ("0.02", "1") if smoke else (data_ns(system, recipe), "100")
    if smoke:
        ref = {"n_temperatures": 3, "ns": 0.01}

    def train(preset: str, run: Path, stage: str, *extra: str) -> list[str]:
        if (run / "checkpoint.pt").is_file():
            return _python("p4bg.train", "--resume", str(run), "--no-progress")
        tiny = SMOKE[stage] if smoke else ()
        return _python("p4bg.train", "--preset", preset, f"--system={system}", f"--seed={seed}",
                       f"--data={data}", "--out", str(run), "--no-progress", *tiny,
                       *extra)  # fmt: skip

    return {
        "reference": _python(
            "p4bg.remd", "--system", system, "--ns", str(ref["ns"]), "--chains", "2",
            "--n-temperatures", str(ref["n_temperatures"]), "--exchange-every-ps", "0.25",
            "--seed", str(reference_seed), "--workers", str(workers), "--out", str(reference),
            "--resume",
            "--no-progress", "--equilibration-ps", equilibration),
        "data": _python(
            "p4bg.simulate", "--system", system, "--ns", md_ns, "--save-every-ps", "0.04",
            "--replicas", "2", "--workers", str(workers), "--seed", str(seed), "--out",
            str(data), "--resume", "--no-progress", "--equilibration-ps", equilibration,
            "--chunk-frames", RECIPES[recipe]["chunk_frames"]),
        "600K": train(preset600, bg600, "600 K"),
        "300K": train(preset300, bg300, "300 K", f"--init={bg600}"),
        "samples": _python("p4bg.sample", str(bg300), "--n-samples", str(samples), "--seed",
                           str(seed), "--overwrite", "--no-progress"),
        "analyze": _python("p4bg.analyze", str(bg300), "--reference", str(reference), "--split",
                           "all", "--out", str(report_dir(out, reference_seed))),
    }  # fmt: skip


def evaluations(
    system: str, out: Path, n_samples: int, data_root: Path, recipe: str = "demo",
    reference_seed: int = 0,
) -> dict[str, int]:  # fmt: skip
    """What the generator spent in target-energy evaluations, by part (docs/design.md §5), and
    what its reference cost."""
    from p4bg.demo_report import generator_evaluations, md_evaluations

    data = training_data(system, recipe, data_root)
    counts = generator_evaluations(data, [out / "bg600", out / "bg300"], n_samples)
    counts["300 K reference (replica exchange, every temperature)"] = md_evaluations(
        reference_dir(system, data_root, reference_seed))  # fmt: skip
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("system")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="demo",
                        help="demo (default) or best; the docstring says what each is")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help="default runs/bench/SYSTEM (--recipe best: SYSTEM-best)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="MD processes (default 2)")
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--data-root", type=Path, default=ROOT / "data",
                        help="where the datasets go (default data/)")  # fmt: skip
    parser.add_argument("--reference-seed", type=int, default=0,
                        help="seed of the 300 K replica exchange (default 0; > 0: an "
                        "independent reference, its own dataset and report)")  # fmt: skip
    parser.add_argument("--reference-ns", type=float, default=None,
                        help="ns per temperature and chain of the reference (default: the "
                        "system's, 2-5 ns)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_seed < 0:
        parser.error(f"--reference-seed must be >= 0, got {args.reference_seed}")
    if args.reference_ns is not None and args.reference_seed == 0:
        parser.error(
            "--reference-ns makes a reference of its own: give it a --reference-seed "
            "> 0 (seed 0's reference is the shared one of issue 29's reports)"
        )
    default = args.system + ("" if args.recipe == "demo" else f"-{args.recipe}")
    out = (args.out or ROOT / "runs" / "bench" / default).resolve()
    args.data_root = args.data_root.resolve()  # the steps run from the repository root
    (out / "done").mkdir(parents=True, exist_ok=True)
    record_path = out / "bench.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"steps": {}}
    from p4bg.distributed import machine

    record.setdefault("machines", [])
    here = machine()
    ref_seed = args.reference_seed
    for name in STEPS:
        if name not in args.only:
            continue
        marker = step_marker(out, name, ref_seed)
        key = marker.name  # bench.json's entry: the step, or the step of this reference
        if marker.exists():
            print(f"{name}: done before", flush=True)
            continue
        command = commands(args.system, out, args.seed, args.workers, args.samples,
                           args.data_root, args.smoke, args.recipe, ref_seed,
                           args.reference_ns)[name]  # fmt: skip
        print(f"{name}: {' '.join(command)}", flush=True)
        if here not in record["machines"]:  # every machine a step of it ran on
            record["machines"].append(here)
        start = time.perf_counter()
        with (out / "log.txt").open("a") as log:
            log.write(f"\n$ {' '.join(command)}\n")
            log.flush()
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        seconds = {"wall_s": time.perf_counter() - start,
                   "cpu_s": usage.ru_utime + usage.ru_stime}  # fmt: skip
        previous = record["steps"].get(key, {"wall_s": 0.0, "cpu_s": 0.0})
        record["steps"][key] = {k: previous.get(k, 0.0) + v for k, v in seconds.items()}
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        if code != 0:
            raise SystemExit(f"{name} failed (exit {code}); see {out / 'log.txt'}; rerun to "
                             "continue")  # fmt: skip
        marker.touch()
        print(f"{name}: {seconds['wall_s']:.0f} s", flush=True)
    metrics = report_dir(out, ref_seed) / "metrics.json"
    if "analyze" in args.only and metrics.is_file():
        result = json.loads(metrics.read_text())
        n = next(iter(result["models"].values()))["n_samples"]
        result["energy_evaluations"] = evaluations(args.system, out, n, args.data_root,
                                                   args.recipe, ref_seed)  # fmt: skip
        result["recipe"] = args.recipe
        result["bench_seconds"] = record["steps"]
        result["machines"] = record.get("machines", [])
        metrics.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["energy_evaluations"], indent=1))


if __name__ == "__main__":
    main()
