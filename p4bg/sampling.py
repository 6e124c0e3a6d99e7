"""Drawing samples from a trained run, and writing them as a reader expects them.

A sample set is written into the run folder as samples.dcd (positions, float32 Å as every DCD),
samples.pdb (the topology and the first sample), samples.npz (per frame: u in kT, +inf where
the energy evaluation failed; log_q, the model's log-density; log_w = −u − log_q, −inf for
failed samples; phi and psi in radians; finite; is_l) and samples.json (counts, seed, energy
platform, checkpoint step, status, temperature_K of u and log_w and data_temperature_K of the
frames the model learned from). Energies and angles are computed from the positions as stored
(rounded to float32 Å), so that anyone re-evaluating the file gets the stored numbers. Chunks of
``batch`` are appended as they are made and samples.npz is replaced atomically after each, so a
killed run leaves valid files holding the finished chunks (samples.json then says "running").
Failed samples are kept and counted, never dropped.

A set can be made of shards, each from its own latent stream seeded from (seed, shard): one
process per shard under torchrun, or one process making them in turn; the files are the same.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from analysis.geometry import dihedral
from p4bg import distributed, units
from p4bg.config import ENERGIES, ConfigError
from p4bg.distributed import SINGLE, World, shard_sizes
from p4bg.energy import energy_kind, make_energy
from p4bg.files import quiet_c_stdio, write_atomic, write_json
from p4bg.runs import load_run
from p4bg.systems import load_system

__all__ = [
    "SAMPLE_ARRAYS",
    "LatentStream",
    "SampleWriter",
    "merge_shards",
    "sample_run",
    "shard_seed",
    "to_dcd_precision",
    "verify_samples",
]

SAMPLE_ARRAYS = ("u", "log_q", "log_w", "phi", "psi", "finite", "is_l")


def to_dcd_precision(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions as a DCD stores them: ``(Å float32 [n, atoms, 3], nm float64 [n, atoms, 3])``.

    x: positions [n, 3·atoms] nm. The float64 nm array is exactly what a reader gets back from
    the DCD's Å (divided by 10 in float64), so energies computed from it are reproducible."""
    angstrom = np.asarray(x, dtype=np.float32).reshape(len(x), -1, 3) * np.float32(10.0)
    return angstrom, angstrom.astype(np.float64) / 10.0


def shard_seed(seed: int, shard: int) -> int:
    """The latent stream's seed of shard ``shard`` of a sample set with seed ``seed``: shard 0
    keeps ``seed`` itself (a single process's samples are shard 0's), the others get
    independent seeds derived from (seed, shard) by NumPy's SeedSequence."""
    if shard == 0:
        return seed
    state = np.random.SeedSequence([seed, shard]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) % 2**63


