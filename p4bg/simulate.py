"""``python -m p4bg.simulate``: MD training data for a system, in parallel replicas, resumable.

    python -m p4bg.simulate --system alanine_dipeptide --temperature 600 --ns 20 \\
        --save-every-ps 0.2 --replicas 2 --seed 0 --out data/alanine_dipeptide_600K

``--ns`` is the total production length, shared evenly by the replicas (20 ns in 2 replicas:
10 ns each, 100,000 frames at 0.2 ps). Each replica minimises, equilibrates (not saved) and then
runs production in its own process with its own seed; frames are written in chunks that survive a
kill, and ``--resume`` continues from the last complete chunk (OpenMM checkpoint: positions,
velocities and the integrator's random state), so an interrupted run ends with the same frames
as an uninterrupted one.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import platform as platform_module
import queue as queue_module
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from analysis.geometry import dihedral
from p4bg import __version__
from p4bg.cli import Parser, option, parse
from p4bg.cli import build_parser as build_cli_parser
from p4bg.config import ConfigError
from p4bg.data import (
    DatasetError,
    complete_chunks,
    load_metadata,
    make_split,
    read_chunk,
    resume_point,
    write_chunk,
    write_json,
)
from p4bg.systems import (
    MolecularSystem,
    SystemConfigError,
    available_platforms,
    load_system,
    measure_platforms,
)

__all__ = [
    "MDRunOptions",
    "ReplicaJob",
    "SimulateOptions",
    "build_parser",
    "main",
    "run_replica",
    "simulate",
]

PROG = "python -m p4bg.simulate"
REPORT_EVERY = 50  # frames between progress messages from a worker


@dataclass(kw_only=True)
class MDRunOptions:
    """What every chunked, resumable MD command takes (p4bg.simulate, p4bg.remd)."""

    system: str = option("alanine_dipeptide", "name under systems/ or a folder")
    seed: int = option(0)
    out: str = option(help="dataset folder, e.g. data/alanine_dipeptide_600K")
    resume: bool = option(False, "continue a killed run in --out")
    equilibration_ps: float = option(100.0, "not saved")
    platform: str = option("auto", "auto (measured), Reference, CPU, CUDA, OpenCL")
    workers: int = option(0, "parallel processes (default: one per core)")
    split: tuple[float, float, float] = option((0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    no_progress: bool = option(False)
    # testing hook: stop each replica or chain after this many chunks, as a kill would
    stop_after_chunks: int | None = option(None, hidden=True)


@dataclass(kw_only=True)
class SimulateOptions(MDRunOptions):
    """The options of ``python -m p4bg.simulate``; :func:`simulate` reads them (an
    ``argparse.Namespace`` from :func:`build_parser` has the same attributes)."""

    temperature: float | None = option(None, "K (default: the system's)")
    ns: float = option(help="total production length over all replicas")
    save_every_ps: float = option(0.2)
    replicas: int = option(2)
    chunk_frames: int = option(2500, "frames per file")


@dataclass(frozen=True)
class ReplicaJob:
    """Everything one worker process needs (picklable)."""

    index: int
    system_path: str
    temperature: float
    platform: str
    seed: int
    frames: int
    steps_per_frame: int
    equilibration_steps: int
    chunk_frames: int
    folder: str
    minimize_iterations: int = 0  # 0: until converged
    stop_after_chunks: int | None = None  # testing hook: simulate a kill after this many chunks


def run_replica(job: ReplicaJob, progress: mp.Queue | None = None) -> dict:
    """Run (or continue) one replica; return its statistics. Runs inside a worker process."""
    import openmm

    system = load_system(job.system_path, job.temperature)
    integrator = system.make_integrator(seed=job.seed)
    platform = openmm.Platform.getPlatformByName(job.platform)
    context = openmm.Context(system.openmm_system, integrator, platform)
    folder = Path(job.folder)
    done_chunks, frames_done, checkpoint, step = resume_point(folder)
    if checkpoint is not None:
        context.loadCheckpoint(checkpoint)
    else:
        context.setPositions(system.positions)
        openmm.LocalEnergyMinimizer.minimize(context, 10.0, job.minimize_iterations)
        context.setVelocitiesToTemperature(system.temperature, job.seed)
        integrator.step(job.equilibration_steps)
    if progress is not None and frames_done:
        progress.put(("resumed", job.index, frames_done))

    n_atoms = system.n_atoms
    parent = os.getppid()
    start = time.perf_counter()
    new_frames = 0
    chunk = done_chunks
    while frames_done < job.frames:
        if job.stop_after_chunks is not None and chunk - done_chunks >= job.stop_after_chunks:
            break
        m = min(job.chunk_frames, job.frames - frames_done)
        xyz = np.empty((m, n_atoms, 3))
        energies = np.empty(m)
        steps = np.empty(m, dtype=np.int64)
        for f in range(m):
            integrator.step(job.steps_per_frame)
            step += job.steps_per_frame
            state = context.getState(getPositions=True, getEnergy=True)
            # ._value: the plain numbers in OpenMM's base units (nm, kJ/mol), no Quantity math.
            xyz[f] = state.getPositions(asNumpy=True)._value
            energies[f] = state.getPotentialEnergy()._value
            steps[f] = step
            if progress is not None and (f + 1) % REPORT_EVERY == 0:
                progress.put(("frames", job.index, REPORT_EVERY))
                if os.getppid() != parent:  # the parent was killed: stop, write nothing partial
                    raise SystemExit(f"replica {job.index}: parent process gone, stopping")
        if not np.isfinite(energies).all() or not np.isfinite(xyz).all():
            raise RuntimeError(
                f"replica {job.index}: non-finite energy or positions in chunk {chunk} "
                "(the simulation blew up); lower the timestep or check the system"
            )
        write_chunk(folder, chunk, xyz, energies, steps, context.createCheckpoint())
        if progress is not None and m % REPORT_EVERY:
            progress.put(("frames", job.index, m % REPORT_EVERY))
        frames_done += m
        new_frames += m
        chunk += 1
    seconds = time.perf_counter() - start
    return {
        "index": job.index,
        "frames_done": frames_done,
        "new_frames": new_frames,
        "seconds": seconds,
        "steps_per_second": new_frames * job.steps_per_frame / seconds if seconds > 0 else math.nan,
    }


def _worker(job: ReplicaJob, progress: mp.Queue) -> None:
    try:
        progress.put(("done", job.index, run_replica(job, progress)))
    except BaseException:
        progress.put(("error", job.index, traceback.format_exc()))


def _versions() -> dict[str, str]:
    import mdtraj
    import openmm

    return {
        "p4bg": __version__,
        "python": platform_module.python_version(),
        "numpy": np.__version__,
        "openmm": openmm.__version__,
        "mdtraj": mdtraj.__version__,
    }


def _plan(args: SimulateOptions, system: MolecularSystem) -> dict:
    steps_per_frame = args.save_every_ps * 1000.0 / system.timestep_fs
    if abs(steps_per_frame - round(steps_per_frame)) > 1e-6 or round(steps_per_frame) < 1:
        raise SystemExit(
            f"--save-every-ps {args.save_every_ps}: must be a whole number of "
            f"{system.timestep_fs} fs timesteps"
        )
    steps_per_frame = round(steps_per_frame)
    total_frames = round(args.ns * 1000.0 / args.save_every_ps)
    if total_frames < args.replicas:
        raise SystemExit(
            f"--ns {args.ns} gives {total_frames} frames, fewer than --replicas {args.replicas}"
        )
    base, extra = divmod(total_frames, args.replicas)
    seeds = np.random.SeedSequence(args.seed).generate_state(args.replicas, dtype=np.uint32)
    replicas = [
        {
            "index": k,
            "folder": f"replica_{k:02d}",
            "frames": base + (1 if k < extra else 0),
            "seed": int(seeds[k] % 2_000_000_000) + 1,
        }
        for k in range(args.replicas)
    ]
    return {
        "system": system.name,
        "system_path": str(system.path),
        "temperature_K": system.temperature,
        "kT_kJ_per_mol": system.kT,
        "integrator": system.integrator,
        "timestep_fs": system.timestep_fs,
        "friction_per_ps": system.friction_per_ps,
        "constraints": system.constraints,
        "ns_total": args.ns,
        "save_every_ps": args.save_every_ps,
        "steps_per_frame": steps_per_frame,
        "equilibration_ps": args.equilibration_ps,
        "seed": args.seed,
        "replicas": replicas,
        "split_fractions": list(args.split),
        "chunk_frames": args.chunk_frames,
    }


_PLAN_KEYS = (
    "system",
    "temperature_K",
    "timestep_fs",
    "save_every_ps",
    "steps_per_frame",
    "seed",
    "replicas",
)


def _choose_platform(name: str, system: MolecularSystem) -> tuple[str, dict[str, float]]:
    if name != "auto":
        if name not in available_platforms():
            raise SystemExit(
                f"--platform {name}: not available here; available: {available_platforms()}"
            )
        return name, {}
    rates = measure_platforms(system)
    return max(rates, key=rates.get), rates


def simulate(args: SimulateOptions) -> dict:
    """Run the whole job described by the parsed command line; return the final metadata."""
    out = Path(args.out)
    system = load_system(args.system, args.temperature)
    plan = _plan(args, system)
    if out.exists() and any(out.iterdir()):
        if not args.resume:
            raise SystemExit(
                f"--out {out} exists and is not empty; add --resume to continue that run, "
                "or choose another --out"
            )
        try:
            old = load_metadata(out)
        except DatasetError as err:
            raise SystemExit(f"--resume: {err}") from err
        changed = [k for k in _PLAN_KEYS if old.get(k) != plan[k]]
        if changed:
            raise SystemExit(
                f"--resume: {out} was made with different {', '.join(changed)}; "
                "use the same options as the original run, or another --out"
            )
        if old.get("status") == "complete":  # nothing to do; keep its record as it is
            return {**old, "already_complete": True}
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise SystemExit(
            f"--out {out}: cannot write there ({err.strerror}); choose another --out"
        ) from err

    platform, rates = _choose_platform(args.platform, system)
    meta = {
        **plan,
        "platform": platform,
        "platform_steps_per_second": rates,
        "versions": _versions(),
        "command": " ".join([Path(sys.executable).name, "-m", "p4bg.simulate", *sys.argv[1:]]),
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(out / "metadata.json", meta)

    jobs = [
        ReplicaJob(
            index=r["index"],
            system_path=str(system.path),
            temperature=system.temperature,
            platform=platform,
            seed=r["seed"],
            frames=r["frames"],
            steps_per_frame=plan["steps_per_frame"],
            equilibration_steps=round(args.equilibration_ps * 1000.0 / system.timestep_fs),
            chunk_frames=args.chunk_frames,
            folder=str(out / r["folder"]),
            stop_after_chunks=args.stop_after_chunks,
        )
        for r in plan["replicas"]
    ]
    workers = args.workers or min(len(jobs), os.cpu_count() or 1)
    start = time.perf_counter()
    results = _run_jobs(jobs, workers, plan, progress_bar=not args.no_progress)
    wall = time.perf_counter() - start

    finished = all(r["frames_done"] == j.frames for r, j in zip(results, jobs, strict=True))
    new_steps = sum(r["new_frames"] for r in results) * plan["steps_per_frame"]
    meta.update(
        status="complete" if finished else "interrupted",
        wall_seconds=wall,
        steps_per_second_total=new_steps / wall if wall > 0 else math.nan,
        steps_per_second_per_replica=[r["steps_per_second"] for r in results],
        workers=workers,
    )
    if finished:
        frames = [j.frames for j in jobs]
        write_json(out / "split.json", make_split(frames, tuple(args.split)))
        meta["phi_positive_fraction"] = _phi_positive_fraction(out, system, plan)
    write_json(out / "metadata.json", meta)
    return meta


def _phi_positive_fraction(out: Path, system: MolecularSystem, plan: dict) -> float:
    positive = total = 0
    for r in plan["replicas"]:
        folder = out / r["folder"]
        for i in range(complete_chunks(folder)):
            xyz = read_chunk(folder, i)[0]
            phi = dihedral(xyz.astype(np.float64), system.phi_atoms)
            positive += int((phi > 0).sum())
            total += len(phi)
    return positive / total


def _run_jobs(
    jobs: list[Any], workers: int, plan: dict, progress_bar: bool, target: Callable = _worker
) -> list[dict]:
    """Run the replicas in up to ``workers`` processes, with a progress bar; re-raise errors.

    jobs: picklable, with ``index`` and ``frames``; ``target(job, queue)`` runs one in a worker
    process and reports ``("frames" | "resumed", index, count)``, ``("done", index, result)`` or
    ``("error", index, traceback)`` (:func:`_worker`; p4bg.remd's chains use the same protocol)."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited OpenMM or thread state
    progress: mp.Queue = ctx.Queue()
    pending = list(jobs)
    running: dict[int, mp.process.BaseProcess] = {}
    results: dict[int, dict] = {}
    total = sum(j.frames for j in jobs)
    ps_per_frame = plan["save_every_ps"]
    bar = tqdm(
        total=total,
        unit="frame",
        disable=not progress_bar,
        dynamic_ncols=True,
        desc=plan.get("progress_label", "MD"),
    )
    start = time.perf_counter()
    new_frames = 0
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                proc = ctx.Process(target=target, args=(job, progress), daemon=True)
                proc.start()
                running[job.index] = proc
            try:
                kind, index, payload = progress.get(timeout=1.0)
            except queue_module.Empty:
                kind = None
            if kind is None:
                for index, proc in list(running.items()):
                    if not proc.is_alive() and proc.exitcode not in (0, None):
                        raise RuntimeError(
                            f"replica {index}: worker died (exit code {proc.exitcode})"
                        )
                continue
            if kind == "frames":
                new_frames += payload
                bar.update(payload)
                elapsed = time.perf_counter() - start
                ns_per_day = new_frames * ps_per_frame * 1e-3 / (elapsed / 86400.0)
                bar.set_postfix_str(f"{ns_per_day:,.0f} ns/day")
            elif kind == "resumed":
                bar.update(payload)
            elif kind == "done":
                results[index] = payload
                running.pop(index).join()
            elif kind == "error":
                raise RuntimeError(f"replica {index} failed:\n{payload}")
    finally:
        bar.close()
        for proc in running.values():
            proc.terminate()
        for proc in running.values():
            proc.join(timeout=10)
        progress.close()
        progress.join_thread()
    return [results[j.index] for j in jobs]


def build_parser() -> Parser:
    """The parser of ``python -m p4bg.simulate`` (made from :class:`SimulateOptions`)."""
    return build_cli_parser(SimulateOptions, PROG, __doc__ or "")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(SimulateOptions, argv, PROG, __doc__ or "")
        if not args.ns > 0:
            raise ConfigError(f"--ns must be > 0, got {args.ns}")
        if not args.save_every_ps > 0:
            raise ConfigError(f"--save-every-ps must be > 0, got {args.save_every_ps}")
        if args.replicas < 1 or args.workers < 0 or args.chunk_frames < 1:
            raise ConfigError("--replicas and --chunk-frames must be >= 1, --workers >= 0")
        if args.equilibration_ps < 0:
            raise ConfigError(f"--equilibration-ps must be >= 0, got {args.equilibration_ps}")
        if args.temperature is not None and not args.temperature > 0:
            raise ConfigError(f"--temperature must be > 0 K, got {args.temperature}")
        meta = simulate(args)
    except (ConfigError, SystemConfigError) as err:
        print(f"p4bg.simulate: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished chunks are kept in {args.out}; continue with the same "
            "command and --resume",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    if meta.get("already_complete"):
        print(f"{args.out} is already complete; nothing to do")
    elif meta["status"] == "complete":
        frames = sum(r["frames"] for r in meta["replicas"])
        print(
            f"wrote {frames} frames to {args.out} on {meta['platform']} "
            f"in {meta['wall_seconds']:.1f} s "
            f"({meta['steps_per_second_total']:,.0f} steps/s over {meta['workers']} processes); "
            f"phi > 0 population {meta['phi_positive_fraction']:.3f}"
        )
    else:
        print(f"stopped early: {args.out} is incomplete; continue with --resume", file=sys.stderr)


if __name__ == "__main__":
    main()
