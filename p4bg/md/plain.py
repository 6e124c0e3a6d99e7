"""Plain MD: independent Langevin replicas of one system at one temperature, each in its own
process with its own seed, written as a p4bg dataset (the training data of a generator).

Each replica minimises, equilibrates (not saved) and runs production in chunks
(:mod:`p4bg.md.chunks`); ``ns`` of production is shared evenly by the replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis.geometry import dihedral
from p4bg.data import complete_chunks, read_chunk
from p4bg.files import write_json
from p4bg.md.chunks import ChunkJob, Frame, Sampler, run_chunks
from p4bg.md.output import MDRunOptions, prepare_output, run_and_record, start_record
from p4bg.md.platform import choose_platform
from p4bg.md.pool import Progress
from p4bg.systems import MolecularSystem, load_system

__all__ = [
    "PLAN_KEYS",
    "MDSampler",
    "ReplicaJob",
    "make_plan",
    "phi_positive_fraction",
    "run",
    "run_replica",
    "seeds",
    "whole_steps",
]

# what a resumed run must share with the run it continues
PLAN_KEYS = ("system", "temperature_K", "timestep_fs", "save_every_ps", "steps_per_frame", "seed",
             "replicas")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ReplicaJob(ChunkJob):
    """One replica of plain MD (picklable, for a worker process)."""

    system_path: str
    temperature: float  # K
    platform: str
    seed: int
    equilibration_steps: int
    minimize_iterations: int = 0  # 0: until converged


class MDSampler(Sampler):
    """Langevin dynamics of one OpenMM System: a frame is ``steps_per_frame`` steps.

    system: an ``openmm.System``; positions: (n_atoms, 3) nm, where a new run starts (minimised
    first when ``minimize``); integrator: a fresh OpenMM integrator, its seed set.
    """

    def __init__(
        self,
        system: Any,
        positions: np.ndarray,
        integrator: Any,
        platform: str,
        *,
        temperature: float,
        seed: int,
        steps_per_frame: int,
        equilibration_steps: int,
        minimize: bool = True,
        minimize_iterations: int = 0,
    ) -> None:
        import openmm

        self.integrator = integrator
        device = openmm.Platform.getPlatformByName(platform)
        self.context = openmm.Context(system, integrator, device)
        self.positions, self.temperature, self.seed = positions, temperature, seed
        self.steps_per_frame, self.equilibration_steps = steps_per_frame, equilibration_steps
        self.minimize, self.minimize_iterations = minimize, minimize_iterations

    def start(self) -> None:
        import openmm

        self.context.setPositions(self.positions)
        if self.minimize:
            openmm.LocalEnergyMinimizer.minimize(self.context, 10.0, self.minimize_iterations)
        self.context.setVelocitiesToTemperature(self.temperature, self.seed)
        self.integrator.step(self.equilibration_steps)

    def restore(self, checkpoint: bytes) -> None:
        self.context.loadCheckpoint(checkpoint)

    def checkpoint(self) -> bytes:
        return self.context.createCheckpoint()

    def frame(self) -> Frame:
        self.integrator.step(self.steps_per_frame)
        state = self.context.getState(getPositions=True, getEnergy=True)
        # ._value: the plain numbers in OpenMM's base units (nm, kJ/mol), no Quantity math.
        return Frame(state.getPositions(asNumpy=True)._value, state.getPotentialEnergy()._value)


def run_replica(job: ReplicaJob, progress: Progress | None = None) -> dict:
    """Run (or continue) one replica; its statistics (:func:`p4bg.md.chunks.run_chunks`)."""
    system = load_system(job.system_path, job.temperature)
    sampler = MDSampler(
        system.openmm_system,
        system.positions,
        system.make_integrator(seed=job.seed),
        job.platform,
        temperature=system.temperature,
        seed=job.seed,
        steps_per_frame=job.steps_per_frame,
        equilibration_steps=job.equilibration_steps,
        minimize_iterations=job.minimize_iterations,
    )
    return run_chunks(job, sampler, progress)


def whole_steps(ps: float, system: MolecularSystem, option: str) -> int:
    """``ps`` as a whole number (>= 1) of the system's timesteps, or a SystemExit naming
    ``option``."""
    steps = ps * 1000.0 / system.timestep_fs
    if abs(steps - round(steps)) > 1e-6 or round(steps) < 1:
        raise SystemExit(
            f"{option} {ps}: must be a whole number of {system.timestep_fs} fs timesteps"
        )
    return round(steps)


def seeds(seed: int, n: int) -> list[int]:
    """``n`` independent OpenMM seeds (1 … 2·10⁹) drawn from ``seed``."""
    drawn = np.random.SeedSequence(seed).generate_state(n, dtype=np.uint32)
    return [int(s % 2_000_000_000) + 1 for s in drawn]


def make_plan(
    system: MolecularSystem,
    *,
    ns: float,
    save_every_ps: float,
    replicas: int,
    seed: int,
    equilibration_ps: float,
    split: tuple[float, float, float],
    chunk_frames: int,
) -> dict[str, Any]:
    """The run as ``metadata.json`` records it: ``ns`` (total production, ns) over ``replicas``
    replicas, a frame every ``save_every_ps`` ps; each replica's folder, frames and seed."""
    steps_per_frame = whole_steps(save_every_ps, system, "--save-every-ps")
    total_frames = round(ns * 1000.0 / save_every_ps)
    if total_frames < replicas:
        raise SystemExit(f"--ns {ns} gives {total_frames} frames, fewer than --replicas {replicas}")
    base, extra = divmod(total_frames, replicas)
    frames = [base + (1 if k < extra else 0) for k in range(replicas)]
    return {
        "system": system.name,
        "system_path": str(system.path),
        "temperature_K": system.temperature,
        "kT_kJ_per_mol": system.kT,
        "integrator": system.integrator,
        "timestep_fs": system.timestep_fs,
        "friction_per_ps": system.friction_per_ps,
        "constraints": system.constraints,
        "ns_total": ns,
        "save_every_ps": save_every_ps,
        "steps_per_frame": steps_per_frame,
        "equilibration_ps": equilibration_ps,
        "seed": seed,
        "replicas": [
            {"index": k, "folder": f"replica_{k:02d}", "frames": n, "seed": s}
            for k, (n, s) in enumerate(zip(frames, seeds(seed, replicas), strict=True))
        ],
        "split_fractions": list(split),
        "chunk_frames": chunk_frames,
    }


