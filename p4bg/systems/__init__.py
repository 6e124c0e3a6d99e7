"""Molecular systems: a folder per molecule (a PDB and a ``system.toml``), loaded by
:func:`load_system`, and new ones made from a sequence or a PDB (``python -m p4bg.systems new``).

``load``: the folder into a :class:`MolecularSystem`; ``peptide``: a capped peptide's folder
from a sequence or a PDB; ``__main__``: the command line.
"""

from p4bg.systems.load import (
    INSTALLED_SYSTEMS_DIR,
    SYSTEMS_DIR,
    MolecularSystem,
    SystemConfigError,
    available_platforms,
    load_system,
    measure_platforms,
    system_dirs,
)

__all__ = [
    "INSTALLED_SYSTEMS_DIR",
    "SYSTEMS_DIR",
    "MolecularSystem",
    "SystemConfigError",
    "available_platforms",
    "load_system",
    "measure_platforms",
    "system_dirs",
]
