"""Draw conformations from a trained Boltzmann generator, with their energies and weights.

examples:
  python -m p4bg.sample runs/spline300 --n-samples 100000
  python -m p4bg.sample runs/quick --n-samples 5000 --seed 1 --overwrite
  python -m p4bg.sample runs/spline --target-temperature 300 --overwrite   # weights at 300 K
  python -m p4bg.sample runs/quick --verify      # recheck stored energies with OpenMM, mdtraj
  torchrun --standalone --nproc_per_node=2 -m p4bg.sample runs/spline300 --n-samples 100000

Writes into the run folder:
  samples.dcd   positions (float32 Å); mdtraj, VMD and PyMOL read it with samples.pdb
  samples.pdb   the topology and the first sample
  samples.npz   per sample: u (kT; inf where the energy evaluation failed), log_q (the model's
                log-density), log_w = -u - log_q (the importance weight), phi, psi (radians),
                finite, is_l (L-chirality)
  samples.json  counts, seed, energy platform, checkpoint step, temperatures, status

A killed run leaves valid files holding the finished chunks; samples.json then says "running".
Under torchrun each process draws one shard and rank 0 joins them into the same files.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p4bg import distributed
from p4bg.cli import option, parse
from p4bg.config import ENERGIES, ConfigError
from p4bg.distributed import SINGLE
from p4bg.energy import UnsupportedForceError
from p4bg.sampling import sample_run, verify_samples
from p4bg.systems import SystemConfigError

__all__ = ["SampleOptions", "main"]


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
