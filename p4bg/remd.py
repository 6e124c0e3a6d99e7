"""``python -m p4bg.remd``: a converged low-temperature reference by replica exchange (parallel
tempering) over a temperature ladder, with the free energy from MBAR over every temperature.

    python -m p4bg.remd --t-min 300 --t-max 600 --n-temperatures 6 --ns 10 --chains 2 \\
        --seed 0 --out data/alanine_dipeptide_300K_remd

At 300 K plain MD of alanine dipeptide rarely crosses into φ > 0; at 600 K it crosses every few
hundred ps. Each chain runs one Langevin replica per temperature (geometric ladder), and every
``--exchange-every-ps`` it attempts swaps of neighbouring temperatures (even pairs, then odd
pairs), accepted with the Metropolis probability ``min(1, exp((β_i − β_j)(U_i − U_j)))``;
velocities are rescaled by ``sqrt(T_new/T_old)``. The configurations at the lowest
temperature are a Boltzmann sample at that temperature that keeps mixing between the basins.

Chains are independent (own seeds) and run in parallel processes, one per core. Output is an
ordinary p4bg dataset at the lowest temperature (``replica_CC`` = chain CC's frames at T_min, so
that ``p4bg.analyze --reference`` and ``p4bg.data.load_dataset`` read it as they read MD), and
each chunk's ``.npz`` also holds, for every saved exchange cycle and every temperature, the
potential energy and φ/ψ (``energies_all``, ``phi_all``, ``psi_all`` [frames, K]) and which
walker sat there (``walker``). ``--resume`` continues a killed run from the last complete chunk
(every context's OpenMM checkpoint, the walkers and the exchange RNG are stored with it), so an
interrupted run ends with the same frames as an uninterrupted one.

The ΔF(φ > 0 vs φ < 0) at T_min is estimated with pymbar's MBAR from all temperatures' frames
(``metadata.json`` → ``mbar``): samples are first thinned by the largest statistical
inefficiency (pymbar.timeseries) of the φ > 0 indicator over the temperatures' series, and the
uncertainty is MBAR's asymptotic one, propagated δΔF = δp / (p(1 − p)). Each chain's own MBAR
value is recorded too, as an independent check. Why not openmmtools' ReplicaExchangeSampler:
it stores every iteration in a NetCDF file through netCDF4 and mpiplus for a 22-atom molecule
whose dynamics take microseconds per step; the exchange itself is ten lines, while the
estimator, where mistakes hide, is pymbar's.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import pickle
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis.geometry import dihedral
from p4bg.cli import option, parse
from p4bg.config import ConfigError
from p4bg.data import (
    DatasetError,
    complete_chunks,
    load_metadata,
    make_split,
    resume_point,
    write_chunk,
    write_json,
)
from p4bg.simulate import MDRunOptions, _choose_platform, _run_jobs, _versions
from p4bg.systems import SystemConfigError, load_system

__all__ = [
    "ChainJob",
    "RemdOptions",
    "geometric_ladder",
    "main",
    "mbar_delta_f",
    "remd",
    "run_chain",
]

REPORT_EVERY = 50  # saved cycles between progress messages from a worker


@dataclass(kw_only=True)
class RemdOptions(MDRunOptions):
    """The options of ``python -m p4bg.remd``; :func:`remd` reads them."""

    t_min: float = option(300.0, "K, the reference's")
    t_max: float = option(600.0, "K, the hottest")
    n_temperatures: int = option(6, "geometric ladder")
    ns: float | None = option(None, "production per temperature per chain (total MD: ns × K × "
                              "chains)")  # fmt: skip
    exchange_every_ps: float = option(0.5, "MD between exchange attempts; each cycle is saved")
    chains: int = option(2, "independent chains")
    chunk_frames: int = option(2000, "cycles per file")
    reestimate: bool = option(False, "no MD: recompute the MBAR record of a complete --out from "
                              "its chunks (after a change of the estimator)")  # fmt: skip


def geometric_ladder(t_min: float, t_max: float, n: int) -> list[float]:
    """``n`` temperatures (K) from ``t_min`` to ``t_max`` with a constant ratio: for a system of
    roughly constant heat capacity this gives equal exchange acceptance between neighbours."""
    if n < 2 or not 0 < t_min < t_max:
        raise ValueError(f"need n >= 2 and 0 < t_min < t_max, got {n}, {t_min}, {t_max}")
    return [float(t_min * (t_max / t_min) ** (k / (n - 1))) for k in range(n)]


@dataclass(frozen=True)
class ChainJob:
    """Everything one chain's worker process needs (picklable)."""

    index: int
    system_path: str
    temperatures: tuple[float, ...]  # K, ascending; frames of temperatures[0] form the dataset
    platform: str
    seed: int
    frames: int  # saved exchange cycles
    steps_per_frame: int  # MD steps per cycle (one exchange attempt per cycle)
    equilibration_steps: int  # per temperature, with exchanges, not saved
    chunk_frames: int
    folder: str
    minimize_iterations: int = 0
    stop_after_chunks: int | None = None  # testing hook: simulate a kill after this many chunks


