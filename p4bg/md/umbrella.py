"""Umbrella sampling along φ (and ψ): MD windows held near evenly spaced centres by harmonic
restraints, joined by MBAR (:func:`p4bg.md.estimators.umbrella_delta_f`) into ΔF(φ > 0 vs φ < 0).

The angles are those of one residue: the system's own φ/ψ (its central residue) by default, or
any residue of the chain (:func:`p4bg.zmatrix.backbone_dihedrals`, labels like "ALA3"). The
central residue's windows live in ``umbrella/`` and its record in ``metadata.json`` under
``umbrella``; another residue's in ``umbrella_ALA3/`` and under ``umbrella_residues``→``ALA3``.

Each window is one job of the chunk loop in ``umbrella/window_NNN/``; when it is complete its φ
and ψ series are written to ``umbrella/window_NNN.npz`` (with its centre, force constants, seed
and production seconds) and its chunks are removed. A killed run keeps finished windows and
continues unfinished ones from their last chunk.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from analysis.geometry import dihedral
from p4bg.config import ConfigError
from p4bg.data import chunk_paths, complete_chunks, load_dataset, load_metadata
from p4bg.files import write_atomic, write_json
from p4bg.md.chunks import ChunkJob, Frame, run_chunks
from p4bg.md.estimators import umbrella_delta_f
from p4bg.md.plain import MDSampler, seeds, whole_steps
from p4bg.md.platform import choose_platform
from p4bg.md.pool import Progress, run_jobs
from p4bg.systems import MolecularSystem, load_system
from p4bg.zmatrix import backbone_dihedrals, residue_of

__all__ = ["WindowJob", "residue_torsions", "restrained_system", "restraint", "run",
           "run_window", "window_grid"]  # fmt: skip

CHUNK_FRAMES = 1000  # frames per chunk of a window


def restraint(atoms: tuple[int, ...], center: float, k: float, name: str) -> Any:
    """The harmonic restraint ½ k Δθ² (kJ/mol) on the torsion of ``atoms`` about ``center``
    (rad), Δθ the periodic difference; k in kJ/mol/rad². An ``openmm.CustomTorsionForce`` whose
    global parameters are ``k_<name>`` and ``<name>0``."""
    import openmm

    force = openmm.CustomTorsionForce(
        f"0.5*k_{name}*d^2; d = min(a, 2*pi - a); a = abs(theta - {name}0); pi = 3.141592653589793"
    )
    force.addGlobalParameter(f"k_{name}", k)
    force.addGlobalParameter(f"{name}0", center)
    force.addTorsion(*atoms, [])
    return force


def residue_torsions(
    system: MolecularSystem, residue: str | None
) -> tuple[str | None, tuple[int, ...], tuple[int, ...]]:
    """(label, φ atoms, ψ atoms) of ``residue`` (a label of
    :func:`p4bg.zmatrix.backbone_dihedrals`, e.g. "ALA3"); the label is None for the system's
    own φ/ψ (``residue`` None, or the label of the residue they belong to)."""
    own = (None, tuple(system.phi_atoms), tuple(system.psi_atoms))
    if residue is None:
        return own
    chain = backbone_dihedrals(system.topology)
    if residue == residue_of(chain, system.phi_atoms, system.psi_atoms):
        return own
    for label, phi, psi in chain:
        if label == residue:
            return label, phi, psi
    labels = ", ".join(label for label, _, _ in chain) or "none"
    raise ConfigError(f"--residue {residue}: {system.name} has no such residue with both φ and "
                      f"ψ; its residues: {labels}")  # fmt: skip


def restrained_system(
    system: MolecularSystem,
    center: tuple[float, float],
    k: tuple[float, float],
    atoms: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
) -> Any:
    """A copy of the system's ``openmm.System`` with a window's restraints: on φ, and on ψ when
    k_ψ > 0. center: (φ0, ψ0) rad; k: (k_φ, k_ψ) kJ/mol/rad²; atoms: (φ atoms, ψ atoms) of the
    restrained residue (default: the system's own φ and ψ)."""
    phi_atoms, psi_atoms = atoms or (system.phi_atoms, system.psi_atoms)
    omm = copy.deepcopy(system.openmm_system)
    omm.addForce(restraint(phi_atoms, center[0], k[0], "phi"))
    if k[1] > 0:
        omm.addForce(restraint(psi_atoms, center[1], k[1], "psi"))
    return omm


def window_grid(windows: int, psi_windows: int) -> np.ndarray:
    """Restraint centres (windows · max(psi_windows, 1), 2), rad: ``windows`` evenly spaced φ
    from −π, times ``psi_windows`` evenly spaced ψ (ψ0 = 0 for φ alone), φ-major."""
    grid_phi = -np.pi + 2 * np.pi * np.arange(windows) / windows
    grid_psi = (-np.pi + 2 * np.pi * np.arange(psi_windows) / psi_windows
                if psi_windows else np.zeros(1))  # fmt: skip
    return np.array([(a, b) for a in grid_phi for b in grid_psi])


@dataclass(frozen=True, kw_only=True)
class WindowJob(ChunkJob):
    """One window (picklable, for a worker process); ``folder`` holds its chunks until done."""

    kind: ClassVar[str] = "window"

    system_path: str
    temperature: float  # K
    platform: str
    seed: int
    center: tuple[float, float]  # rad, (φ0, ψ0)
    k: tuple[float, float]  # kJ/mol/rad², (k_φ, k_ψ); k_ψ = 0: φ alone
    # (φ atoms, ψ atoms) of the restrained residue; None: the system's own φ and ψ
    atoms: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    start: np.ndarray  # nm, [atoms, 3]
    equilibration_steps: int

    @property
    def output(self) -> Path:
        """The finished window's file: ``window_NNN.npz`` beside its chunk folder."""
        return Path(self.folder).with_suffix(".npz")


class _WindowSampler(MDSampler):
    """Restrained MD from a dataset frame (not minimised); φ and ψ of every frame, and the
    production seconds of every chunk."""

    def __init__(self, job: WindowJob, system: MolecularSystem) -> None:
        super().__init__(restrained_system(system, job.center, job.k, job.atoms), job.start,
                         system.make_integrator(seed=job.seed), job.platform,
                         temperature=job.temperature, seed=job.seed,
                         steps_per_frame=job.steps_per_frame,
                         equilibration_steps=job.equilibration_steps, minimize=False)  # fmt: skip
        self.atoms = job.atoms or (system.phi_atoms, system.psi_atoms)
        self.clock = time.perf_counter()

    def start(self) -> None:
        super().start()
        self.clock = time.perf_counter()

    def restore(self, checkpoint: bytes) -> None:
        super().restore(checkpoint)
        self.clock = time.perf_counter()

    def frame(self) -> Frame:
        xyz, energy, _ = super().frame()
        phi, psi = (float(dihedral(xyz[None], atoms)[0]) for atoms in self.atoms)
        return Frame(xyz, energy, {"phi": phi, "psi": psi})

    def chunk_extra(self) -> dict[str, np.ndarray]:
        now = time.perf_counter()
        seconds, self.clock = now - self.clock, now
        return {"seconds": np.asarray(seconds)}


def run_window(job: WindowJob, progress: Progress | None = None) -> dict:
    """Run (or continue) one window; when complete, write its file and remove its chunks."""
    system = load_system(job.system_path, job.temperature)
    stats = run_chunks(job, _WindowSampler(job, system), progress)
    if stats["frames_done"] == job.frames:
        folder = Path(job.folder)
        phi, psi, seconds = [], [], 0.0
        for i in range(complete_chunks(folder)):
            with np.load(chunk_paths(folder, i)[1]) as chunk:
                phi.append(chunk["phi"])
                psi.append(chunk["psi"])
                seconds += float(chunk["seconds"])
        arrays = {"phi": np.concatenate(phi), "psi": np.concatenate(psi), "center": job.center,
                  "k": job.k, "seed": job.seed, "seconds": seconds}  # fmt: skip
        write_atomic(job.output, lambda tmp: np.savez(tmp, **arrays))
        shutil.rmtree(folder)
    return stats


def run(
    dataset: Path,
    *,
    windows: int,
    k: float,
    psi_windows: int,
    k_psi: float,
    start_frames: Path | None,
    ns: float,
    save_every_ps: float,
    equilibration_ps: float,
    seed: int,
    platform: str,
    workers: int,
    progress_bar: bool,
    command: str,
    residue: str | None = None,
) -> dict[str, Any]:
    """Run the windows that are not finished yet and record the estimate in the dataset's
    ``metadata.json`` (``umbrella``); returns that record.

    dataset: its temperature is the windows'; its frames (or those of ``start_frames``) start
    each window from the frame nearest the window's centre. k, k_psi: kJ/mol/rad²; ns: production
    per window; a frame every ``save_every_ps``; residue: whose φ/ψ (:func:`residue_torsions`).
    A dataset whose windows were made with other options is refused; a complete record with all
    its windows is returned as it is.
    """
    meta = load_metadata(dataset)
    temperature = float(meta["temperature_K"])
    system = load_system(meta.get("system_path", meta["system"]), temperature)
    starts = start_frames or dataset
    data = load_dataset(starts)
    xyz = data.xyz.reshape(len(data.xyz), -1, 3).astype(np.float64)
    label, phi_atoms, psi_atoms = residue_torsions(system, residue)
    angles_data = np.stack([dihedral(xyz, phi_atoms), dihedral(xyz, psi_atoms)], 1)
    folder = dataset / ("umbrella" if label is None else f"umbrella_{label}")
    folder.mkdir(exist_ok=True)
    centers = window_grid(windows, psi_windows)
    force = np.array([k, k_psi if psi_windows else 0.0])
    steps_per_frame = whole_steps(save_every_ps, system, "--save-every-ps")
    frames = round(ns * 1000.0 / save_every_ps)
    plan = {"windows": windows, "k_kj_per_mol_rad2": k, "psi_windows": psi_windows,
            "k_psi_kj_per_mol_rad2": float(force[1]), "start_frames": str(starts),
            "ns_per_window": ns, "save_every_ps": save_every_ps,
            "equilibration_ps": equilibration_ps, "seed": seed,
            "temperature_K": temperature}  # fmt: skip
    if label is not None:
        plan["residue"] = label
    previous = dict(_record(meta, label))
    old = previous.get("plan")
    if old is not None and old != plan:
        raise SystemExit(f"{dataset}: its {folder.name}/ windows were made with {old}; use the "
                         f"same options, or delete {folder} to start again")  # fmt: skip
    paths = [folder / f"window_{i:03d}" for i in range(len(centers))]
    done = [p.with_suffix(".npz").is_file() for p in paths]
    if previous.get("status") == "complete" and old == plan and all(done):
        return previous  # nothing to simulate or estimate again
    _store(meta, label, {**previous, "plan": plan, "status": "running"})
    write_json(dataset / "metadata.json", meta)
    platform, _ = choose_platform(platform, system)
    window_seeds = seeds(seed, len(centers))
    equilibration_steps = round(equilibration_ps * 1e3 / system.timestep_fs)
    jobs = []
    for i, (c, path, finished) in enumerate(zip(centers, paths, done, strict=True)):
        if finished:  # before a kill; its chunks may not have been removed yet
            shutil.rmtree(path, ignore_errors=True)
            continue
        # the frame nearest the centre (periodic distance in the restrained angles)
        d = np.abs(angles_data - c)
        d = np.minimum(d, 2 * np.pi - d) * (force > 0)
        jobs.append(WindowJob(index=i, system_path=str(system.path), temperature=temperature,
                              platform=platform, seed=window_seeds[i],
                              center=(float(c[0]), float(c[1])),
                              k=(float(force[0]), float(force[1])),
                              atoms=(tuple(phi_atoms), tuple(psi_atoms)),
                              start=xyz[int(np.argmin((d**2).sum(1)))], frames=frames,
                              steps_per_frame=steps_per_frame,
                              equilibration_steps=equilibration_steps,
                              chunk_frames=CHUNK_FRAMES, folder=str(path)))  # fmt: skip
    wall = time.perf_counter()
    if jobs:
        workers = workers or min(len(jobs), os.cpu_count() or 1)
        run_jobs(jobs, run_window, workers=workers, ps_per_frame=save_every_ps,
                 label="umbrella", progress_bar=progress_bar)  # fmt: skip
    wall = time.perf_counter() - wall
    angles, seconds = [], 0.0
    for path in paths:
        with np.load(path.with_suffix(".npz")) as w:
            angles.append(np.stack([w["phi"], w["psi"]], 1))
            seconds += float(w["seconds"])
    result = umbrella_delta_f(angles, centers, force, temperature)
    meta = load_metadata(dataset)  # re-read: keep whatever else was written meanwhile
    record = {
        **result, "plan": plan, "status": "complete", "platform": platform,
        # the windows' wall time, over the runs that made them (a resumed run adds its own)
        "wall_seconds": previous.get("wall_seconds", 0.0) + wall,
        "production_seconds_total": seconds, "command": command,
    }  # fmt: skip
    _store(meta, label, record)
    write_json(dataset / "metadata.json", meta)
    return record


def _record(meta: dict[str, Any], label: str | None) -> dict[str, Any]:
    """The umbrella record of a residue in a dataset's metadata (empty if there is none)."""
    if label is None:
        return meta.get("umbrella", {})
    return meta.get("umbrella_residues", {}).get(label, {})


def _store(meta: dict[str, Any], label: str | None, record: dict[str, Any]) -> None:
    if label is None:
        meta["umbrella"] = record
    else:
        meta.setdefault("umbrella_residues", {})[label] = record
