"""Units and temperatures: the one place that knows R, and how a run's two temperatures resolve.

Inside p4bg energies are reduced, u = U / kT with U in kJ/mol; positions are in nm, times in ps,
temperatures in K. A run has two temperatures: the data's (the MD frames it learns from) and the
target's (of u in the energy term, the sample weights and the analysis). The target may be left
as 0 in a configuration, meaning "the data's"; :func:`resolve_temperatures` turns that into a
:class:`Temperatures` once, and every later user receives it rather than deriving it again.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MOLAR_GAS_CONSTANT", "R", "Temperatures", "beta", "kT", "resolve_temperatures"]

#: The molar gas constant in kJ/(mol K) (CODATA 2018, as OpenMM's ``MOLAR_GAS_CONSTANT_R``).
MOLAR_GAS_CONSTANT = 0.00831446261815324
R = MOLAR_GAS_CONSTANT


def kT(temperature: float) -> float:
    """kT in kJ/mol at ``temperature`` (K)."""
    return R * temperature


def beta(temperature: float) -> float:
    """1 / kT in mol/kJ at ``temperature`` (K)."""
    return 1.0 / (R * temperature)


@dataclass(frozen=True)
class Temperatures:
    """A run's data and target temperatures (K), both resolved (never 0)."""

    data: float
    target: float

    @property
    def kT(self) -> float:
        """kT of the target in kJ/mol: u = U / kT."""
        return R * self.target

    @property
    def same(self) -> bool:
        """Whether the data are a Boltzmann sample of the target (no annealing between them)."""
        return self.target == self.data


def resolve_temperatures(data: float, target: float = 0.0) -> Temperatures:
    """The data's temperature and the target's, with a target of 0 read as the data's."""
    if not data > 0:
        raise ValueError(f"temperature must be > 0 K, got {data}")
    if target < 0:
        raise ValueError(f"target_temperature must be >= 0 K (0: the data's), got {target}")
    return Temperatures(float(data), float(target) if target > 0 else float(data))
