"""Replica exchange (parallel tempering): K copies of a system on a temperature ladder that swap
configurations, so that the lowest temperature keeps crossing the barriers the hottest crosses.

A chain runs one Langevin context per temperature. Every cycle (``steps_per_frame`` MD steps at
every temperature) it attempts swaps of neighbouring temperatures, even pairs then odd pairs in
turn, accepted with the Metropolis probability min(1, exp((β_i − β_j)(U_i − U_j))), which keeps
the product of the K Boltzmann distributions invariant; a swapped configuration's velocities are
rescaled by sqrt(T_new / T_old), so that they stay a Maxwell–Boltzmann sample at their new
temperature. Chains are independent (own seeds) and each is one job of the chunk loop: its
frames at the lowest temperature form an ordinary p4bg dataset, and every chunk also stores,
per cycle and temperature, the potential energy, φ and ψ and the walker there, which the MBAR
estimate (:func:`p4bg.md.estimators.mbar_delta_f`) reads.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np

from analysis.geometry import dihedral
from p4bg.data import DatasetError, complete_chunks
from p4bg.files import write_json
from p4bg.md.chunks import ChunkJob, Frame, Sampler, run_chunks
from p4bg.md.estimators import remd_estimates
from p4bg.md.output import MDRunOptions, prepare_output, run_and_record, start_record
from p4bg.md.plain import seeds, whole_steps
from p4bg.md.platform import choose_platform
from p4bg.md.pool import Progress
from p4bg.systems import MolecularSystem, load_system
from p4bg.units import R
from p4bg.zmatrix import backbone_dihedrals

__all__ = [
    "PLAN_KEYS",
    "ChainJob",
    "Cycle",
    "ReplicaExchange",
    "estimates",
    "exchange",
    "geometric_ladder",
    "make_plan",
    "read_chain_arrays",
    "run",
    "run_chain",
]

PLAN_KEYS = ("system", "temperatures_K", "timestep_fs", "save_every_ps", "steps_per_frame",
             "seed", "replicas")  # fmt: skip


def geometric_ladder(t_min: float, t_max: float, n: int) -> list[float]:
    """``n`` temperatures (K) from ``t_min`` to ``t_max`` with a constant ratio: for a system of
    roughly constant heat capacity this gives equal exchange acceptance between neighbours."""
    if n < 2 or not 0 < t_min < t_max:
        raise ValueError(f"need n >= 2 and 0 < t_min < t_max, got {n}, {t_min}, {t_max}")
    return [float(t_min * (t_max / t_min) ** (k / (n - 1))) for k in range(n)]


def exchange(
    energy: np.ndarray,
    beta: np.ndarray,
    parity: int,
    rng: np.random.Generator,
    attempts: np.ndarray | None = None,
    accepts: np.ndarray | None = None,
) -> np.ndarray:
    """One sweep of neighbour swaps over the pairs (k, k+1) with k ≡ parity (mod 2).

    energy: potential energies (kJ/mol) of the configurations at each temperature, [K];
    beta: 1/kT (mol/kJ), [K]. A pair swaps with probability min(1, exp((β_k − β_{k+1})(U_k −
    U_{k+1}))). Returns ``perm`` [K]: temperature k receives the configuration that was at
    ``perm[k]``. Counts per pair are added to ``attempts`` and ``accepts`` when given."""
    K = len(energy)
    perm = np.arange(K)
    for i in range(parity, K - 1, 2):
        j = i + 1
        log_acc = (beta[i] - beta[j]) * (energy[i] - energy[j])
        accepted = log_acc >= 0 or rng.random() < math.exp(log_acc)
        if attempts is not None:
            attempts[i] += 1
        if accepted:
            perm[i], perm[j] = j, i
            if accepts is not None:
                accepts[i] += 1
    return perm


class Cycle(NamedTuple):
    """One exchange cycle, seen before its swaps (every row a Boltzmann sample at its
    temperature): positions (K, n_atoms, 3) nm, velocities (K, n_atoms, 3) nm/ps, potential
    energies (K,) kJ/mol; and ``perm`` (K,), the swaps then made (see :func:`exchange`)."""

    xyz: np.ndarray
    velocities: np.ndarray
    energy: np.ndarray
    perm: np.ndarray


class ReplicaExchange:
    """The exchange engine: K contexts of one OpenMM System, context k always at
    ``temperatures[k]``; configurations (with their velocities) move between them.

    system: any ``openmm.System`` (a molecule, or a toy potential); positions: (n_atoms, 3) nm,
    where every temperature starts; temperatures: K values in K, ascending; integrator:
    ``integrator(temperature, seed)`` makes a fresh thermostatted integrator; steps_per_cycle:
    MD steps between exchange attempts. ``seed`` fixes every random number (integrators,
    initial velocities, exchanges).
    """

    def __init__(
        self,
        system: Any,
        positions: np.ndarray,
        temperatures: Sequence[float],
        integrator: Callable[[float, int], Any],
        *,
        steps_per_cycle: int,
        seed: int = 0,
        platform: str = "Reference",
        minimize_iterations: int = 0,
        label: str = "chain",
    ) -> None:
        import openmm

        self.temperatures = np.asarray(temperatures, dtype=np.float64)
        self.K = len(self.temperatures)
        self.positions, self.seed, self.label = positions, seed, label
        self.steps_per_cycle, self.minimize_iterations = steps_per_cycle, minimize_iterations
        drawn = np.random.SeedSequence(seed).generate_state(self.K + 1, dtype=np.uint32)
        self.integrators = [
            integrator(float(t), int(s % 2_000_000_000) + 1)
            for t, s in zip(self.temperatures, drawn[: self.K], strict=True)
        ]
        device = openmm.Platform.getPlatformByName(platform)
        self.contexts = [openmm.Context(system, i, device) for i in self.integrators]
        self.beta = 1.0 / (R * self.temperatures)  # mol/kJ
        self.rng = np.random.default_rng(int(drawn[self.K]))
        self.walker = np.arange(self.K)  # which walker (initial replica) is at temperature k
        self.attempts = np.zeros(self.K - 1, dtype=np.int64)
        self.accepts = np.zeros(self.K - 1, dtype=np.int64)
        self.cycle = 0  # exchange cycles done (equilibration included)

    def start(self, equilibration_cycles: int = 0) -> None:
        """Minimise at every temperature, draw velocities, run cycles (with exchanges)."""
        import openmm

        for k, context in enumerate(self.contexts):
            context.setPositions(self.positions)
            openmm.LocalEnergyMinimizer.minimize(context, 10.0, self.minimize_iterations)
            context.setVelocitiesToTemperature(self.temperatures[k], self.seed + k)
        for _ in range(equilibration_cycles):
            self.step()

    def state(self) -> bytes:
        """Everything to continue exactly from here (contexts, exchange RNG, walkers, counts)."""
        return pickle.dumps({
            "contexts": [c.createCheckpoint() for c in self.contexts],
            "rng": self.rng.bit_generator.state, "walker": self.walker.copy(),
            "attempts": self.attempts.copy(), "accepts": self.accepts.copy(), "cycle": self.cycle,
        })  # fmt: skip

    def restore(self, blob: bytes) -> None:
        saved = pickle.loads(blob)
        for context, checkpoint in zip(self.contexts, saved["contexts"], strict=True):
            context.loadCheckpoint(checkpoint)
        self.rng.bit_generator.state = saved["rng"]
        self.walker, self.attempts = saved["walker"], saved["attempts"]
        self.accepts, self.cycle = saved["accepts"], int(saved["cycle"])

    def step(self) -> Cycle:
        """One cycle: dynamics at every temperature, then one sweep of neighbour exchanges."""
        states = []
        for integrator, context in zip(self.integrators, self.contexts, strict=True):
            integrator.step(self.steps_per_cycle)
            states.append(context.getState(getPositions=True, getVelocities=True, getEnergy=True))
        xyz = np.stack([s.getPositions(asNumpy=True)._value for s in states])
        vel = np.stack([s.getVelocities(asNumpy=True)._value for s in states])
        energy = np.array([s.getPotentialEnergy()._value for s in states])
        if not (np.isfinite(energy).all() and np.isfinite(xyz).all()):
            raise RuntimeError(
                f"{self.label}: non-finite energy or positions at cycle {self.cycle} "
                "(the simulation blew up); lower the timestep"
            )
        perm = exchange(energy, self.beta, self.cycle % 2, self.rng, self.attempts, self.accepts)
        for k in np.nonzero(perm != np.arange(self.K))[0]:
            # the configuration from temperature perm[k], its velocities rescaled to T_k
            scale = math.sqrt(self.temperatures[k] / self.temperatures[perm[k]])
            self.contexts[k].setPositions(xyz[perm[k]])
            self.contexts[k].setVelocities(vel[perm[k]] * scale)
        self.walker = self.walker[perm]
        self.cycle += 1
        return Cycle(xyz, vel, energy, perm)


@dataclass(frozen=True, kw_only=True)
class ChainJob(ChunkJob):
    """One chain (picklable, for a worker process); a frame is one exchange cycle."""

    kind: ClassVar[str] = "chain"

    system_path: str
    temperatures: tuple[float, ...]  # K, ascending; frames of temperatures[0] form the dataset
    platform: str
    seed: int
    equilibration_steps: int  # per temperature, with exchanges, not saved
    minimize_iterations: int = 0


class _ChainSampler(Sampler):
    """A chain as the chunk loop sees it: the lowest temperature's frame, and every
    temperature's energy, φ, ψ and walker as per-frame extras; for a peptide of several
    residues also every temperature's φ of every residue (for their MBAR estimates)."""

    def __init__(self, job: ChainJob) -> None:
        self.system = load_system(job.system_path, job.temperatures[0])
        chain = backbone_dihedrals(self.system.topology)
        self.residue_phi = [phi for _, phi, _ in chain] if len(chain) > 1 else []
        self.equilibration_cycles = job.equilibration_steps // job.steps_per_frame
        self.engine = ReplicaExchange(
            self.system.openmm_system, self.system.positions, job.temperatures,
            lambda t, s: self.system.make_integrator(temperature=t, seed=s),
            steps_per_cycle=job.steps_per_frame, seed=job.seed, platform=job.platform,
            minimize_iterations=job.minimize_iterations, label=f"chain {job.index}",
        )  # fmt: skip

    def start(self) -> None:
        self.engine.start(self.equilibration_cycles)

    def restore(self, checkpoint: bytes) -> None:
        self.engine.restore(checkpoint)

    def checkpoint(self) -> bytes:
        return self.engine.state()

    def frame(self) -> Frame:
        walker = self.engine.walker.astype(np.int16)
        cycle = self.engine.step()
        extra = {"energies_all": cycle.energy, "walker": walker,
                 "phi_all": dihedral(cycle.xyz, self.system.phi_atoms),
                 "psi_all": dihedral(cycle.xyz, self.system.psi_atoms)}  # fmt: skip
        if self.residue_phi:
            extra["phi_residues_all"] = np.stack([dihedral(cycle.xyz, atoms)
                                                  for atoms in self.residue_phi], 1)  # fmt: skip
        return Frame(cycle.xyz[0], cycle.energy[0], extra)

    def chunk_extra(self) -> dict[str, np.ndarray]:
        return {"attempts": self.engine.attempts.copy(), "accepts": self.engine.accepts.copy()}


