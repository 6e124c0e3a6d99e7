"""Sample a system at a low temperature by replica exchange, and estimate its free energy.

Examples:

    python -m p4bg.remd --ns 10 --out data/alanine_dipeptide_300K_remd
    python -m p4bg.remd --t-min 300 --t-max 800 --n-temperatures 8 --ns 10 --chains 4 \\
        --seed 1 --out data/alanine_dipeptide_300K_remd8
    python -m p4bg.remd --ns 10 --out data/alanine_dipeptide_300K_remd --resume
    python -m p4bg.remd --out data/alanine_dipeptide_300K_remd --reestimate

At 300 K plain MD of alanine dipeptide rarely crosses into phi > 0; at 600 K it crosses every
few hundred ps. Replica exchange (parallel tempering) runs one copy of the molecule at every
temperature of a geometric ladder from --t-min to --t-max, and every --exchange-every-ps tries
to swap neighbouring temperatures' configurations (Metropolis rule, velocities rescaled to the
new temperature). The lowest temperature's frames are then a Boltzmann sample there that keeps
crossing between the basins. --chains independent chains run in parallel processes; --ns is the
production of each chain at each temperature.

Writes into --out a dataset at the lowest temperature that p4bg.train and p4bg.analyze
--reference read as they read plain MD (replica_NN = chain NN), whose chunks also keep every
temperature's energies, phi and psi (of a peptide's every residue, phi). metadata.json records
the free energy dF(phi > 0 vs phi < 0) at --t-min in kT, from MBAR over every temperature
(pymbar), with its uncertainty, each chain's own estimate, the exchange acceptance and the
walkers' round trips, and for a peptide each residue's own estimate ("residues");
--reestimate recomputes it from the saved chunks without running MD. --resume continues a
killed run from the last complete chunk, with the same frames as an uninterrupted run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from p4bg.cli import option, parse
from p4bg.config import ConfigError
from p4bg.data import DatasetError, load_metadata
from p4bg.files import write_json
from p4bg.md import exchange
from p4bg.md.output import MDRunOptions, command_line
from p4bg.systems import SystemConfigError, load_system

__all__ = ["RemdOptions", "main", "remd"]

PROG = "python -m p4bg.remd"


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


def remd(args: RemdOptions) -> dict:
    """Run (or continue) the replica exchange the options describe; the final record."""
    temperatures = exchange.geometric_ladder(args.t_min, args.t_max, args.n_temperatures)
    system = load_system(args.system, temperatures[0])
    plan = exchange.make_plan(system, temperatures, ns=args.ns or 0.0,
                              exchange_every_ps=args.exchange_every_ps, chains=args.chains,
                              seed=args.seed, equilibration_ps=args.equilibration_ps,
                              split=args.split, chunk_frames=args.chunk_frames)  # fmt: skip
    return exchange.run(args, system, plan, command_line("p4bg.remd"))


def _check(args: RemdOptions) -> None:
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


def _summary(m: dict, temperature: float) -> str:
    return (f"ΔF({temperature:g} K) = {m['delta_f']:.3f} ± {m['delta_f_err']:.3f} kT (MBAR; "
            f"chains {', '.join(f'{d:.2f}' for d in m['delta_f_chains'])})")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(RemdOptions, argv, PROG, __doc__ or "")
        _check(args)
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
        meta["mbar"] = exchange.estimates(Path(args.out), meta)
        write_json(Path(args.out) / "metadata.json", meta)
        print(_summary(meta["mbar"], meta["temperature_K"]))
    elif meta.get("already_complete"):
        print(f"{args.out} is already complete; nothing to do")
    elif meta["status"] == "complete":
        m = meta["mbar"]
        print(f"wrote {args.out} in {meta['wall_seconds']:.0f} s "
              f"({meta['steps_per_second_total']:,.0f} MD steps/s over {meta['workers']} "
              f"processes); acceptance {', '.join(f'{a:.2f}' for a in m['acceptance'])}; "
              f"{m['round_trips']} round trips; "
              f"{_summary(m, meta['temperature_K'])}")  # fmt: skip
    else:
        print(f"stopped early: {args.out} is incomplete; continue with --resume", file=sys.stderr)


if __name__ == "__main__":
    main()
