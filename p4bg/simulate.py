"""Run molecular dynamics of a system and save the frames as a training dataset.

Examples:

    python -m p4bg.simulate --ns 20 --out data/alanine_dipeptide_600K
    python -m p4bg.simulate --system alanine_dipeptide --temperature 600 --ns 20 \\
        --save-every-ps 0.2 --replicas 2 --seed 0 --out data/alanine_dipeptide_600K
    python -m p4bg.simulate --ns 20 --out data/alanine_dipeptide_600K --resume

--ns is the total production length, shared evenly by the replicas (20 ns in 2 replicas:
10 ns each, 100,000 frames at 0.2 ps). Every replica runs in its own process with its own seed:
it minimises, equilibrates (not saved), then runs production. Frames are saved in chunks as
they come, so a killed run loses only the chunk in progress; --resume continues it from the last
complete chunk, and ends with the same frames as an uninterrupted run.

Writes into --out: metadata.json (what was run, on which platform, how fast; the fraction of
frames with phi > 0), split.json (train/val/test as time blocks of every replica) and
replica_NN/chunk_NNNNN.dcd + .npz (positions, which VMD, PyMOL and mdtraj read with the
system's PDB; energies in kJ/mol).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from p4bg.cli import Parser, option, parse
from p4bg.cli import build_parser as build_cli_parser
from p4bg.config import ConfigError
from p4bg.md import plain
from p4bg.md.output import MDRunOptions, command_line
from p4bg.systems import SystemConfigError, load_system

__all__ = ["MDRunOptions", "SimulateOptions", "build_parser", "main", "simulate"]

PROG = "python -m p4bg.simulate"


@dataclass(kw_only=True)
class SimulateOptions(MDRunOptions):
    """The options of ``python -m p4bg.simulate``; :func:`simulate` reads them."""

    temperature: float | None = option(None, "K (default: the system's)")
    ns: float = option(help="total production length over all replicas")
    save_every_ps: float = option(0.2)
    replicas: int = option(2)
    chunk_frames: int = option(2500, "frames per file")


def simulate(args: SimulateOptions) -> dict:
    """Run (or continue) the MD the options describe; the final ``metadata.json`` record."""
    system = load_system(args.system, args.temperature)
    plan = plain.make_plan(system, ns=args.ns, save_every_ps=args.save_every_ps,
                           replicas=args.replicas, seed=args.seed,
                           equilibration_ps=args.equilibration_ps, split=args.split,
                           chunk_frames=args.chunk_frames)  # fmt: skip
    return plain.run(args, system, plan, command_line("p4bg.simulate"))


def build_parser() -> Parser:
    """The parser of ``python -m p4bg.simulate`` (made from :class:`SimulateOptions`)."""
    return build_cli_parser(SimulateOptions, PROG, __doc__ or "")


def _check(args: SimulateOptions) -> None:
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(SimulateOptions, argv, PROG, __doc__ or "")
        _check(args)
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
