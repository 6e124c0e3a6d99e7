"""``python -m p4bg.umbrella``: ΔF(φ > 0 vs φ < 0) of a dataset's temperature by umbrella sampling
along φ, with pymbar's MBAR; recorded in the dataset's metadata.json for ``p4bg.analyze``.

    python -m p4bg.umbrella data/alanine_dipeptide_300K_remd              # 36 windows x 0.5 ns

Why, next to replica exchange: the φ > 0 population of alanine dipeptide is set by rare barrier
crossings. In p4bg.remd's chains they happen mostly at the hottest temperature and reach 300 K
through the exchanges, so its ΔF rests on a few hundred crossing events (±0.2 kT after 23 min on
2 cores, docs/results.md §8). Harmonic restraints on φ at evenly spaced centres make every part
of the φ axis, barriers included, sampled in every window; MBAR then joins the windows into the
unbiased density. The dataset's own frames (replica exchange or MD) start the windows and keep
serving as the reference's Ramachandran map.

Each window runs in a worker process (one per core) with a ``CustomTorsionForce`` restraint
``½ k Δφ²`` (Δφ periodic) added to the System, ``--equilibration-ps`` unsaved, then
``--ns`` of production with φ and ψ saved every ``--save-every-ps``; a finished window is written
atomically (``umbrella/window_NNN.npz``) and a killed run resumes by skipping finished windows.

Estimator: the reduced potential of a frame in window i is ``β·bias_i(φ)`` (the force field
cancels between windows), plus the unbiased state with no samples; P(φ > 0) is MBAR's
expectation of the indicator there, on every frame. Its uncertainty is MBAR's asymptotic one on
each window's frames thinned by that window's statistical inefficiency of its bias energy
(pymbar.timeseries), propagated δΔF = δp/(p(1 − p)); the first and second halves of every window
give two more estimates, recorded as a check of equilibration.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis.geometry import dihedral
from p4bg.cli import option, parse
from p4bg.config import ConfigError
from p4bg.data import DatasetError, load_dataset, load_metadata, write_json
from p4bg.remd import _quiet
from p4bg.simulate import _choose_platform, _run_jobs
from p4bg.systems import MOLAR_GAS_CONSTANT, SystemConfigError, load_system

__all__ = ["UmbrellaOptions", "WindowJob", "main", "umbrella", "umbrella_delta_f"]

REPORT_EVERY = 100  # saved frames between progress messages


@dataclass(kw_only=True)
class UmbrellaOptions:
    """The options of ``python -m p4bg.umbrella``; :func:`umbrella` reads them."""

    dataset: str = option(help="dataset folder (p4bg.remd or p4bg.simulate); its temperature is "
                          "used, its frames start the windows", positional=True)  # fmt: skip
    windows: int = option(36, "restraint centres")
    k: float = option(300.0, "on φ, kJ/mol/rad²")
    psi_windows: int = option(0, "restraint centres along ψ too: a grid of windows x "
                              "psi-windows (0: φ alone)")  # fmt: skip
    k_psi: float = option(100.0, "on ψ, kJ/mol/rad²")
    start_frames: str | None = option(None, "dataset whose frames start the windows (default: "
                                      "DATASET)")  # fmt: skip
    ns: float = option(0.5, "production per window")
    save_every_ps: float = option(0.1)
    equilibration_ps: float = option(20.0, "per window")
    seed: int = option(0)
    platform: str = option("auto", "auto (measured), Reference, CPU, …")
    workers: int = option(0, "processes (default: one per core)")
    no_progress: bool = option(False)


@dataclass(frozen=True)
class WindowJob:
    """One window (picklable, for a worker process)."""

    index: int
    system_path: str
    temperature: float
    platform: str
    seed: int
    center: tuple[float, float]  # rad, (φ0, ψ0)
    k: tuple[float, float]  # kJ/mol/rad², (k_φ, k_ψ); k_ψ = 0: φ alone
    start: np.ndarray  # nm, [atoms, 3]
    frames: int
    steps_per_frame: int
    equilibration_steps: int
    folder: str


def _restraint(atoms: tuple[int, ...], center: float, k: float, name: str) -> Any:
    import openmm

    force = openmm.CustomTorsionForce(
        f"0.5*k_{name}*d^2; d = min(a, 2*pi - a); a = abs(theta - {name}0); pi = 3.141592653589793"
    )
    force.addGlobalParameter(f"k_{name}", k)
    force.addGlobalParameter(f"{name}0", center)
    force.addTorsion(*atoms, [])
    return force


def run_window(job: WindowJob, progress: Any = None) -> dict:
    """Run one window and write its file; return its statistics (in a worker process)."""
    import openmm

    system = load_system(job.system_path, job.temperature)
    omm = copy.deepcopy(system.openmm_system)
    omm.addForce(_restraint(system.phi_atoms, job.center[0], job.k[0], "phi"))
    if job.k[1] > 0:
        omm.addForce(_restraint(system.psi_atoms, job.center[1], job.k[1], "psi"))
    integrator = system.make_integrator(seed=job.seed)
    context = openmm.Context(omm, integrator, openmm.Platform.getPlatformByName(job.platform))
    context.setPositions(job.start)
    context.setVelocitiesToTemperature(job.temperature, job.seed)
    integrator.step(job.equilibration_steps)
    xyz = np.empty((job.frames, system.n_atoms, 3))
    parent = os.getppid()
    start = time.perf_counter()
    for f in range(job.frames):
        integrator.step(job.steps_per_frame)
        xyz[f] = context.getState(getPositions=True).getPositions(asNumpy=True)._value
        if progress is not None and (f + 1) % REPORT_EVERY == 0:
            progress.put(("frames", job.index, REPORT_EVERY))
            if os.getppid() != parent:
                raise SystemExit(f"window {job.index}: parent process gone, stopping")
    if not np.isfinite(xyz).all():
        raise RuntimeError(f"window {job.index}: non-finite positions (the simulation blew up)")
    if progress is not None and job.frames % REPORT_EVERY:
        progress.put(("frames", job.index, job.frames % REPORT_EVERY))
    seconds = time.perf_counter() - start
    path = Path(job.folder) / f"window_{job.index:03d}.npz"
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, phi=dihedral(xyz, system.phi_atoms), psi=dihedral(xyz, system.psi_atoms),
             center=job.center, k=job.k, seed=job.seed, seconds=seconds)  # fmt: skip
    os.replace(tmp, path)
    steps = job.frames * job.steps_per_frame + job.equilibration_steps
    return {"index": job.index, "frames_done": job.frames, "new_frames": job.frames,
            "seconds": seconds, "steps_per_second": steps / seconds}  # fmt: skip


def _window_worker(job: WindowJob, progress: Any) -> None:
    try:
        progress.put(("done", job.index, run_window(job, progress)))
    except BaseException:
        progress.put(("error", job.index, traceback.format_exc()))


def _bias(angles: np.ndarray, center: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Σ ½ k Δθ² (kJ/mol) over φ and ψ, Δθ the periodic difference, as the restraint forces
    compute it. angles [n, 2] rad; center, k [2]."""
    a = np.abs(angles - center)
    d = np.minimum(a, 2 * np.pi - a)
    return 0.5 * (k * d**2).sum(-1)