class LatentStream:
    """Prior draws z ~ N(0, I) as one reproducible stream per seed (and model dtype): drawn on
    the CPU in fixed blocks, so that the samples do not depend on ``--batch`` or the device.
    ``shard``: the stream of one shard of a sample set (:func:`shard_seed`)."""

    BLOCK = 4096

    def __init__(self, seed: int, dim: int, dtype: torch.dtype, shard: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(shard_seed(seed, shard))
        self.dim, self.dtype = dim, dtype
        self.buffer = torch.empty(0, dim, dtype=dtype)

    def take(self, n: int) -> Tensor:
        """The next ``n`` draws, shape [n, dim], on the CPU."""
        while len(self.buffer) < n:
            block = torch.randn(self.BLOCK, self.dim, generator=self.generator, dtype=self.dtype)
            self.buffer = torch.cat([self.buffer, block])
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out


class SampleWriter:
    """Writes samples.dcd/pdb/npz/json chunk by chunk (see the module docstring)."""

    def __init__(self, folder: Path, topology: Any, info: dict[str, Any]) -> None:
        from mdtraj.formats import DCDTrajectoryFile

        self.folder = folder
        self.topology = topology
        self.info = dict(info)
        self.arrays: dict[str, list[np.ndarray]] = {k: [] for k in SAMPLE_ARRAYS}
        self.n = 0
        for name in ("samples.npz", "samples.pdb", "samples.json"):
            (folder / name).unlink(missing_ok=True)
        self._dcd = DCDTrajectoryFile(str(folder / "samples.dcd"), "w", force_overwrite=True)
        self._write_json("running")

    def _write_json(self, status: str) -> None:
        counts = {
            "n_samples": self.n,
            "n_nonfinite_positions": int(sum((~a).sum() for a in self.arrays["finite"])),
            "n_failed_energies": int(sum((~np.isfinite(a)).sum() for a in self.arrays["u"])),
        }
        write_json(self.folder / "samples.json", {**self.info, **counts, "status": status})

    def write(self, angstrom: np.ndarray, arrays: dict[str, np.ndarray], save: bool = True) -> None:
        """Append one chunk: positions (Å float32 [n, atoms, 3]) and its per-frame arrays;
        ``save``: replace samples.npz now (else at :meth:`save` or :meth:`close`)."""
        if self.n == 0:
            self._write_pdb(angstrom[0])
        self._dcd.write(angstrom)
        for key in SAMPLE_ARRAYS:
            self.arrays[key].append(arrays[key])
        self.n += len(angstrom)
        if save:
            self.save()

    def save(self) -> None:
        """samples.npz with every chunk so far (atomically), and samples.json "running"."""
        arrays = {k: np.concatenate(v) for k, v in self.arrays.items()}
        write_atomic(self.folder / "samples.npz", lambda tmp: np.savez(tmp, **arrays))
        self._write_json("running")

    def _write_pdb(self, angstrom: np.ndarray) -> None:
        import mdtraj

        xyz = angstrom.astype(np.float64)[None] / 10.0
        if not np.isfinite(xyz).all():  # a PDB cannot hold NaN: the topology still must be there
            xyz = np.nan_to_num(xyz, nan=0.0, posinf=0.0, neginf=0.0)
        frame = mdtraj.Trajectory(xyz, self.topology)
        write_atomic(self.folder / "samples.pdb", lambda tmp: frame.save_pdb(str(tmp)))

    def close(self, status: str = "complete") -> None:
        self._dcd.close()
        self._write_json(status)


def sample_run(
    run: str | Path,
    n: int,
    batch: int = 4096,
    device: str = "auto",
    seed: int = 0,
    n_workers: int | None = None,
    progress: bool = True,
    command: str | None = None,
    prior_scale: float | None = None,
    checkpoint: str = "last",
    energy: str | None = None,
    target_temperature: float | None = None,
    shards: int | None = None,
    world: World = SINGLE,
) -> dict[str, Any]:
    """Draw ``n`` samples from ``run`` and write them (module docstring); returns samples.json.
    ``checkpoint``: "last" (checkpoint.pt) or "best" (best.pt, lowest validation NLL).
    ``prior_scale``: τ of the prior N(0, τ²I); None takes the run's ``sample_prior_scale``.
    ``energy``: auto | openmm | torch (p4bg.energy.make_energy); None takes the run's.
    ``target_temperature``: K of the energies and weights; None takes the run's target (a 600 K
    model's samples weighted to 300 K, for instance: the weights stay exact, the ESS says how
    far the model is from that density).
    ``shards``: the sample set is made of this many shards, each from its own latent stream
    (:func:`shard_seed`) with ``n / shards`` samples, written in shard order. Under torchrun
    (``world``) rank r makes shard r (shards = the number of processes); one process makes
    them in turn, so that the files are the same either way. Default: 1, or the processes."""
    shards = world.size if shards is None else shards
    if n < 1 or batch < 1:
        raise ConfigError(f"--n-samples and --batch must be >= 1, got {n} and {batch}")
    if not 1 <= shards <= n:
        raise ConfigError(f"--shards must be in [1, --n-samples], got {shards}")
    if world.distributed and shards != world.size:
        raise ConfigError(f"--shards {shards} under torchrun with {world.size} processes: each "
                          "process makes one shard; leave --shards out")  # fmt: skip
    if prior_scale is not None and not 0 < prior_scale <= 10:
        raise ConfigError(f"--prior-scale must be in (0, 10], got {prior_scale}")
    if target_temperature is not None and not 0 < target_temperature < 1e5:
        raise ConfigError(f"--target-temperature must be in (0, 1e5) K, got {target_temperature}")
    if energy is not None and energy not in ENERGIES:
        raise ConfigError(f"--energy must be one of {', '.join(ENERGIES)}, got {energy!r}")
    run = Path(run)
    loaded = load_run(run, device, checkpoint)
    energy = loaded.config.energy if energy is None else energy
    if prior_scale is None:
        prior_scale = loaded.config.sample_prior_scale
    system = loaded.system
    bg = loaded.bg.tempered(prior_scale)  # log q below is the density of this tempered model
    temperatures = loaded.config.temperatures()
    temperature = temperatures.target if target_temperature is None else target_temperature
    kT = units.kT(temperature)
    # energy workers per node, shared by its processes under torchrun
    workers = distributed.share(loaded.config.n_workers if n_workers is None else n_workers, world)
    param = next(bg.flow.parameters())
    info = {
        "run": str(run), "checkpoint": checkpoint, "checkpoint_step": loaded.step, "seed": seed,
        "requested": n, "shards": shards, "processes": world.size,
        "batch": batch, "device": str(param.device), "prior_scale": float(prior_scale),
        "system": loaded.config.system, "temperature_K": temperature,
        "kT_kJ_per_mol": kT, "data_temperature_K": loaded.config.temperature,
        "run_target_temperature_K": temperatures.target,
        "command": command or f"p4bg.sample.sample_run({str(run)!r}, {n}, batch={batch}, "
        f"seed={seed})",
    }  # fmt: skip
    if shards > 1 and world.main:  # no earlier sample set stays visible while this one is made
        for name in ("samples.npz", "samples.pdb", "samples.json", "samples.dcd"):
            (run / name).unlink(missing_ok=True)
    start = time.perf_counter()
    mine = [world.rank] if world.distributed else list(range(shards))
    sizes = shard_sizes(n, shards)
    target = make_energy(energy, system, n_workers=workers, platform=loaded.energy_platform,
                         device=param.device, temperature=temperature)  # fmt: skip
    with target as energy:
        info["energy"], info["energy_platform"] = energy_kind(energy), energy.platform
        bar = tqdm(total=sum(sizes[k] for k in mine), desc="sampling", unit="conf",
                   disable=not (progress and world.main))  # fmt: skip
        try:
            for k in mine:
                folder = run if shards == 1 else _shard_folder(run, k)
                folder.mkdir(parents=True, exist_ok=True)
                stream = LatentStream(seed, bg.dim, param.dtype, shard=k)
                _sample_shard(bg, energy, system, stream, sizes[k], batch, prior_scale,
                              SampleWriter(folder, system.topology, {**info, "shard": k}),
                              bar, start)  # fmt: skip
        finally:
            bar.close()
    if shards > 1:
        distributed.barrier(world)
        if world.main:
            info["seconds"] = round(time.perf_counter() - start, 3)
            merge_shards(run, [_shard_folder(run, k) for k in range(shards)], system.topology, info)
        distributed.barrier(world)
    return json.loads((run / "samples.json").read_text())


def _shard_folder(run: Path, shard: int) -> Path:
    return run / ".shards" / f"shard{shard}"


def _sample_shard(bg: Any, energy: Any, system: Any, stream: LatentStream, n: int,
                  batch: int, prior_scale: float, writer: SampleWriter, bar: Any,
                  start: float) -> None:  # fmt: skip
    """Draw ``n`` samples from ``stream`` in chunks of ``batch`` into ``writer``."""
    status = "failed"
    clamped = int(bg.coordinates.n_clamped)  # counted since the model was loaded
    try:
        done = 0
        param = next(bg.flow.parameters())
        while done < n:
            size = min(batch, n - done)
            with torch.no_grad():
                z = prior_scale * stream.take(size).to(param.device)
                x, log_q = bg.generate(z)
            angstrom, xyz = to_dcd_precision(x.cpu().numpy())
            log_q = log_q.double().cpu().numpy()
            u, _ = energy.evaluate(xyz.reshape(size, -1), forces=False)
            with np.errstate(invalid="ignore"):
                log_w = -u - log_q
            writer.write(angstrom, {
                "u": u, "log_q": log_q, "log_w": log_w,
                "phi": dihedral(xyz, system.phi_atoms), "psi": dihedral(xyz, system.psi_atoms),
                "finite": np.isfinite(xyz).all(axis=(1, 2)), "is_l": system.is_l(xyz),
            })  # fmt: skip
            done += size
            bar.update(size)
            bar.set_postfix(failed=energy.stats.failures)
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Exception as err:
        status = f"failed: {type(err).__name__}: {err}"
        raise
    finally:
        writer.info["seconds"] = round(time.perf_counter() - start, 3)
        # near-degenerate geometry and torsion tails beyond float resolution (coordinates)
        writer.info["n_clamped_coordinates"] = int(bg.coordinates.n_clamped) - clamped
        writer.close(status)


def merge_shards(run: Path, folders: list[Path], topology: Any, info: dict[str, Any]) -> None:
    """Join the shards' files, in shard order, into ``run``'s samples.dcd/pdb/npz/json (the
    set analyze reads), then remove them. A shard that did not complete stops the merge."""
    states = [json.loads((f / "samples.json").read_text()) for f in folders]
    unfinished = [str(f) for f, st in zip(folders, states, strict=True)
                  if st.get("status") != "complete"]  # fmt: skip
    if unfinished:
        raise ConfigError(f"shards {unfinished} did not complete; sample again with --overwrite")
    from mdtraj.formats import DCDTrajectoryFile

    writer = SampleWriter(run, topology, info)
    clamped = 0
    try:
        for folder, state in zip(folders, states, strict=True):
            with quiet_c_stdio(), DCDTrajectoryFile(str(folder / "samples.dcd")) as f:
                angstrom = f.read()[0]
            with np.load(folder / "samples.npz") as data:
                arrays = {k: data[k] for k in SAMPLE_ARRAYS}
            writer.write(angstrom, arrays, save=False)  # the npz once, not once per shard
            clamped += int(state.get("n_clamped_coordinates", 0))
        writer.info["n_clamped_coordinates"] = clamped
        writer.save()
        writer.close("complete")
    except BaseException:
        writer.close("failed: merging the shards")
        raise
    for folder in folders:
        shutil.rmtree(folder)
    if not any((run / ".shards").iterdir()):
        (run / ".shards").rmdir()


def verify_samples(run: str | Path, limit: int | None = None) -> dict[str, float]:
    """Recompute the stored φ/ψ with mdtraj and the energies with a fresh OpenMM Context
    (independently of p4bg's energy bridge) from ``samples.dcd``; returns the largest deviations.

    Positions are read as the DCD stores them (float32 Å) and converted to nm in float64; the
    first ``limit`` frames are checked (all by default)."""
    import mdtraj
    import openmm
    import openmm.unit as unit
    from mdtraj.formats import DCDTrajectoryFile

    run = Path(run)
    missing = [f for f in ("samples.json", "samples.npz", "samples.dcd", "samples.pdb")
               if not (run / f).is_file()]  # fmt: skip
    if missing:
        raise ConfigError(f"{run}: {missing} missing; nothing to verify (run p4bg.sample first)")
    info = json.loads((run / "samples.json").read_text())
    with np.load(run / "samples.npz") as data:
        stored = {k: data[k] for k in ("u", "phi", "psi")}
    n = len(stored["u"]) if limit is None else min(limit, len(stored["u"]))
    with quiet_c_stdio(), DCDTrajectoryFile(str(run / "samples.dcd")) as f:
        angstrom = f.read(n_frames=n)[0]
    if len(angstrom) < n:
        raise ConfigError(f"{run}/samples.dcd holds {len(angstrom)} frames, samples.npz {n}")
    xyz = angstrom.astype(np.float64) / 10.0
    topology = mdtraj.load_topology(str(run / "samples.pdb"))
    traj = mdtraj.Trajectory(xyz, topology)

    def angle_error(a: np.ndarray, b: np.ndarray) -> float:
        d = np.abs(a - b)
        d = np.minimum(d, 2 * np.pi - d)
        return float(np.nanmax(d)) if np.isfinite(d).any() else 0.0

    system = load_system(str(info.get("system", "alanine_dipeptide")))
    context = openmm.Context(
        system.openmm_system,
        openmm.VerletIntegrator(0.001),
        # samples scored by TorchEnergy are checked against OpenMM's Reference platform
        openmm.Platform.getPlatformByName(
            "Reference" if info["energy_platform"] == "torch" else info["energy_platform"]
        ),
    )
    u = np.full(n, np.inf)
    for i, frame in enumerate(xyz):
        if np.isfinite(frame).all():
            context.setPositions(frame * unit.nanometer)
            energy = context.getState(getEnergy=True).getPotentialEnergy()
            u[i] = energy.value_in_unit(unit.kilojoule_per_mole) / info["kT_kJ_per_mol"]
    u[~np.isfinite(u)] = np.inf
    same_failures = bool(np.array_equal(np.isfinite(u), np.isfinite(stored["u"][:n])))
    ok = np.isfinite(u) & np.isfinite(stored["u"][:n])
    return {
        "frames": n,
        "max_abs_du_kT": float(np.max(np.abs(u[ok] - stored["u"][:n][ok]))) if ok.any() else 0.0,
        "same_failures": same_failures,
        "max_abs_dphi_rad": angle_error(mdtraj.compute_phi(traj)[1][:, 0], stored["phi"][:n]),
        "max_abs_dpsi_rad": angle_error(mdtraj.compute_psi(traj)[1][:, 0], stored["psi"][:n]),
    }
