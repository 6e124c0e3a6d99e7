"""What the two target energies share: the call contract, the counters and the autograd backward.

Both :class:`p4bg.energy.OpenMMEnergy` and :class:`p4bg.energy.TorchEnergy` turn positions ``x``
(shape [batch, 3·n_atoms], nm) into reduced energies ``u = U/kT`` (shape [batch]) whose gradient
is the force the same evaluation computed, ``∂u/∂x = −F/kT``. A configuration that cannot be
evaluated is never 0: it is ``+inf`` with gradient 0, counted in :class:`EnergyStats` and
flagged in ``last_failed``, so a capped or masked loss can leave it out.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from p4bg.systems import MolecularSystem
from p4bg.units import kT

__all__ = ["Energy", "EnergyFunction", "EnergyStats", "resolve_target"]


@dataclass
class EnergyStats:
    """Counters since the energy was created."""

    evaluations: int = 0  # frames evaluated
    failures: int = 0  # frames returned as +inf
    worker_restarts: int = 0  # workers replaced after dying or timing out (OpenMM only)


def resolve_target(owner: str, system: Any, temperature: float | None) -> tuple[Any, float]:
    """The ``openmm.System`` and the temperature (K) an energy is built for.

    ``system`` is a :class:`p4bg.systems.MolecularSystem` (its temperature unless ``temperature``
    overrides it) or an ``openmm.System`` (then ``temperature`` is required); ``owner`` names the
    class in the error messages."""
    import openmm

    if isinstance(system, MolecularSystem):
        temperature = system.temperature if temperature is None else temperature
        system = system.openmm_system
    elif not isinstance(system, openmm.System):
        raise TypeError(
            f"{owner}: system must be a MolecularSystem or an openmm.System, "
            f"got {type(system).__name__}"
        )
    if temperature is None:
        raise ValueError(f"{owner}: an openmm.System needs temperature= (K)")
    if not temperature > 0:
        raise ValueError(f"{owner}: temperature must be > 0 K, got {temperature}")
    return system, float(temperature)


class Energy(abc.ABC):
    """Reduced energy ``u(x) = U(x)/kT`` of a System's force field at one temperature.

    Attributes: ``n_atoms``; ``dim`` = 3·n_atoms; ``temperature`` (K); ``kT`` (kJ/mol);
    ``platform`` (the OpenMM platform, or ``"torch"``); ``stats`` (:class:`EnergyStats`);
    ``last_failed`` (numpy bool flags of the last call's frames that came back as ``+inf``).
    Use as a context manager, or call :meth:`close`.
    """

    platform: str

    def __init__(self, n_atoms: int, temperature: float) -> None:
        self.n_atoms = int(n_atoms)
        self.dim = 3 * self.n_atoms
        self.temperature = float(temperature)
        self.kT = kT(self.temperature)  # kJ/mol

    @abc.abstractmethod
    def __call__(self, x: Tensor) -> Tensor:
        """Reduced energies of ``x`` [batch, 3·n_atoms] nm: shape [batch] kT, same dtype and
        device, differentiable (``∂u/∂x = −F/kT``)."""

    @abc.abstractmethod
    def evaluate(self, xyz: np.ndarray, forces: bool = True) -> tuple[np.ndarray, Any]:
        """``(u, ∂u/∂x)`` in kT and kT/nm for ``xyz`` [batch, 3·n_atoms] nm as numpy float64
        (the gradient ``None`` without ``forces``); failed frames have ``u = +inf``, gradient 0."""

    @property
    def evaluations(self) -> int:
        """Frames evaluated so far, read without waiting for a device (``stats`` may)."""
        return self.stats.evaluations

    def check_positions(self, x: Tensor) -> None:
        """Refuse ``x`` unless it has shape [batch, 3·n_atoms]."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"{type(self).__name__}: expected positions of shape [batch, {self.dim}] (nm), "
                f"got {list(x.shape)}"
            )

    def close(self) -> None:  # noqa: B027 (not abstract: TorchEnergy holds nothing to release)
        """Release what the energy holds (idempotent); nothing by default."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EnergyFunction(torch.autograd.Function):
    """u = U(x)/kT with backward grad_u · (−F/kT): a subclass's forward evaluates energy and
    forces together and saves ``∂u/∂x`` (0 for a failed configuration, never NaN); the backward
    only scales it, with no second evaluation."""

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_u: Tensor) -> tuple[Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad_u.unsqueeze(1) * grad, None
