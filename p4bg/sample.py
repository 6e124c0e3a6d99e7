"""``python -m p4bg.sample``: draw conformations from a trained Boltzmann generator.

    python -m p4bg.sample runs/p4inv --n-samples 100000
    python -m p4bg.sample runs/p4inv --n 5000 --batch 1024 --seed 1 --device cpu --overwrite
    torchrun --standalone --nproc_per_node=2 -m p4bg.sample runs/p4inv --n-samples 100000

Under torchrun each process draws one shard of the set (``n / processes`` samples from its own
latent stream, derived from (seed, rank)) into RUN/.shards/, and rank 0 joins the shards, in
rank order, into the files below: analyze sees one sample set. One process given ``--shards
K`` makes the same K shards in turn and writes the same files.

Writes into the run folder:

    samples.dcd    positions (float32 Å, as every DCD); mdtraj, VMD and PyMOL read it with
    samples.pdb    the topology and the first sample
    samples.npz    per frame: u (kT; +inf where the energy evaluation failed), log_q (model
                   log-density on the 60-dim latent space), log_w = −u − log_q (−inf for failed
                   samples), phi and psi (radians), finite (positions finite), is_l (L-alanine)
    samples.json   counts, seed, energy platform, checkpoint step, status; temperature_K (of
                   u and log_w: the run's target temperature, or --target-temperature) and
                   data_temperature_K (of the frames the model learned from)

Energies, φ and ψ are computed from the positions exactly as stored in the DCD (rounded to
float32 Å), so that anyone re-evaluating the file gets the stored numbers. Samples are written
in chunks of ``--batch``: the DCD's header is updated with every frame and ``samples.npz`` is
replaced atomically after every chunk, so a killed run leaves valid files holding the finished
chunks (``samples.json`` then says ``"status": "running"``; the DCD may hold one more chunk than
the npz, whose frames are not yet evaluated: readers take the first ``len(u)`` frames).
Failed samples are kept and counted, never dropped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from analysis.geometry import dihedral, is_l_chirality
from p4bg import distributed
from p4bg.cli import option, parse
from p4bg.config import ENERGIES, ConfigError, TrainConfig, apply_overrides
from p4bg.coordinates import MixedCoordinateTransform
from p4bg.data import _quiet_c_stdio, write_json
from p4bg.distributed import SINGLE, World, pick_device, shard_sizes
from p4bg.energy import energy_kind, make_energy
from p4bg.flows import flow_from_config
from p4bg.forcefield import UnsupportedForceError
from p4bg.generator import BoltzmannGenerator
from p4bg.systems import MOLAR_GAS_CONSTANT, SystemConfigError, load_system

__all__ = [
    "LatentStream",
    "LoadedRun",
    "SampleWriter",
    "load_run",
    "main",
    "sample_run",
    "verify_samples",
]

SAMPLE_ARRAYS = ("u", "log_q", "log_w", "phi", "psi", "finite", "is_l")


class LoadedRun(NamedTuple):
    """A trained run, ready to sample: its configuration, system and generator (eval mode)."""

    config: TrainConfig
    system: Any  # p4bg.systems.MolecularSystem
    bg: Any  # p4bg.generator.BoltzmannGenerator, target None
    step: int
    energy_platform: str


def load_run(run: str | Path, device: str = "auto", checkpoint: str = "last") -> LoadedRun:
    """Load ``runs/NAME/checkpoint.pt`` (``checkpoint="last"``) or ``best.pt`` (``"best"``: the
    model at the lowest validation NLL) into a BoltzmannGenerator on ``device``.

    The configuration comes from the checkpoint (the one its weights belong to); the coordinate
    transform is rebuilt from its saved buffers, so the training data need not be present."""
    run = Path(run)
    if checkpoint not in ("last", "best"):
        raise ConfigError(f"--checkpoint must be 'last' or 'best', got {checkpoint!r}")
    path = run / ("checkpoint.pt" if checkpoint == "last" else "best.pt")
    if checkpoint == "best" and not path.is_file() and (run / "checkpoint.pt").is_file():
        raise ConfigError(f"{run}: no best.pt (the run was trained before p4bg kept one, or has "
                          "not validated yet); use --checkpoint last")  # fmt: skip
    if not path.is_file():
        hint = "is it a run folder?" if not run.is_dir() else "has the training saved one yet?"
        raise ConfigError(f"{run}: no checkpoint.pt ({hint}); train with `python -m p4bg.train "
                          f"--out {run}`")  # fmt: skip
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated or foreign file
        raise ConfigError(f"{path}: cannot be read ({err}); resume or retrain the run") from err
    missing = [k for k in ("config", "flow", "coordinates", "step") if k not in state]
    if missing:
        raise ConfigError(f"{path}: not a p4bg.train checkpoint (missing {missing})")
    config = apply_overrides(TrainConfig(), state["config"], str(path))
    system = load_system(config.system, config.temperature)  # the temperature it trained at
    try:
        coordinates = MixedCoordinateTransform.from_state_dict(system, state["coordinates"])
        flow = flow_from_config(config, coordinates.dim)
        flow.load_state_dict(state["flow"])
    except (ValueError, RuntimeError) as err:
        raise ConfigError(
            f"{path}: the saved model does not fit system {config.system!r} with "
            f"{config.coupling} couplings, {config.flow} mixing, {config.n_blocks} blocks, "
            f"hidden {config.hidden} ({err}); "
            "was systems/ changed since training? Retrain the run"
        ) from err
    dtype = getattr(torch, config.dtype)
    dev = pick_device(device)
    bg = BoltzmannGenerator(flow.to(dev, dtype), coordinates.to(dev, dtype), None).eval()
    return LoadedRun(config, system, bg, int(state["step"]), state.get("energy_platform", "auto"))


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
        tmp = self.folder / "samples.tmp.npz"
        np.savez(tmp, **{k: np.concatenate(v) for k, v in self.arrays.items()})
        tmp.replace(self.folder / "samples.npz")
        self._write_json("running")

    def _write_pdb(self, angstrom: np.ndarray) -> None:
        import mdtraj

        xyz = angstrom.astype(np.float64)[None] / 10.0
        if not np.isfinite(xyz).all():  # a PDB cannot hold NaN: the topology still must be there
            xyz = np.nan_to_num(xyz, nan=0.0, posinf=0.0, neginf=0.0)
        tmp = self.folder / "samples.tmp.pdb"
        mdtraj.Trajectory(xyz, self.topology).save_pdb(str(tmp))
        tmp.replace(self.folder / "samples.pdb")

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
    system, bg = loaded.system, loaded.bg
    temperature = loaded.config.target_of() if target_temperature is None else target_temperature
    kT = MOLAR_GAS_CONSTANT * temperature
    bg.prior_scale = float(prior_scale)  # log q below is the density of this tempered model
    # energy workers per node, shared by its processes under torchrun
    workers = distributed.share(loaded.config.n_workers if n_workers is None else n_workers, world)
    param = next(bg.flow.parameters())
    info = {
        "run": str(run), "checkpoint": checkpoint, "checkpoint_step": loaded.step, "seed": seed,
        "requested": n, "shards": shards, "processes": world.size,
        "batch": batch, "device": str(param.device), "prior_scale": float(prior_scale),
        "system": loaded.config.system, "temperature_K": temperature,
        "kT_kJ_per_mol": kT, "data_temperature_K": loaded.config.temperature,
        "run_target_temperature_K": loaded.config.target_of(),
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
                "finite": np.isfinite(xyz).all(axis=(1, 2)), "is_l": is_l_chirality(xyz),
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
            with _quiet_c_stdio(), DCDTrajectoryFile(str(folder / "samples.dcd")) as f:
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
    with _quiet_c_stdio(), DCDTrajectoryFile(str(run / "samples.dcd")) as f:
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


@dataclass
class SampleOptions:
    """The options of ``python -m p4bg.sample`` (and of ``torchrun … -m p4bg.sample``)."""

    run: str = option(help="run folder written by p4bg.train (holds checkpoint.pt)",
                      positional=True)  # fmt: skip
    n_samples: int = option(
        100_000, "number of samples, over all processes; --n is the same option, but "
        "torchrun's own parser takes it for its --nnodes or --nproc-per-node before p4bg sees "
        "it: use --n-samples there", aliases=("--n",))  # fmt: skip
    batch: int = option(4096, "samples per chunk")
    device: str = option("auto", "auto | cpu | cuda[:N]; under torchrun each process takes "
                         "cuda:LOCAL_RANK")  # fmt: skip
    seed: int = option(0, "seed of the prior draws; samples depend on it alone")
    shards: int | None = option(
        None, "latent streams the set is made of, one per process under torchrun (default: 1, "
        "or the number of processes); one process given torchrun's number writes the same "
        "files")  # fmt: skip
    prior_scale: float | None = option(
        None, "standard deviation τ of the prior N(0, τ²I) (default: the run's "
        "sample_prior_scale; 1: the trained model; < 1 favours low energies, log q and log w "
        "stay exact)")  # fmt: skip
    checkpoint: str = option("last", "last: checkpoint.pt (the end of training); best: best.pt, "
                             "the model at the lowest validation NLL",
                             choices=("last", "best"))  # fmt: skip
    energy: str | None = option(None, "target energy: torch (TorchEnergy on --device), openmm "
                                "(worker processes), auto (torch where the System's forces "
                                "allow) (default: the run's)", choices=ENERGIES)  # fmt: skip
    target_temperature: float | None = option(
        None, "temperature of the energies and weights (default: the run's "
        "target_temperature)", metavar="K")  # fmt: skip
    n_workers: int | None = option(None, "energy worker processes per process (default: the "
                                   "run's n_workers)")  # fmt: skip
    overwrite: bool = option(False, "replace samples already in the run folder")
    no_progress: bool = option(False, "no progress bar")
    verify: bool = option(False, "instead of sampling: recompute the stored energies and angles "
                          "of RUN's samples with OpenMM and mdtraj and print the largest "
                          "deviations")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    world = SINGLE
    try:
        args = parse(SampleOptions, argv, "python -m p4bg.sample", __doc__ or "")
        run = Path(args.run)
        if args.verify:
            result = verify_samples(run)
            print(json.dumps(result, indent=2))
            return
        if (run / "samples.npz").exists() and not args.overwrite:
            raise ConfigError(f"{run} already holds samples; pass --overwrite to replace them")
        launcher = "torchrun -m" if distributed.launched() else "python -m"
        command = f"{launcher} p4bg.sample " + " ".join(argv)
        world, device = distributed.setup(args.device)
        result = sample_run(run, args.n_samples, args.batch, device, args.seed, args.n_workers,
                            progress=not args.no_progress, command=command,
                            prior_scale=args.prior_scale, checkpoint=args.checkpoint,
                            energy=args.energy,
                            target_temperature=args.target_temperature, shards=args.shards,
                            world=world)  # fmt: skip
    except (ConfigError, SystemConfigError, UnsupportedForceError) as err:
        if os.environ.get("RANK", "0") == "0":  # said once, not by every process
            print(f"p4bg.sample: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        where = f"{run}/samples.*" if (args.shards or world.size) == 1 else f"{run}/.shards/"
        print(f"p4bg.sample: interrupted; the finished chunks are in {where}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        distributed.shutdown()
    if not world.main:
        return
    with np.load(run / "samples.npz") as data:
        u = data["u"]
    ok = np.isfinite(u)
    mean = float(np.mean(u[ok])) if ok.any() else math.nan
    print(f"{result['n_samples']} samples in {result['seconds']:.0f} s -> {run}/samples.dcd/pdb/"
          f"npz; {result['n_failed_energies']} failed energies, "
          f"{result['n_nonfinite_positions']} non-finite; mean u {mean:.2f} kT (finite), "
          f"median {float(np.median(u)):.2f} kT")  # fmt: skip


if __name__ == "__main__":
    main()
