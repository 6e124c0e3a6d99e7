"""Energy + force evaluations per second: TorchEnergy, the OpenMM worker bridge and a naive loop,
side by side in one run.

For batches of 256, 4,096 and 65,536 frames of alanine dipeptide (600 K) it measures
``OpenMMEnergy`` with 1 and 2 worker processes on the Reference and CPU platforms, and
``TorchEnergy`` (the force field as batched torch code, this process's torch threads) in float32
and float64, eager and through ``torch.compile`` (compilation excluded from the timing) —
energies and forces, both through the torch autograd path — and a naive
single-Context loop as one would first write it: ``setPositions(x * nanometer)``,
``getState(getEnergy, getForces)``, ``value_in_unit``. TorchEnergy's rows end with its ratio to
the bridge with the most workers on the first platform, batch by batch.

    python benchmarks/energy_throughput.py
    python benchmarks/energy_throughput.py --batches 256 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import openmm
import openmm.unit as unit
import torch

from p4bg.energy import OpenMMEnergy, TorchEnergy
from p4bg.systems import load_system


def frames(n: int) -> np.ndarray:
    """n thermal-noise frames around the PDB structure, shape (n, 66) nm."""
    system = load_system("alanine_dipeptide")
    rng = np.random.default_rng(0)
    return (system.positions[None] + 0.005 * rng.standard_normal((n, 22, 3))).reshape(n, 66)


def naive_loop(platform: str, xyz: np.ndarray) -> float:
    system = load_system("alanine_dipeptide")
    context = openmm.Context(
        system.openmm_system,
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName(platform),
    )
    start = time.perf_counter()
    for frame in xyz.reshape(len(xyz), 22, 3):
        context.setPositions(frame * unit.nanometer)
        state = context.getState(getEnergy=True, getForces=True)
        state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    return len(xyz) / (time.perf_counter() - start)


def bridge_rate(
    energy: OpenMMEnergy | TorchEnergy,
    xyz: np.ndarray,
    repeats: int,
    dtype: torch.dtype = torch.float64,
) -> float:
    x = torch.tensor(xyz, dtype=dtype, requires_grad=True)
    energy(x[:8]).sum().backward()  # warm-up (and compilation, for a compiled TorchEnergy)
    energy(x).sum().backward()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        energy(x).sum().backward()
        best = max(best, len(xyz) / (time.perf_counter() - start))
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 4096, 65536])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--platforms", nargs="+", default=["Reference", "CPU"])
    parser.add_argument("--repeats", type=int, default=3, help="best of N")
    parser.add_argument("--naive-frames", type=int, default=1000)
    args = parser.parse_args(argv)
    system = load_system("alanine_dipeptide")
    xyz_all = frames(max(args.batches))
    print("energy+force evaluations per second (best of repeats); alanine dipeptide, 600 K")
    naive = {p: naive_loop(p, xyz_all[: args.naive_frames]) for p in args.platforms}
    for p, rate in naive.items():
        print(f"  naive single-Context loop, {p:<9}: {rate:>9,.0f} /s")
    header = f"  {'platform':<10} {'workers':>7} " + " ".join(
        f"{'batch ' + str(b):>12}" for b in args.batches
    )
    header += "   x naive CPU (largest batch)"
    print(header)
    bridge: list[float] = []
    for platform in args.platforms:
        for n_workers in args.workers:
            with OpenMMEnergy(system, n_workers=n_workers, platform=platform) as energy:
                rates = [bridge_rate(energy, xyz_all[:b], args.repeats) for b in args.batches]
            if platform == args.platforms[0] and n_workers == max(args.workers):
                bridge = rates
            ratio = rates[-1] / naive["CPU"] if "CPU" in naive else float("nan")
            cells = " ".join(f"{r:>12,.0f}" for r in rates)
            print(f"  {platform:<10} {n_workers:>7} {cells}   {ratio:>6.1f}x")
    threads = torch.get_num_threads()
    print(f"  TorchEnergy, {threads} torch thread(s); ratio to the bridge with "
          f"{max(args.workers)} workers on {args.platforms[0]}, per batch")  # fmt: skip
    for compiled in (False, True):
        energy = TorchEnergy(system, compile=compiled)
        for dtype in (torch.float32, torch.float64):
            rates = [bridge_rate(energy, xyz_all[:b], args.repeats, dtype) for b in args.batches]
            cells = " ".join(f"{r:>12,.0f}" for r in rates)
            ratios = ", ".join(f"{r / b:.2f}x" for r, b in zip(rates, bridge, strict=False))
            name = "compiled" if compiled else "torch"
            print(f"  {name:<10} {str(dtype)[6:]:>7} {cells}   {ratios}", flush=True)


if __name__ == "__main__":
    main()
