"""Samples per second of ``p4bg.sample`` in 1 and 2 processes under torchrun, side by side.

    python benchmarks/sample_throughput.py --run runs/seeds/spline300_s0 --n 20000
    python benchmarks/sample_throughput.py --run RUN --n 2000 --rounds 1       # quick

The run's checkpoint is copied into a temporary folder, so its own samples are never touched.
For each process count ``torchrun --standalone --nproc_per_node=K -m p4bg.sample TMP
--n-samples N`` runs (one thread per process, as torchrun sets it), and the whole set is
timed twice: by samples.json's ``seconds`` (from the model loaded to the shards merged: the
sampling itself) and by the wall time of the command (process start and imports included).
For comparison a plain ``python -m p4bg.sample`` with every core's threads, the way one
process is run without torchrun. Rounds alternate the variants; the median is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(folder: Path, processes: int, n: int, batch: int, threads: int | None) -> tuple:
    """(sampling seconds from samples.json, wall seconds) of one sampling command."""
    env = {**os.environ}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={processes}", "-m", "p4bg.sample"] if processes
                else [sys.executable, "-m", "p4bg.sample"])  # fmt: skip
    command = [*launcher, str(folder), "--n-samples", str(n), "--batch", str(batch),
               "--no-progress", "--overwrite"]  # fmt: skip
    t0 = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    info = json.loads((folder / "samples.json").read_text())
    if info["n_samples"] != n:
        raise SystemExit(f"{folder}: {info['n_samples']} samples written, {n} asked")
    return float(info["seconds"]), wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", default="runs/seeds/spline300_s0", help="a trained run folder")
    parser.add_argument("--n", type=int, default=20_000, help="samples per command (20000)")
    parser.add_argument("--batch", type=int, default=4096, help="samples per chunk (4096)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the variants (2)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    if not (run / "checkpoint.pt").is_file():
        raise SystemExit(f"{run}: no checkpoint.pt; train a run first (README)")
    variants = {  # label: (processes under torchrun, or 0 for plain python; threads)
        "1 process (torchrun, 1 thread)": (1, 1),
        "2 processes (torchrun, 1 thread each)": (2, 1),
        f"1 process (python, {os.cpu_count()} threads)": (0, None),
    }
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / run.name
        folder.mkdir()
        for name in ("checkpoint.pt", "config.toml"):
            shutil.copy(run / name, folder / name)
        for _ in range(args.rounds):
            for label, (processes, threads) in variants.items():
                times[label].append(run_once(folder, processes, args.n, args.batch, threads))
    print(f"{run}: {args.n:,} samples per command, batch {args.batch}, {os.cpu_count()} cores; "
          f"median of {args.rounds} round(s)")  # fmt: skip
    print(f"  {'variant':<40} {'sampling s':>10} {'samples/s':>10} {'vs 1':>6} {'wall s':>7} "
          f"{'samples/s':>10} {'vs 1':>6}")  # fmt: skip
    base = None
    for label, values in times.items():
        sampling = statistics.median(v[0] for v in values)
        wall = statistics.median(v[1] for v in values)
        rates = (args.n / sampling, args.n / wall)
        base = base or rates
        print(f"  {label:<40} {sampling:>10.1f} {rates[0]:>10.0f} {rates[0] / base[0]:>5.2f}x "
              f"{wall:>7.1f} {rates[1]:>10.0f} {rates[1] / base[1]:>5.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