def run_chain(job: ChainJob, progress: Progress | None = None) -> dict:
    """Run (or continue) one chain; its statistics, with the exchange acceptance per pair."""
    sampler = _ChainSampler(job)
    stats = run_chunks(job, sampler, progress, job.steps_per_frame * len(job.temperatures))
    engine = sampler.engine
    return {**stats, "acceptance": (engine.accepts / np.maximum(engine.attempts, 1)).tolist()}


def read_chain_arrays(folder: Path) -> dict[str, np.ndarray]:
    """All chunks' per-temperature arrays of one chain: energies_all (kJ/mol), phi_all,
    psi_all (radians), walker, each [frames, K]; attempts and accepts (cumulative, [K−1]);
    phi_residues_all [frames, K, residues] (radians) when every chunk has it (runs made before
    it was recorded have not)."""
    n = complete_chunks(folder)
    if n == 0:
        raise DatasetError(f"{folder}: no complete chunk")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("energies_all", "phi_all", "psi_all",
                                                          "walker")}  # fmt: skip
    residues: list[np.ndarray] = []
    for i in range(n):
        with np.load(folder / f"chunk_{i:05d}.npz") as data:
            missing = [k for k in (*parts, "accepts") if k not in data]
            if missing:
                raise DatasetError(f"{folder}/chunk_{i:05d}.npz: no {missing}; not written by "
                                   "p4bg.remd")  # fmt: skip
            for k in parts:
                parts[k].append(data[k])
            attempts, accepts = data["attempts"], data["accepts"]
            if "phi_residues_all" in data:
                residues.append(data["phi_residues_all"])
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["attempts"], out["accepts"] = attempts, accepts
    if len(residues) == n:
        out["phi_residues_all"] = np.concatenate(residues)
    return out


