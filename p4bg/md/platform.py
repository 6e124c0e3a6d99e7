"""Which OpenMM platform a run uses, and the software versions recorded with its data."""

from __future__ import annotations

import platform as platform_module

import numpy as np

from p4bg import __version__
from p4bg.systems import MolecularSystem, available_platforms, measure_platforms

__all__ = ["choose_platform", "versions"]


def choose_platform(name: str, system: MolecularSystem) -> tuple[str, dict[str, float]]:
    """The platform to run ``system`` on, and the MD steps/s measured to choose it.

    name: a platform (``Reference``, ``CPU``, ``CUDA``, ``OpenCL``; refused with the list of
    those available when this machine lacks it) or ``auto``: each available platform runs a
    short MD of ``system`` and the fastest wins (for a 22-atom molecule the single-threaded
    ``Reference`` usually beats ``CPU``). The rates are empty for a named platform.
    """
    if name != "auto":
        if name not in available_platforms():
            raise SystemExit(
                f"--platform {name}: not available here; available: {available_platforms()}"
            )
        return name, {}
    rates = measure_platforms(system)
    return max(rates, key=rates.__getitem__), rates


def versions() -> dict[str, str]:
    """The versions of p4bg, Python and the libraries that shape the frames (for metadata)."""
    import mdtraj
    import openmm

    return {
        "p4bg": __version__,
        "python": platform_module.python_version(),
        "numpy": np.__version__,
        "openmm": openmm.__version__,
        "mdtraj": mdtraj.__version__,
    }
