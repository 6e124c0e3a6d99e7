"""The target energy: reduced energies ``u = U/kT`` of positions (shape [batch, 3·n_atoms], nm)
with forces as their autograd gradient. The package owns the two implementations behind one
contract (:mod:`~p4bg.energy.base`: ``u = energy(x)``, ``EnergyStats``, a failed configuration
is ``+inf``, counted, never 0): the OpenMM bridge with its worker processes
(:mod:`~p4bg.energy.openmm`, :mod:`~p4bg.energy.worker`), TorchEnergy, the same force field as
batched torch code (:mod:`~p4bg.energy.forcefield` on :mod:`~p4bg.energy.terms`), and
``make_energy``, which picks one by name (:mod:`~p4bg.energy.make`). The names below load their
module on first use, so that a worker process (``python -m p4bg.energy.worker``) imports numpy
and OpenMM only, not torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from p4bg.energy.base import Energy, EnergyStats
    from p4bg.energy.forcefield import TorchEnergy
    from p4bg.energy.make import energy_kind, make_energy
    from p4bg.energy.openmm import OpenMMEnergy
    from p4bg.energy.terms import UnsupportedForceError
    from p4bg.energy.worker import evaluate_frames

_HOME = {
    "Energy": "base",
    "EnergyStats": "base",
    "OpenMMEnergy": "openmm",
    "TorchEnergy": "forcefield",
    "UnsupportedForceError": "terms",
    "energy_kind": "make",
    "evaluate_frames": "worker",
    "make_energy": "make",
}

__all__ = [
    "Energy",
    "EnergyStats",
    "OpenMMEnergy",
    "TorchEnergy",
    "UnsupportedForceError",
    "energy_kind",
    "evaluate_frames",
    "make_energy",
]


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use (PEP 562)."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