def estimates(out: Path, meta: dict) -> dict[str, Any]:
    """The MBAR record of a complete run in ``out`` (``metadata.json`` → ``mbar``)."""
    chains = [read_chain_arrays(out / r["folder"]) for r in meta["replicas"]]
    system = load_system(meta.get("system_path", meta["system"]), meta["temperatures_K"][0])
    labels = [label for label, _, _ in backbone_dihedrals(system.topology)]
    return remd_estimates(chains, meta["temperatures_K"], labels)


def make_plan(
    system: MolecularSystem,
    temperatures: list[float],
    *,
    ns: float,
    exchange_every_ps: float,
    chains: int,
    seed: int,
    equilibration_ps: float,
    split: tuple[float, float, float],
    chunk_frames: int,
) -> dict[str, Any]:
    """The run as ``metadata.json`` records it: ``chains`` chains over ``temperatures``, each
    ``ns`` of production per temperature, one exchange cycle (a frame) every
    ``exchange_every_ps``."""
    steps_per_frame = whole_steps(exchange_every_ps, system, "--exchange-every-ps")
    frames = round(ns * 1000.0 / exchange_every_ps)
    if frames < 1:
        raise SystemExit(f"--ns {ns}: shorter than one exchange cycle")
    return {
        "system": system.name, "system_path": str(system.path),
        "temperature_K": temperatures[0], "kT_kJ_per_mol": R * temperatures[0],
        "temperatures_K": temperatures, "method": "replica exchange (p4bg.remd)",
        "integrator": system.integrator, "timestep_fs": system.timestep_fs,
        "friction_per_ps": system.friction_per_ps, "constraints": system.constraints,
        "ns_per_temperature_per_chain": ns, "save_every_ps": exchange_every_ps,
        "steps_per_frame": steps_per_frame, "equilibration_ps": equilibration_ps, "seed": seed,
        "replicas": [{"index": c, "folder": f"replica_{c:02d}", "frames": frames, "seed": s}
                     for c, s in enumerate(seeds(seed, chains))],
        "split_fractions": list(split), "chunk_frames": chunk_frames,
        "progress_label": f"REMD ({len(temperatures)} T)",
    }  # fmt: skip


