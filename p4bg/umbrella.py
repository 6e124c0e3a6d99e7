"""Estimate a dataset's free energy dF(phi > 0 vs phi < 0) by umbrella sampling along phi.

Examples:

    python -m p4bg.umbrella data/alanine_dipeptide_300K_remd        # 36 windows x 0.5 ns
    python -m p4bg.umbrella data/alanine_dipeptide_300K_remd --windows 24 --psi-windows 12
    python -m p4bg.umbrella data/alanine_dipeptide_600K --ns 1 --workers 8
    python -m p4bg.umbrella data/alanine_tetrapeptide_300K_remd --residue ALA2   # any residue

The phi > 0 population of alanine dipeptide is set by rare barrier crossings, which plain MD
and even replica exchange see only a few hundred times. Umbrella sampling runs one short MD per
window, each held near its own phi (a harmonic restraint of strength --k), so that every part
of the phi axis, barriers included, is sampled; MBAR (pymbar) then joins the windows into the
unrestrained free energy at the dataset's temperature. With --psi-windows the windows form a
grid over phi and psi. The dataset's frames (or those of --start-frames) start the windows and
remain its reference Ramachandran map.

The angles are the system's own phi and psi (its central residue) unless --residue names
another residue of the chain; p4bg.analyze lists the labels in its per-residue table.

Writes into the dataset folder: umbrella/window_NNN.npz (each window's phi and psi series) and,
in metadata.json, "umbrella": dF in kT with its uncertainty, the estimates from the first and
second halves of every window (a check of equilibration), and the options used, which
p4bg.analyze reports as the reference free energy. Another residue's windows go to
umbrella_LABEL/ and its record to "umbrella_residues" -> LABEL, which p4bg.analyze reports as
that residue's reference free energy. Run the same command again after a kill:
finished windows are kept, unfinished ones continue from their last saved chunk.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from p4bg.cli import option, parse
from p4bg.config import ConfigError
from p4bg.data import DatasetError
from p4bg.md import umbrella as windows
from p4bg.md.output import command_line
from p4bg.systems import SystemConfigError

__all__ = ["UmbrellaOptions", "main", "umbrella"]


@dataclass(kw_only=True)
class UmbrellaOptions:
    """The options of ``python -m p4bg.umbrella``; :func:`umbrella` reads them."""

    dataset: str = option(help="dataset folder (p4bg.remd or p4bg.simulate); its temperature is "
                          "used, its frames start the windows", positional=True)  # fmt: skip
    windows: int = option(36, "restraint centres")
    k: float = option(300.0, "on φ, kJ/mol/rad²")
    psi_windows: int = option(0, "restraint centres along ψ too: a grid of windows x "
                              "psi-windows (0: φ alone)")  # fmt: skip
    k_psi: float = option(100.0, "on ψ, kJ/mol/rad²")
    residue: str | None = option(None, "whose φ and ψ, a label like ALA3 (default: the "
                                 "system's own, its central residue)")  # fmt: skip
    start_frames: str | None = option(None, "dataset whose frames start the windows (default: "
                                      "DATASET)")  # fmt: skip
    ns: float = option(0.5, "production per window")
    save_every_ps: float = option(0.1)
    equilibration_ps: float = option(20.0, "per window")
    seed: int = option(0)
    platform: str = option("auto", "auto (measured), Reference, CPU, …")
    workers: int = option(0, "processes (default: one per core)")
    no_progress: bool = option(False)


def umbrella(args: UmbrellaOptions) -> dict:
    """Run the windows the options describe and record the estimate; returns it."""
    return windows.run(
        Path(args.dataset), windows=args.windows, k=args.k, psi_windows=args.psi_windows,
        k_psi=args.k_psi, start_frames=Path(args.start_frames) if args.start_frames else None,
        ns=args.ns, save_every_ps=args.save_every_ps, equilibration_ps=args.equilibration_ps,
        seed=args.seed, platform=args.platform, workers=args.workers,
        progress_bar=not args.no_progress, command=command_line("p4bg.umbrella"),
        residue=args.residue,
    )  # fmt: skip


def _check(args: UmbrellaOptions) -> None:
    if args.psi_windows < 0 or (args.psi_windows and not args.k_psi > 0):
        raise ConfigError("--psi-windows must be >= 0, and --k-psi > 0 with it")
    if args.windows < 4 or not args.k > 0 or not args.ns > 0 or not args.save_every_ps > 0:
        raise ConfigError("need --windows >= 4 and --k, --ns, --save-every-ps > 0")
    if args.equilibration_ps < 0 or args.workers < 0:
        raise ConfigError("--equilibration-ps and --workers must be >= 0")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(UmbrellaOptions, argv, "python -m p4bg.umbrella", __doc__ or "")
        _check(args)
        result = umbrella(args)
    except (ConfigError, DatasetError, SystemConfigError) as err:
        print(f"p4bg.umbrella: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished windows are kept in {args.dataset}/umbrella*; continue "
              "with the same command", file=sys.stderr)  # fmt: skip
        raise SystemExit(130) from None
    which = f"{args.residue}, " if args.residue else ""
    print(f"ΔF({which}{result['temperature_K']:g} K) = {result['delta_f']:.3f} ± "
          f"{result['delta_f_err']:.3f} kT (umbrella, MBAR; halves "
          f"{', '.join(f'{d:.2f}' for d in result['delta_f_halves'])}); "
          f"{result['wall_seconds']:.0f} s wall")  # fmt: skip


if __name__ == "__main__":
    main()
