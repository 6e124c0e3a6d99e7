"""The target energy by name: ``make_energy`` chooses between TorchEnergy and the OpenMM bridge,
and ``energy_kind`` says which one a run used."""

from __future__ import annotations

from typing import Any

import torch

from p4bg.config import ENERGIES
from p4bg.energy.forcefield import TorchEnergy
from p4bg.energy.openmm import OpenMMEnergy
from p4bg.energy.terms import UnsupportedForceError

__all__ = ["energy_kind", "make_energy"]


def make_energy(
    kind: str,
    system: Any,
    n_workers: int | None = None,
    platform: str = "auto",
    device: str | torch.device = "cpu",
    temperature: float | None = None,
    compile: bool = False,
) -> OpenMMEnergy | TorchEnergy:
    """The target energy by name, behind one call contract (``u = energy(x)``, kT, +inf for a
    failed configuration, counted in ``energy.stats``).

    ``"torch"``: :class:`TorchEnergy` on ``device`` (refuses a System with an unsupported force).
    ``"openmm"``: :class:`OpenMMEnergy`, ``n_workers`` processes on ``platform``.
    ``"auto"``: torch where every force of the System is supported, else openmm.
    A ``platform`` of ``"torch"`` (a run trained with TorchEnergy) means ``"auto"`` to OpenMM.
    ``compile``: TorchEnergy through ``torch.compile`` (about 2.5× the evaluations per second
    once compiled; ignored by OpenMM).
    """
    if kind not in ENERGIES:
        raise ValueError(f"energy must be one of {', '.join(ENERGIES)}, got {kind!r}")
    if kind in ("auto", "torch"):
        try:
            return TorchEnergy(system, temperature=temperature, compile=compile).to(device)
        except UnsupportedForceError:
            if kind == "torch":
                raise
    platform = "auto" if platform == "torch" else platform
    return OpenMMEnergy(system, n_workers=n_workers, platform=platform, temperature=temperature)


def energy_kind(energy: Any) -> str:
    """``"torch"`` or ``"openmm"``: what outputs record as the energy that was used."""
    return "torch" if isinstance(energy, TorchEnergy) else "openmm"