class _Chain:
    """The K contexts of one chain; context k always runs at temperatures[k], configurations
    move between them."""

    def __init__(self, job: ChainJob) -> None:
        import openmm

        self.job = job
        self.system = load_system(job.system_path, job.temperatures[0])
        self.K = len(job.temperatures)
        platform = openmm.Platform.getPlatformByName(job.platform)
        seeds = np.random.SeedSequence(job.seed).generate_state(self.K + 1, dtype=np.uint32)
        self.integrators = [
            self.system.make_integrator(temperature=t, seed=int(s % 2_000_000_000) + 1)
            for t, s in zip(job.temperatures, seeds[: self.K], strict=True)
        ]
        self.contexts = [
            openmm.Context(self.system.openmm_system, integrator, platform)
            for integrator in self.integrators
        ]
        self.beta = 1.0 / (8.314462618e-3 * np.asarray(job.temperatures))  # mol/kJ
        self.rng = np.random.default_rng(int(seeds[self.K]))
        self.walker = np.arange(self.K)  # which walker (initial replica) is at temperature k
        self.attempts = np.zeros(self.K - 1, dtype=np.int64)
        self.accepts = np.zeros(self.K - 1, dtype=np.int64)
        self.cycle = 0  # exchange cycles done (equilibration included)

    def start(self) -> None:
        import openmm

        for k, context in enumerate(self.contexts):
            context.setPositions(self.system.positions)
            openmm.LocalEnergyMinimizer.minimize(context, 10.0, self.job.minimize_iterations)
            context.setVelocitiesToTemperature(self.job.temperatures[k], self.job.seed + k)
        for _ in range(self.job.equilibration_steps // self.job.steps_per_frame):
            self.step()

    def state(self) -> bytes:
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
        self.walker, self.attempts, self.accepts = (
            saved["walker"],
            saved["attempts"],
            saved["accepts"],
        )
        self.cycle = int(saved["cycle"])

    def step(self) -> tuple[np.ndarray, np.ndarray]:
        """One cycle: dynamics at every temperature, then one sweep of neighbour exchanges.
        Returns the configurations (nm, [K, atoms, 3]) and potential energies (kJ/mol, [K]) at
        each temperature *before* the exchange (both are Boltzmann samples at their
        temperature)."""
        states = []
        for integrator, context in zip(self.integrators, self.contexts, strict=True):
            integrator.step(self.job.steps_per_frame)
            states.append(context.getState(getPositions=True, getVelocities=True, getEnergy=True))
        xyz = np.stack([s.getPositions(asNumpy=True)._value for s in states])
        vel = np.stack([s.getVelocities(asNumpy=True)._value for s in states])
        energy = np.array([s.getPotentialEnergy()._value for s in states])
        if not (np.isfinite(energy).all() and np.isfinite(xyz).all()):
            raise RuntimeError(f"chain {self.job.index}: non-finite energy or positions at "
                               f"cycle {self.cycle} (the simulation blew up); lower the "
                               "timestep")  # fmt: skip
        perm = exchange(energy, self.beta, self.cycle % 2, self.rng, self.attempts, self.accepts)
        temps = np.asarray(self.job.temperatures)
        for k in np.nonzero(perm != np.arange(self.K))[0]:
            # the configuration from temperature perm[k], its velocities rescaled to T_k
            self.contexts[k].setPositions(xyz[perm[k]])
            self.contexts[k].setVelocities(vel[perm[k]] * math.sqrt(temps[k] / temps[perm[k]]))
        self.walker = self.walker[perm]
        self.cycle += 1
        return xyz, energy


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
    U_{k+1}))), which keeps the product of the K Boltzmann distributions invariant. Returns
    ``perm`` [K]: temperature k receives the configuration that was at ``perm[k]``. Counts
    per pair are added to ``attempts`` and ``accepts`` when given."""
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


def run_chain(job: ChainJob, progress: Any = None) -> dict:
    """Run (or continue) one chain; return its statistics. Runs inside a worker process."""
    chain = _Chain(job)
    folder = Path(job.folder)
    done_chunks, frames_done, blob, step = resume_point(folder)
    if blob is not None:
        chain.restore(blob)
        if progress is not None:
            progress.put(("resumed", job.index, frames_done))
    else:
        chain.start()
    system = chain.system
    parent = os.getppid()
    start = time.perf_counter()
    new_frames = 0
    chunk = done_chunks
    while frames_done < job.frames:
        if job.stop_after_chunks is not None and chunk - done_chunks >= job.stop_after_chunks:
            break
        m = min(job.chunk_frames, job.frames - frames_done)
        xyz0 = np.empty((m, system.n_atoms, 3))
        energies = np.empty((m, chain.K))
        phi = np.empty((m, chain.K))
        psi = np.empty((m, chain.K))
        walker = np.empty((m, chain.K), dtype=np.int16)
        steps = np.empty(m, dtype=np.int64)
        for f in range(m):
            walker[f] = chain.walker
            xyz, energies[f] = chain.step()
            xyz0[f] = xyz[0]
            phi[f] = dihedral(xyz, system.phi_atoms)
            psi[f] = dihedral(xyz, system.psi_atoms)
            step += job.steps_per_frame
            steps[f] = step
            if progress is not None and (f + 1) % REPORT_EVERY == 0:
                progress.put(("frames", job.index, REPORT_EVERY))
                if os.getppid() != parent:
                    raise SystemExit(f"chain {job.index}: parent process gone, stopping")
        extra = {"energies_all": energies, "phi_all": phi, "psi_all": psi, "walker": walker,
                 "attempts": chain.attempts.copy(), "accepts": chain.accepts.copy()}  # fmt: skip
        write_chunk(folder, chunk, xyz0, energies[:, 0], steps, chain.state(), extra)
        if progress is not None and m % REPORT_EVERY:
            progress.put(("frames", job.index, m % REPORT_EVERY))
        frames_done += m
        new_frames += m
        chunk += 1
    seconds = time.perf_counter() - start
    md_steps = new_frames * job.steps_per_frame * chain.K
    return {
        "index": job.index,
        "frames_done": frames_done,
        "new_frames": new_frames,
        "seconds": seconds,
        "steps_per_second": md_steps / seconds if seconds > 0 else math.nan,
        "acceptance": (chain.accepts / np.maximum(chain.attempts, 1)).tolist(),
    }


def _chain_worker(job: ChainJob, progress: Any) -> None:
    try:
        progress.put(("done", job.index, run_chain(job, progress)))
    except BaseException:
        progress.put(("error", job.index, traceback.format_exc()))


def read_chain_arrays(folder: Path) -> dict[str, np.ndarray]:
    """All chunks' per-temperature arrays of one chain: energies_all (kJ/mol), phi_all,
    psi_all (radians), walker, each [frames, K]; attempts and accepts (cumulative, [K−1])."""
    n = complete_chunks(folder)
    if n == 0:
        raise DatasetError(f"{folder}: no complete chunk")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("energies_all", "phi_all", "psi_all",
                                                          "walker")}  # fmt: skip
    for i in range(n):
        with np.load(folder / f"chunk_{i:05d}.npz") as data:
            missing = [k for k in (*parts, "accepts") if k not in data]
            if missing:
                raise DatasetError(f"{folder}/chunk_{i:05d}.npz: no {missing}; not written by "
                                   "p4bg.remd")  # fmt: skip
            for k in parts:
                parts[k].append(data[k])
            attempts, accepts = data["attempts"], data["accepts"]
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["attempts"], out["accepts"] = attempts, accepts
    return out


@contextlib.contextmanager
def _quiet() -> Any:
    """pymbar announces on import that JAX is missing, on stdout and through logging."""
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            # log(0) of an indicator's zeros inside MBAR's expectations: expected, harmless
            warnings.filterwarnings("ignore", "divide by zero", RuntimeWarning)
            # a negative rounding residue under the square root of an error not asked for;
            # an error that is asked for and not finite shows as NaN in the result
            warnings.filterwarnings("ignore", "invalid value encountered in sqrt", RuntimeWarning)
            yield
    finally:
        logging.disable(level)


def _mbar_phi_positive(
    energy: np.ndarray,
    indicator: np.ndarray,
    n_k: np.ndarray,
    beta: np.ndarray,
    initial_f_k: np.ndarray | None = None,
) -> tuple[float, float, np.ndarray]:
    """MBAR's P(φ>0) at the first temperature with its asymptotic error, and the states' f_k.
    energy, indicator: all frames [N] ordered by state, n_k frames per state. Without a φ>0
    frame (or without a φ<0 one) the probability is 0 (or 1) with an unknown error: MBAR's
    expectation would take the log of 0."""
    if not 0 < indicator.sum() < len(indicator):
        with _quiet():
            import pymbar

            mbar = pymbar.MBAR(beta[:, None] * energy[None, :], n_k, initial_f_k=initial_f_k)
        return float(indicator.mean() > 0), math.nan, mbar.f_k
    with _quiet():
        import pymbar

        mbar = pymbar.MBAR(beta[:, None] * energy[None, :], n_k, initial_f_k=initial_f_k,
                           solver_protocol="robust")  # fmt: skip
        result = mbar.compute_expectations(indicator, compute_uncertainty=True)
    return float(result["mu"][0]), float(result["sigma"][0]), mbar.f_k


def _stack(energies: list[np.ndarray], phi: list[np.ndarray], rows: list[np.ndarray]) -> tuple:
    """The frames ``rows[c]`` of each chain c, ordered by temperature: (energy, φ>0, n_k)."""
    K = energies[0].shape[1]
    e = [energies[c][rows[c]] for c in range(len(energies))]
    ind = [(phi[c][rows[c]] > 0).astype(np.float64) for c in range(len(phi))]
    energy = np.concatenate([x[:, k] for k in range(K) for x in e])
    indicator = np.concatenate([x[:, k] for k in range(K) for x in ind])
    n_k = np.full(K, sum(len(r) for r in rows), dtype=np.int64)
    return energy, indicator, n_k


def _delta_f(p: float) -> float:
    """−ln(p/(1−p)), kT: +inf when no frame has φ > 0, −inf when all have."""
    if p <= 0:
        return math.inf
    return -math.inf if p >= 1 else math.log((1 - p) / p)


def mbar_delta_f(
    energies: list[np.ndarray],
    phi: list[np.ndarray],
    temperatures: list[float],
    n_bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """ΔF(φ>0 vs φ<0) at ``temperatures[0]`` (kT) by MBAR over all temperatures.

    energies, phi: one array [frames, K] per chain (kJ/mol, radians; column k sampled at
    temperatures[k]). The estimate uses every frame. Its uncertainty (``delta_f_err``) is
    MBAR's asymptotic one on the frames thinned by g, the largest statistical inefficiency of
    the φ>0 indicator over the temperatures' series (pymbar.timeseries). With
    ``n_bootstrap`` > 0 it is instead the standard deviation over a moving-block bootstrap:
    each chain's exchange cycles cut into blocks of 10 g cycles, drawn with replacement, all
    temperatures of a cycle together (they are correlated through the exchanges), MBAR solved
    again on each resample (minutes per resample for a 30-minute run on these CPUs)."""
    with _quiet():
        from pymbar import timeseries

    beta = 1.0 / (8.314462618e-3 * np.asarray(temperatures, dtype=np.float64))
    K = len(temperatures)
    g = 1.0
    for p in phi:
        for k in range(K):
            series = (p[:, k] > 0).astype(np.float64)
            if 0 < series.mean() < 1:
                with _quiet():
                    g = max(g, float(timeseries.statistical_inefficiency(series)))
    stride = max(1, math.ceil(g))
    full = [np.arange(len(e)) for e in energies]
    p, _, f_k = _mbar_phi_positive(*_stack(energies, phi, full), beta)
    thinned = [np.arange(0, len(e), stride) for e in energies]
    p_thin, dp_thin, _ = _mbar_phi_positive(*_stack(energies, phi, thinned), beta, f_k)
    rng = np.random.default_rng(seed)
    block = stride * 10
    boot = []
    for _ in range(n_bootstrap):
        rows = []
        for e in energies:
            n = len(e)
            length = min(block, n)
            starts = rng.integers(0, n - length + 1, math.ceil(n / length))
            rows.append((starts[:, None] + np.arange(length)[None, :]).ravel()[:n])
        boot.append(_delta_f(_mbar_phi_positive(*_stack(energies, phi, rows), beta, f_k)[0]))
    asymptotic = dp_thin / (p_thin * (1 - p_thin)) if 0 < p_thin < 1 else math.inf
    err = asymptotic
    if n_bootstrap:
        boot_arr = np.asarray(boot)
        ok = np.isfinite(boot_arr)
        err = float(np.std(boot_arr[ok], ddof=1)) if ok.sum() >= 2 else math.nan
        if ok.sum() < len(boot_arr):  # a resample without any φ > 0 frame: ΔF = +inf there
            err = math.inf
    return {
        "delta_f": _delta_f(p), "delta_f_err": err, "phi_positive_fraction": p,
        "delta_f_err_asymptotic": asymptotic,
        "delta_f_thinned": _delta_f(p_thin), "statistical_inefficiency": g, "stride": stride,
        "bootstrap": {"n": n_bootstrap, "block_cycles": block, "seed": seed},
        "n_samples": int(sum(len(e) for e in energies) * K),
        "temperature_K": float(temperatures[0]),
    }  # fmt: skip


def remd_estimates(out: Path, meta: dict) -> dict[str, Any]:
    """MBAR over all chains (and each chain alone), exchange acceptance, walker round trips."""
    chains = [read_chain_arrays(out / r["folder"]) for r in meta["replicas"]]
    temps = meta["temperatures_K"]
    pooled = mbar_delta_f([c["energies_all"] for c in chains], [c["phi_all"] for c in chains],
                          temps)  # fmt: skip
    per_chain = [mbar_delta_f([c["energies_all"]], [c["phi_all"]], temps) for c in chains]
    attempts = sum(c["attempts"] for c in chains)
    accepts = sum(c["accepts"] for c in chains)
    return {
        **pooled,
        "delta_f_chains": [c["delta_f"] for c in per_chain],
        "delta_f_err_chains": [c["delta_f_err"] for c in per_chain],
        "acceptance": (accepts / np.maximum(attempts, 1)).tolist(),
        "round_trips": int(sum(_round_trips(c["walker"]) for c in chains)),
        "phi_positive_fraction_by_temperature": [
            float(np.mean(np.concatenate([c["phi_all"][:, k] for c in chains]) > 0))
            for k in range(len(temps))
        ],
    }


def _round_trips(walker: np.ndarray) -> int:
    """Walks from the lowest temperature to the highest and back, summed over the walkers."""
    K = walker.shape[1]
    trips = 0
    for w in range(K):
        where = np.argmax(walker == w, axis=1)  # the temperature index walker w sits at
        target, legs = K - 1, 0
        for k in where:
            if k == target:
                legs += 1
                target = 0 if target == K - 1 else K - 1
        trips += legs // 2
    return trips


def _plan(args: RemdOptions, system: Any, temperatures: list[float]) -> dict:
    steps_per_frame = args.exchange_every_ps * 1000.0 / system.timestep_fs
    if abs(steps_per_frame - round(steps_per_frame)) > 1e-6 or round(steps_per_frame) < 1:
        raise SystemExit(f"--exchange-every-ps {args.exchange_every_ps}: must be a whole number "
                         f"of {system.timestep_fs} fs timesteps")  # fmt: skip
    steps_per_frame = round(steps_per_frame)
    frames = round(args.ns * 1000.0 / args.exchange_every_ps)
    if frames < 1:
        raise SystemExit(f"--ns {args.ns}: shorter than one exchange cycle")
    seeds = np.random.SeedSequence(args.seed).generate_state(args.chains, dtype=np.uint32)
    chains = [{"index": c, "folder": f"replica_{c:02d}", "frames": frames,
               "seed": int(seeds[c] % 2_000_000_000) + 1} for c in range(args.chains)]  # fmt: skip
    return {
        "system": system.name, "system_path": str(system.path),
        "temperature_K": temperatures[0], "kT_kJ_per_mol": 8.314462618e-3 * temperatures[0],
        "temperatures_K": temperatures, "method": "replica exchange (p4bg.remd)",
        "integrator": system.integrator, "timestep_fs": system.timestep_fs,
        "friction_per_ps": system.friction_per_ps, "constraints": system.constraints,
        "ns_per_temperature_per_chain": args.ns, "save_every_ps": args.exchange_every_ps,
        "steps_per_frame": steps_per_frame, "equilibration_ps": args.equilibration_ps,
        "seed": args.seed, "replicas": chains, "split_fractions": list(args.split),
        "chunk_frames": args.chunk_frames, "progress_label": f"REMD ({len(temperatures)} T)",
    }  # fmt: skip


_PLAN_KEYS = ("system", "temperatures_K", "timestep_fs", "save_every_ps", "steps_per_frame",
              "seed", "replicas")  # fmt: skip


def remd(args: RemdOptions) -> dict:
    """Run the whole job of the parsed command line; return the final metadata."""
    out = Path(args.out)
    temperatures = geometric_ladder(args.t_min, args.t_max, args.n_temperatures)
    system = load_system(args.system, temperatures[0])
    plan = _plan(args, system, temperatures)
    if out.exists() and any(out.iterdir()):
        if not args.resume:
            raise SystemExit(f"--out {out} exists and is not empty; add --resume to continue "
                             "that run, or choose another --out")  # fmt: skip
        try:
            old = load_metadata(out)
        except DatasetError as err:
            raise SystemExit(f"--resume: {err}") from err
        changed = [k for k in _PLAN_KEYS if old.get(k) != plan[k]]
        if changed:
            raise SystemExit(f"--resume: {out} was made with different "
                             f"{', '.join(changed)}; use the same options as the original run, "
                             "or another --out")  # fmt: skip
        if old.get("status") == "complete":
            return {**old, "already_complete": True}
    out.mkdir(parents=True, exist_ok=True)
    platform, rates = _choose_platform(args.platform, system)
    meta = {**plan, "platform": platform, "platform_steps_per_second": rates,
            "versions": _versions(), "status": "running",
            "command": " ".join([Path(sys.executable).name, "-m", "p4bg.remd", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    write_json(out / "metadata.json", meta)
    jobs = [
        ChainJob(index=r["index"], system_path=str(system.path), temperatures=tuple(temperatures),
                 platform=platform, seed=r["seed"], frames=r["frames"],
                 steps_per_frame=plan["steps_per_frame"],
                 equilibration_steps=round(args.equilibration_ps * 1000.0 / system.timestep_fs),
                 chunk_frames=args.chunk_frames, folder=str(out / r["folder"]),
                 stop_after_chunks=args.stop_after_chunks)
        for r in plan["replicas"]
    ]  # fmt: skip
    workers = args.workers or min(len(jobs), os.cpu_count() or 1)
    start = time.perf_counter()
    results = _run_jobs(jobs, workers, plan, not args.no_progress, target=_chain_worker)
    wall = time.perf_counter() - start
    finished = all(r["frames_done"] == j.frames for r, j in zip(results, jobs, strict=True))
    new_steps = sum(r["new_frames"] for r in results) * plan["steps_per_frame"] * len(temperatures)
    meta.update(
        status="complete" if finished else "interrupted", wall_seconds=wall, workers=workers,
        # all temperatures' MD steps: a frame at T_min costs K × steps_per_frame of them
        steps_per_second_total=new_steps / wall if wall > 0 else math.nan,
        steps_per_second_per_replica=[r["steps_per_second"] for r in results],
    )  # fmt: skip
    if finished:
        write_json(out / "split.json", make_split([j.frames for j in jobs], tuple(args.split)))
        meta["mbar"] = remd_estimates(out, meta)
        meta["phi_positive_fraction"] = meta["mbar"]["phi_positive_fraction_by_temperature"][0]
    write_json(out / "metadata.json", meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(RemdOptions, argv, "python -m p4bg.remd", __doc__ or "")
        if args.ns is None and not args.reestimate:
            raise ConfigError("--ns is required (production per temperature per chain)")
        if not args.reestimate and (not args.ns > 0 or not args.exchange_every_ps > 0):
            raise ConfigError(f"--ns and --exchange-every-ps must be > 0, got {args.ns}, "
                              f"{args.exchange_every_ps}")  # fmt: skip
        if args.n_temperatures < 2 or not 0 < args.t_min < args.t_max:
            raise ConfigError(f"need --n-temperatures >= 2 and 0 < --t-min < --t-max, got "
                              f"{args.n_temperatures}, {args.t_min}, {args.t_max}")  # fmt: skip
        if args.chains < 1 or args.workers < 0 or args.chunk_frames < 1:
            raise ConfigError("--chains and --chunk-frames must be >= 1, --workers >= 0")
        if args.equilibration_ps < 0:
            raise ConfigError(f"--equilibration-ps must be >= 0, got {args.equilibration_ps}")
        if args.reestimate:
            meta = load_metadata(args.out)
            if meta.get("status") != "complete":
                raise ConfigError(f"--reestimate: {args.out} is not complete; finish it with "
                                  "--resume")  # fmt: skip
        else:
            meta = remd(args)
    except (ConfigError, DatasetError, SystemConfigError) as err:
        print(f"p4bg.remd: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished chunks are kept in {args.out}; continue with the same "
              "command and --resume", file=sys.stderr)  # fmt: skip
        raise SystemExit(130) from None
    if args.reestimate:
        meta["mbar"] = remd_estimates(Path(args.out), meta)
        write_json(Path(args.out) / "metadata.json", meta)
        m = meta["mbar"]
        print(
            f"ΔF({meta['temperature_K']:g} K) = {m['delta_f']:.3f} ± {m['delta_f_err']:.3f} "
            f"kT (MBAR; chains {', '.join(f'{d:.2f}' for d in m['delta_f_chains'])})"
        )
        return
    if meta.get("already_complete"):
        print(f"{args.out} is already complete; nothing to do")
    elif meta["status"] == "complete":
        m = meta["mbar"]
        print(f"wrote {args.out} in {meta['wall_seconds']:.0f} s "
              f"({meta['steps_per_second_total']:,.0f} MD steps/s over {meta['workers']} "
              f"processes); acceptance {', '.join(f'{a:.2f}' for a in m['acceptance'])}; "
              f"{m['round_trips']} round trips; ΔF({meta['temperature_K']:g} K) = "
              f"{m['delta_f']:.3f} ± {m['delta_f_err']:.3f} kT (MBAR; chains "
              f"{', '.join(f'{d:.2f}' for d in m['delta_f_chains'])})")  # fmt: skip
    else:
        print(f"stopped early: {args.out} is incomplete; continue with --resume", file=sys.stderr)


if __name__ == "__main__":
    main()
