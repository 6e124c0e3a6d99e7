"""Bijections of p4bg. Contract (DESIGN.md §2): ``forward`` maps latent -> configuration and
``inverse`` configuration -> latent; both return ``(out, ladj)`` with ``ladj`` of shape [batch]."""

from p4bg.nn.base import Bijection, Inverse, Sequential
from p4bg.nn.bent import BentIdentity
from p4bg.nn.coupling import RealNVPCoupling, Swap
from p4bg.nn.linear import DenseLinear, LULinear
from p4bg.nn.p4inv import (
    MergeResult,
    MergeStats,
    P4Inv,
    P4Merger,
    p4inv_penalty,
    reset_optimizer_state,
)
from p4bg.nn.spline import SplineCoupling, rational_quadratic_spline

__all__ = [
    "BentIdentity",
    "Bijection",
    "DenseLinear",
    "Inverse",
    "LULinear",
    "MergeResult",
    "MergeStats",
    "P4Inv",
    "P4Merger",
    "RealNVPCoupling",
    "Sequential",
    "SplineCoupling",
    "Swap",
    "p4inv_penalty",
    "rational_quadratic_spline",
    "reset_optimizer_state",
]