def run(args: MDRunOptions, system: MolecularSystem, plan: dict, command: str) -> dict:
    """Run (or continue) the plan into ``args.out``; the final record, with the MBAR estimate
    (``mbar``) when complete (``already_complete`` when there was nothing to do)."""
    out = Path(args.out)
    old = prepare_output(out, plan, PLAN_KEYS, args.resume)
    if old is not None:
        return {**old, "already_complete": True}
    platform, rates = choose_platform(args.platform, system)
    meta = start_record(out, plan, platform, rates, command)
    temperatures = tuple(plan["temperatures_K"])
    jobs = [
        ChainJob(index=r["index"], system_path=str(system.path), temperatures=temperatures,
                 platform=platform, seed=r["seed"], frames=r["frames"],
                 steps_per_frame=plan["steps_per_frame"],
                 equilibration_steps=round(args.equilibration_ps * 1000.0 / system.timestep_fs),
                 chunk_frames=plan["chunk_frames"], folder=str(out / r["folder"]),
                 stop_after_chunks=args.stop_after_chunks, stop_file=args.stop_file)
        for r in plan["replicas"]
    ]  # fmt: skip
    # every temperature's MD steps: a frame at T_min costs K × steps_per_frame of them
    md_steps = plan["steps_per_frame"] * len(temperatures)
    if run_and_record(out, meta, jobs, run_chain, args, md_steps):
        meta["mbar"] = estimates(out, meta)
        meta["phi_positive_fraction"] = meta["mbar"]["phi_positive_fraction_by_temperature"][0]
    write_json(out / "metadata.json", meta)
    return meta
