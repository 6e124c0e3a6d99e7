"""MD throughput: ``p4bg.simulate`` against a bare OpenMM loop, Reference against CPU, in one run.

The bare loop is the fastest way to run the same dynamics: a Context, and ``integrator.step`` in
blocks of one frame's steps, nothing saved. ``p4bg.simulate`` adds reading the state each frame,
writing chunks and reporting progress. Both run the same number of parallel processes (one
replica each) so that they compete for the cores the same way; steps/s are production steps per
process (start-up, minimisation and equilibration excluded on both sides).

    python benchmarks/md_throughput.py                  # 0.4 ns on Reference, 0.02 ns on CPU
    python benchmarks/md_throughput.py --ns 0.05 --cpu-ns 0.005   # quick
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

from p4bg.simulate import build_parser, simulate
from p4bg.systems import available_platforms, load_system


def bare_loop(platform: str, steps_per_frame: int, frames: int, seed: int) -> float:
    """Production steps per second of a bare OpenMM loop (one process)."""
    import openmm

    system = load_system("alanine_dipeptide")
    integrator = system.make_integrator(seed=seed)
    context = openmm.Context(
        system.openmm_system, integrator, openmm.Platform.getPlatformByName(platform)
    )
    context.setPositions(system.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 0)
    context.setVelocitiesToTemperature(system.temperature, seed)
    integrator.step(1000)
    start = time.perf_counter()
    for _ in range(frames):
        integrator.step(steps_per_frame)
    context.getState(getEnergy=True)  # waits for asynchronous platforms
    return steps_per_frame * frames / (time.perf_counter() - start)


def measure(platform: str, ns: float, processes: int, save_every_ps: float) -> dict[str, float]:
    steps_per_frame = round(save_every_ps * 1000)  # 1 fs timestep
    frames = round(ns * 1000 / save_every_ps / processes)
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes) as pool:
        bare = pool.starmap(
            bare_loop, [(platform, steps_per_frame, frames, k + 1) for k in range(processes)]
        )
    with tempfile.TemporaryDirectory() as tmp:
        args = build_parser().parse_args(
            ["--ns", str(ns), "--replicas", str(processes), "--workers", str(processes),
             "--platform", platform, "--save-every-ps", str(save_every_ps),
             "--equilibration-ps", "1", "--out", str(Path(tmp) / "md"), "--no-progress"]
        )  # fmt: skip
        start = time.perf_counter()
        meta = simulate(args)
        wall = time.perf_counter() - start
    ours = meta["steps_per_second_per_replica"]
    return {
        "bare": sum(bare) / len(bare),
        "ours": sum(ours) / len(ours),
        "ns_per_day": sum(ours) * 1e-6 * 86400,  # 1 fs steps
        "wall": wall,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ns", type=float, default=0.4, help="total ns on Reference (and CUDA)")
    parser.add_argument(
        "--cpu-ns", type=float, default=0.02, help="total ns on the slower CPU platform"
    )
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--save-every-ps", type=float, default=0.2)
    args = parser.parse_args(argv)
    platforms = [p for p in ("Reference", "CPU", "CUDA", "OpenCL") if p in available_platforms()]
    print(f"alanine dipeptide, 600 K, 1 fs, {args.processes} parallel processes, a frame every "
          f"{args.save_every_ps} ps; production steps/s per process")  # fmt: skip
    header = (
        f"{'platform':<10} {'ns':>6} {'bare loop':>10} {'p4bg.simulate':>14} {'ratio':>6}"
        f" {'ns/day total':>13} {'wall s':>7}"
    )
    print(header)
    print("-" * len(header))
    results = {}
    for platform in platforms:
        ns = args.cpu_ns if platform == "CPU" else args.ns
        try:
            r = measure(platform, ns, args.processes, args.save_every_ps)
        except Exception as err:  # a listed platform that cannot run here
            print(f"{platform:<10} could not run: {err}")
            continue
        results[platform] = r
        ratio = r["ours"] / r["bare"]
        print(
            f"{platform:<10} {ns:>6g} {r['bare']:>10,.0f} {r['ours']:>14,.0f} {ratio:>6.3f}"
            f" {r['ns_per_day']:>13,.0f} {r['wall']:>7.1f}"
        )
    if "Reference" in results and "CPU" in results:
        ratio = results["Reference"]["bare"] / results["CPU"]["bare"]
        print(f"\nReference / CPU (bare loop): {ratio:.1f}x")


if __name__ == "__main__":
    main()
