"""Temporary, removed by the lead: the old import path of TorchEnergy (now in p4bg.energy)."""

from p4bg.energy import TorchEnergy, UnsupportedForceError  # noqa: F401