def umbrella_delta_f(
    angles: list[np.ndarray], centers: np.ndarray, k: np.ndarray, temperature: float
) -> dict[str, Any]:
    """ΔF(φ>0 vs φ<0) in kT at ``temperature`` from the windows' (φ, ψ) series (radians, one
    array [frames, 2] per window; restraint centres [windows, 2] rad; force constants (k_φ,
    k_ψ) kJ/mol/rad²); see the module docstring for the estimator."""
    with _quiet():
        import pymbar
        from pymbar import timeseries

    beta = 1.0 / (MOLAR_GAS_CONSTANT * temperature)

    k = np.asarray(k, dtype=np.float64)

    f_start: list[np.ndarray | None] = [None]  # the first solve's f_k starts the later ones

    def solve(series: list[np.ndarray], error: bool) -> tuple[float, float]:
        both = np.concatenate(series)
        u_kn = np.vstack([np.zeros(len(both))]
                         + [beta * _bias(both, c, k) for c in centers])  # fmt: skip
        n_k = np.array([0] + [len(s) for s in series])
        with _quiet():
            mbar = pymbar.MBAR(u_kn, n_k, initial_f_k=f_start[0])
            if f_start[0] is None:
                f_start[0] = mbar.f_k
            result = mbar.compute_expectations((both[:, 0] > 0).astype(np.float64),
                                               compute_uncertainty=error)  # fmt: skip
        return float(result["mu"][0]), float(result["sigma"][0]) if error else math.nan

    phi = angles

    def delta(p: float) -> float:
        return math.log((1 - p) / p) if 0 < p < 1 else math.nan

    p, _ = solve(phi, error=False)
    g = []
    for s, c in zip(phi, centers, strict=True):
        with _quiet():
            g.append(float(timeseries.statistical_inefficiency(_bias(s, c, k))))
    thinned = [s[:: max(1, math.ceil(gi))] for s, gi in zip(phi, g, strict=True)]
    p_thin, dp = solve(thinned, error=True)
    halves = [delta(solve([s[: len(s) // 2] for s in phi], False)[0]),
              delta(solve([s[len(s) // 2 :] for s in phi], False)[0])]  # fmt: skip
    return {
        "delta_f": delta(p),
        "delta_f_err": dp / (p_thin * (1 - p_thin)) if 0 < p_thin < 1 else math.nan,
        "phi_positive_fraction": p, "delta_f_thinned": delta(p_thin), "delta_f_halves": halves,
        "statistical_inefficiency_max": max(g), "statistical_inefficiency_mean": float(np.mean(g)),
        "n_samples": int(sum(len(s) for s in phi)),
        "n_samples_thinned": int(sum(len(s) for s in thinned)), "temperature_K": temperature,
    }  # fmt: skip


def umbrella(args: UmbrellaOptions) -> dict:
    """Run the windows of the parsed command line and record the estimate; returns it."""
    dataset = Path(args.dataset)
    meta = load_metadata(dataset)
    temperature = float(meta["temperature_K"])
    system = load_system(meta.get("system_path", meta["system"]), temperature)
    starts = Path(args.start_frames) if args.start_frames else dataset
    data = load_dataset(starts)
    xyz = data.xyz.reshape(len(data.xyz), -1, 3).astype(np.float64)
    angles_data = np.stack([dihedral(xyz, system.phi_atoms), dihedral(xyz, system.psi_atoms)], 1)
    folder = dataset / "umbrella"
    folder.mkdir(exist_ok=True)
    grid_phi = -np.pi + 2 * np.pi * np.arange(args.windows) / args.windows
    grid_psi = (-np.pi + 2 * np.pi * np.arange(args.psi_windows) / args.psi_windows
                if args.psi_windows else np.zeros(1))  # fmt: skip
    centers = np.array([(a, b) for a in grid_phi for b in grid_psi])
    k = np.array([args.k, args.k_psi if args.psi_windows else 0.0])
    steps_per_frame = round(args.save_every_ps * 1000.0 / system.timestep_fs)
    if (
        steps_per_frame < 1
        or abs(steps_per_frame * system.timestep_fs - args.save_every_ps * 1e3) > 1e-6
    ):
        raise SystemExit(f"--save-every-ps {args.save_every_ps}: must be a whole number of "
                         f"{system.timestep_fs} fs timesteps")  # fmt: skip
    frames = round(args.ns * 1000.0 / args.save_every_ps)
    equilibration_steps = round(args.equilibration_ps * 1e3 / system.timestep_fs)
    plan = {"windows": args.windows, "k_kj_per_mol_rad2": args.k,
            "psi_windows": args.psi_windows, "k_psi_kj_per_mol_rad2": float(k[1]),
            "start_frames": str(starts), "ns_per_window": args.ns,
            "save_every_ps": args.save_every_ps, "equilibration_ps": args.equilibration_ps,
            "seed": args.seed, "temperature_K": temperature}  # fmt: skip
    previous = dict(meta.get("umbrella", {}))
    old = previous.get("plan")
    if old is not None and old != plan:
        raise SystemExit(f"{dataset}: its umbrella/ windows were made with {old}; use the same "
                         f"options, or delete {folder} to start again")  # fmt: skip
    done = all((folder / f"window_{i:03d}.npz").is_file() for i in range(len(centers)))
    if previous.get("status") == "complete" and old == plan and done:
        return previous  # nothing to simulate or estimate again
    meta["umbrella"] = {**previous, "plan": plan, "status": "running"}
    write_json(dataset / "metadata.json", meta)
    platform, _ = _choose_platform(args.platform, system)
    seeds = np.random.SeedSequence(args.seed).generate_state(len(centers), dtype=np.uint32)
    jobs = []
    for i, c in enumerate(centers):
        if (folder / f"window_{i:03d}.npz").is_file():
            continue  # finished before a kill
        # the frame nearest the centre (periodic distance in the restrained angles)
        d = np.abs(angles_data - c)
        d = np.minimum(d, 2 * np.pi - d) * (k > 0)
        start = xyz[int(np.argmin((d**2).sum(1)))]
        jobs.append(WindowJob(index=i, system_path=str(system.path), temperature=temperature,
                              platform=platform, seed=int(seeds[i] % 2_000_000_000) + 1,
                              center=(float(c[0]), float(c[1])),
                              k=(float(k[0]), float(k[1])), start=start, frames=frames,
                              steps_per_frame=steps_per_frame,
                              equilibration_steps=equilibration_steps,
                              folder=str(folder)))  # fmt: skip
    workers = args.workers or min(max(len(jobs), 1), os.cpu_count() or 1)
    wall = time.perf_counter()
    if jobs:
        _run_jobs(jobs, workers, {"save_every_ps": args.save_every_ps,
                                  "progress_label": "umbrella"}, not args.no_progress,
                  target=_window_worker)  # fmt: skip
    wall = time.perf_counter() - wall
    angles, seconds = [], 0.0
    for i in range(len(centers)):
        with np.load(folder / f"window_{i:03d}.npz") as w:
            angles.append(np.stack([w["phi"], w["psi"]], 1))
            seconds += float(w["seconds"])
    result = umbrella_delta_f(angles, centers, k, temperature)
    meta = load_metadata(dataset)  # re-read: keep whatever else was written meanwhile
    meta["umbrella"] = {
        **result, "plan": plan, "status": "complete", "platform": platform,
        # the windows' wall time, over the runs that made them (a resumed run adds its own)
        "wall_seconds": previous.get("wall_seconds", 0.0) + wall,
        "production_seconds_total": seconds,
        "command": " ".join([Path(sys.executable).name, "-m", "p4bg.umbrella", *sys.argv[1:]]),
    }  # fmt: skip
    write_json(dataset / "metadata.json", meta)
    return meta["umbrella"]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(UmbrellaOptions, argv, "python -m p4bg.umbrella", __doc__ or "")
        if args.psi_windows < 0 or (args.psi_windows and not args.k_psi > 0):
            raise ConfigError("--psi-windows must be >= 0, and --k-psi > 0 with it")
        if args.windows < 4 or not args.k > 0 or not args.ns > 0 or not args.save_every_ps > 0:
            raise ConfigError("need --windows >= 4 and --k, --ns, --save-every-ps > 0")
        if args.equilibration_ps < 0 or args.workers < 0:
            raise ConfigError("--equilibration-ps and --workers must be >= 0")
        result = umbrella(args)
    except (ConfigError, DatasetError, SystemConfigError) as err:
        print(f"p4bg.umbrella: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished windows are kept in {args.dataset}/umbrella; continue "
              "with the same command", file=sys.stderr)  # fmt: skip
        raise SystemExit(130) from None
    print(f"ΔF({result['temperature_K']:g} K) = {result['delta_f']:.3f} ± "
          f"{result['delta_f_err']:.3f} kT (umbrella, MBAR; halves "
          f"{', '.join(f'{d:.2f}' for d in result['delta_f_halves'])}); "
          f"{result['wall_seconds']:.0f} s wall")  # fmt: skip


if __name__ == "__main__":
    main()
