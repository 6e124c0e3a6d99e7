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
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from p4bg.config import PRESETS, TrainConfig, apply_overrides
from p4bg.train import Trainer

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
    args = parser.parse_args(argv)
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


def time_steps(
    args: argparse.Namespace, kind: str, energy_name: str, coupling: str = "rnvp"
) -> tuple[float, ...]:
    """Median seconds of the NLL and the mixed step, and the energy's share of the mixed step."""
    config = apply_overrides(TrainConfig(), {**model_settings(coupling),
        "flow": kind, "data": args.data, "out": "/tmp/p4bg_bench", "batch_size": args.batch,
        "nll_steps": args.steps + 3, "mixed_steps": args.steps + 3, "n_workers": args.workers,
        "device": args.device, "energy": energy_name, "compile": args.compile},
        "benchmark")  # fmt: skip
    trainer = Trainer(config, progress=False)
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
