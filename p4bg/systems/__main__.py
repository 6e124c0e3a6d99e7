"""Make a new system from a peptide sequence or a PDB file, or list the systems p4bg finds.

examples:
  python -m p4bg.systems new ala5 --sequence AAAAA      # ACE-(ALA)5-NME in systems/ala5/
  python -m p4bg.systems new mine --pdb protein.pdb    # hydrogens and missing atoms added
  python -m p4bg.systems list

`new` writes systems/NAME/: NAME.pdb (the atom order every file of the system uses) and
system.toml: the force field (Amber ff99SB-ILDN + OBC implicit solvent unless --forcefield),
no constraints, the MD defaults (600 K, LangevinMiddle, 1 fs), the coordinate layout made from
the bonds (rigid block: the central residue's CA and its bonded atoms; every other atom by bond,
angle and torsion) and the central residue's phi/psi. A sequence is capped with ACE and NME and
built in the polyproline II conformation; PDBFixer adds side chains and hydrogens (pH 7); the
structure is minimised. Every step taken is written at the top of system.toml. The file is
meant to be read and edited; then train on it with --system NAME in every command, e.g.
  python -m p4bg.simulate --system ala5 --ns 20 --out data/ala5_600K
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from p4bg.cli import option, parse
from p4bg.config import ConfigError
from p4bg.systems.load import SystemConfigError, load_system, system_dirs
from p4bg.systems.peptide import FORCEFIELD, PeptideError, from_pdb, from_sequence, write_system
from p4bg.zmatrix import LayoutError

__all__ = ["NewSystemOptions", "main"]

PROG = "python -m p4bg.systems"


@dataclass
class NewSystemOptions:
    """The options of ``python -m p4bg.systems new``."""

    name: str = option(help="the system's name: its folder and --system NAME", positional=True)
    sequence: str = option("", "one-letter amino acids, capped with ACE and NME (e.g. AAAAA)")
    pdb: str = option("", "a PDB file of standard residues (water and ligands are removed)")
    out: str = option("systems", "folder the system's folder goes in")
    forcefield: list[str] = option(list(FORCEFIELD), "OpenMM force field files", metavar="XML")
    temperature: float = option(600.0, "MD temperature default, K (the data's temperature)")
    constraints: str = option("None", "None, or HBonds (X-H bond lengths fixed, 2 fs MD step)")
    ph: float = option(7.0, "pH at which hydrogens are added")
    seed: int = option(0, "seed of PDBFixer's placement of missing atoms")


def _new(argv: list[str]) -> None:
    opts = parse(NewSystemOptions, argv, f"{PROG} new", __doc__ or "")
    if bool(opts.sequence) == bool(opts.pdb):
        raise ConfigError("give exactly one of --sequence and --pdb")
    if not opts.name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"name {opts.name!r}: use letters, digits, '_' and '-' only")
    forcefield = tuple(opts.forcefield)
    if opts.constraints not in ("None", "HBonds"):
        raise ConfigError(f"--constraints {opts.constraints!r}: use None or HBonds")
    if opts.sequence:
        molecule = from_sequence(opts.sequence, forcefield, opts.ph, opts.seed)
        source = f"--sequence {opts.sequence}"
    else:
        molecule = from_pdb(opts.pdb, forcefield, opts.ph, opts.seed)
        source = f"--pdb {Path(opts.pdb).name}"
    folder = Path(opts.out) / opts.name
    toml = write_system(molecule, folder, opts.name, forcefield, opts.temperature, source,
                        opts.constraints)  # fmt: skip
    system = load_system(folder)  # what every command will read: checked now
    print(f"wrote {folder}: {system.n_atoms} atoms, "
          f"{'-'.join(r.name for r in system.topology.residues)}")  # fmt: skip
    for note in molecule.notes:
        print(f"  {note}")
    print(f"  layout: rigid block {system.rigid_atoms.tolist()}, {len(system.z_matrix)} "
          f"Z-matrix rows; read and edit {toml}")  # fmt: skip


def _list() -> None:
    for base in system_dirs():
        names = sorted(p.name for p in base.iterdir() if (p / "system.toml").is_file())
        print(f"{base}: {', '.join(names) or '(none)'}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {PROG} new NAME (--sequence SEQ | --pdb FILE) [options]\n"
              f"       {PROG} list\n\n{__doc__}")  # fmt: skip
        return
    try:
        if argv[0] == "new":
            _new(argv[1:])
        elif argv[0] == "list":
            _list()
        else:
            raise ConfigError(f"unknown command {argv[0]!r}: use 'new' or 'list'")
    except (ConfigError, SystemConfigError, PeptideError, LayoutError) as err:
        print(f"p4bg.systems: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
