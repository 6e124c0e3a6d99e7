"""Milliseconds per training step of the paper-size Boltzmann generator, in one run.

For each coupling (``--couplings``: the paper's RealNVP, 25 blocks of hidden 60; the rational-
quadratic spline of the ``spline`` preset) and each mixing (``--models``: the fixed swap and
P4Inv), all four combinations by default, at batch 256 in float32, it times the NLL step
(coordinate transform + flow inverse, backward, Adam, merge schedule) and the mixed step (adds
sampling through flow and transform, the target energy with forces through autograd, and the KL
term) with each target energy (``--energies``: the OpenMM worker bridge and TorchEnergy), and
prints the share of the mixed step spent evaluating energies. Uses an MD dataset (``--data``;
make one with ``python -m p4bg.simulate``).

    python benchmarks/train_step.py --data data/alanine_dipeptide_600K
    python benchmarks/train_step.py --data DATA --steps 3 --batch 32     # quick
    python benchmarks/train_step.py --data DATA --models p4inv --energies torch --compile
    python benchmarks/train_step.py --data DATA --energies torch     # the four combinations
    python benchmarks/train_step.py --data DATA --ddp --models p4inv --couplings rnvp \
        --energies torch                                              # 1 and 2 processes

``--ddp`` times the first model of the lists under torchrun (DistributedDataParallel, gloo on
the CPU) at 1 and 2 processes (``--processes``), one thread each as torchrun sets it, at the
same global batch (``--batch`` split over the processes) and at the same batch per process
(the global batch grows with them); it prints steps/s and training frames/s with their ratio
to one process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from p4bg import distributed
from p4bg.config import PRESETS, TrainConfig, apply_overrides
from p4bg.training import Trainer

# the model of a coupling kind: the paper's (TrainConfig defaults) or the spline preset's
MODEL_KEYS = ("coupling", "n_blocks", "hidden", "spline_bins", "spline_tail_bound")


def model_settings(coupling: str) -> dict:
    if coupling == "rnvp":  # the paper's model
        return {k: getattr(TrainConfig(), k) for k in MODEL_KEYS[:3]}
    return {k: v for k, v in PRESETS["spline"].items() if k in MODEL_KEYS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="data/alanine_dipeptide_600K")
    parser.add_argument(
        "--steps", type=int, default=30, help="timed steps per phase (after 3 warm-up)"
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="energy worker processes")
    parser.add_argument("--energies", nargs="+", default=["openmm", "torch"],
                        choices=["openmm", "torch"], help="target energies to time")  # fmt: skip
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=["swap", "p4inv"], choices=["swap", "p4inv"],
                        help="mixings to time")  # fmt: skip
    parser.add_argument("--couplings", nargs="+", default=["rnvp", "spline"],
                        choices=["rnvp", "spline"],
                        help="couplings to time (spline: the spline preset's model)")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="compile=true: the steps' flow passes through torch.compile "
                        "(compilation, in the warm-up steps, is not timed)")  # fmt: skip
    parser.add_argument("--ddp", action="store_true",
                        help="time 1 and 2 processes under torchrun (see above)")  # fmt: skip
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2],
                        help="--ddp: the numbers of processes (1 2)")  # fmt: skip
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_worker:
        return distributed.run_process(lambda: ddp_worker(args))
    if args.ddp:
        return ddp_table(args, sys.argv[1:] if argv is None else argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"median ms per step over {args.steps} steps")  # fmt: skip
    for coupling in args.couplings:
        settings = model_settings(coupling)
        print(f"  {coupling}: " + ", ".join(f"{k} {v}" for k, v in settings.items()
                                           if k != "coupling"))  # fmt: skip
    print(f"  {'coupling':<9} {'mixing':<7} {'energy':<7} {'NLL step':>9} {'mixed step':>11} "
          f"{'energy share':>13} {'vs rnvp: NLL':>13} {'mixed':>6}")  # fmt: skip
    base: dict[tuple[str, str], tuple[float, float]] = {}
    for coupling in args.couplings:
        for kind in args.models:
            for energy_name in args.energies:
                nll, mixed, share = time_steps(args, kind, energy_name, coupling)
                if coupling == "rnvp":
                    base[kind, energy_name] = (nll, mixed)
                ref = base.get((kind, energy_name))
                ratio = f"{nll / ref[0]:>12.2f}x {mixed / ref[1]:>5.2f}x" if ref else ""
                print(f"  {coupling:<9} {kind:<7} {energy_name:<7} {nll * 1e3:>9.1f} "
                      f"{mixed * 1e3:>11.1f} {100 * share:>12.0f}% {ratio}")  # fmt: skip


def ddp_table(args: argparse.Namespace, argv: list[str]) -> None:
    """Launch the worker under torchrun for each process count and batch split; print."""
    coupling, kind, energy = args.couplings[0], args.models[0], args.energies[0]
    print(f"torch {torch.__version__}; DDP (gloo on the CPU), {os.cpu_count()} cores, one thread "
          f"per process; {coupling} coupling, {kind} mixing, {energy} energy; median over "
          f"{args.steps} steps")  # fmt: skip
    print(f"  {'processes':>9} {'batch/proc':>10} {'global':>7} {'NLL ms':>8} {'mixed ms':>9} "
          f"{'NLL steps/s':>12} {'frames/s':>9} {'vs 1':>6} {'mixed frames/s':>15} "
          f"{'vs 1':>6}")  # fmt: skip
    rest = [a for a in argv if a != "--ddp"]
    base: tuple[float, float] | None = None
    # (label, processes under torchrun or 0 for plain python with every core's threads, batch)
    runs = [
        (str(k), k, per)
        for k in args.processes
        for per in dict.fromkeys((args.batch // k, args.batch))
    ]  # same global, same per rank
    runs.append((f"1 (python, {os.cpu_count()} threads)", 0, args.batch))
    for label, k, per in runs:
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={k}"] if k else [sys.executable])  # fmt: skip
        command = [*launcher, __file__, *rest, "--ddp-worker", "--batch", str(per)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"} if k else dict(os.environ)
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if out.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
        nll, mixed = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
        k = max(k, 1)
        frames = (per * k / nll, per * k / mixed)
        base = base or frames
        print(f"  {label:>9} {per:>10} {per * k:>7} {nll * 1e3:>8.1f} {mixed * 1e3:>9.1f} "
              f"{1 / nll:>12.1f} {frames[0]:>9.0f} {frames[0] / base[0]:>5.2f}x "
              f"{frames[1]:>15.0f} {frames[1] / base[1]:>5.2f}x")  # fmt: skip


def ddp_worker(args: argparse.Namespace) -> None:
    """One process of :func:`ddp_table`: rank 0 prints the median step times as JSON."""
    world, device = distributed.setup(args.device)
    nll, mixed, _ = time_steps(args, args.models[0], args.energies[0], args.couplings[0],
                               world=world, device=device)  # fmt: skip
    if world.main:
        print(json.dumps({"seconds": [nll, mixed]}))
    distributed.shutdown()


def time_steps(
    args: argparse.Namespace,
    kind: str,
    energy_name: str,
    coupling: str = "rnvp",
    world: distributed.World = distributed.SINGLE,
    device: str | None = None,
) -> tuple[float, ...]:
    """Median seconds of the NLL and the mixed step, and the energy's share of the mixed step."""
    config = apply_overrides(TrainConfig(), {**model_settings(coupling),
        "mixing": kind, "data": args.data, "out": "/tmp/p4bg_bench", "batch_size": args.batch,
        "nll_steps": args.steps + 3, "mixed_steps": args.steps + 3, "n_workers": args.workers,
        "device": args.device, "energy": energy_name, "compile": args.compile},
        "benchmark")  # fmt: skip
    trainer = Trainer(config, progress=False, world=world, device=device)
    energy = trainer.energy()
    energy_time: list[float] = []

    def timed_energy(x: torch.Tensor) -> torch.Tensor:  # forward; forces are computed with it
        t0 = time.perf_counter()
        u = energy(x)
        energy_time.append(time.perf_counter() - t0)
        return u

    trainer.bg.target = timed_energy
    times: dict[str, list[float]] = {"nll": [], "mixed": []}
    for _ in range(config.total_steps):
        phase = trainer.phase(trainer.step)
        t0 = time.perf_counter()
        trainer.train_step()
        times[phase].append(time.perf_counter() - t0)
    energy.close()
    mixed = statistics.median(times["mixed"][3:])
    share = statistics.median(energy_time[3:]) / mixed
    return statistics.median(times["nll"][3:]), mixed, share


if __name__ == "__main__":
    main()
