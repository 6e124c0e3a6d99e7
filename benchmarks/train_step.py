"""Milliseconds per training step of the paper-size Boltzmann generator, in one run.

For the swap and the P4Inv model (25 blocks, hidden 60, batch 256, float32) it times the NLL step
(coordinate transform + flow inverse, backward, Adam, merge schedule) and the mixed step (adds
sampling through flow and transform, the target energy with forces through autograd, and the KL
term) with each target energy (``--energies``: the OpenMM worker bridge and TorchEnergy), and
prints the share of the mixed step spent evaluating energies. Uses an MD dataset (``--data``;
make one with ``python -m p4bg.simulate``).

    python benchmarks/train_step.py --data data/alanine_dipeptide_600K
    python benchmarks/train_step.py --data DATA --steps 3 --batch 32     # quick
    python benchmarks/train_step.py --data DATA --models p4inv --energies torch --compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from p4bg.config import TrainConfig, apply_overrides
from p4bg.train import Trainer


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
    parser.add_argument("--models", nargs="+", default=["swap", "p4inv"], choices=["swap", "p4inv"])
    parser.add_argument("--compile", action="store_true",
                        help="compile=true: the steps' flow passes through torch.compile "
                        "(compilation, in the warm-up steps, is not timed)")  # fmt: skip
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"median ms per step over {args.steps} steps")  # fmt: skip
    print(f"  {'model':<7} {'energy':<7} {'NLL step':>9} {'mixed step':>11} {'energy share':>13}")
    for kind in args.models:
        for energy_name in args.energies:
            nll, mixed, share = time_steps(args, kind, energy_name)
            print(f"  {kind:<7} {energy_name:<7} {nll * 1e3:>9.1f} {mixed * 1e3:>11.1f} "
                  f"{100 * share:>12.0f}%")  # fmt: skip


def time_steps(args: argparse.Namespace, kind: str, energy_name: str) -> tuple[float, ...]:
    """Median seconds of the NLL and the mixed step, and the energy's share of the mixed step."""
    config = apply_overrides(TrainConfig(), {
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