def run(args: MDRunOptions, system: MolecularSystem, plan: dict, command: str) -> dict:
    """Run (or continue) the plan into ``args.out``; the final record (``already_complete``
    when there was nothing to do)."""
    out = Path(args.out)
    old = prepare_output(out, plan, PLAN_KEYS, args.resume)
    if old is not None:
        return {**old, "already_complete": True}
    platform, rates = choose_platform(args.platform, system)
    meta = start_record(out, plan, platform, rates, command)
    equilibration_steps = round(args.equilibration_ps * 1000.0 / system.timestep_fs)
    jobs = [
        ReplicaJob(index=r["index"], system_path=str(system.path),
                   temperature=system.temperature, platform=platform, seed=r["seed"],
                   frames=r["frames"], steps_per_frame=plan["steps_per_frame"],
                   equilibration_steps=equilibration_steps,
                   chunk_frames=plan["chunk_frames"], folder=str(out / r["folder"]),
                   stop_after_chunks=args.stop_after_chunks, stop_file=args.stop_file)
        for r in plan["replicas"]
    ]  # fmt: skip
    if run_and_record(out, meta, jobs, run_replica, args, plan["steps_per_frame"]):
        meta["phi_positive_fraction"] = phi_positive_fraction(out, system, plan["replicas"])
    write_json(out / "metadata.json", meta)
    return meta


def phi_positive_fraction(out: Path, system: MolecularSystem, replicas: list[dict]) -> float:
    """The fraction of a dataset's frames with φ > 0 (the rare basin of alanine dipeptide)."""
    positive = total = 0
    for r in replicas:
        folder = out / r["folder"]
        for i in range(complete_chunks(folder)):
            phi = dihedral(read_chunk(folder, i)[0].astype(np.float64), system.phi_atoms)
            positive += int((phi > 0).sum())
            total += len(phi)
    return positive / total
