"""Bijections of p4bg, on torch alone: the contract and its combinators (base), P4Inv and its
merge schedule (p4inv, merge), RealNVP and rational-quadratic spline couplings, the fixed swap,
dense and LU linear layers and the Bent identity. Contract (docs/design.md §2): ``forward`` maps
latent -> configuration and ``inverse`` configuration -> latent; both return ``(out, ladj)``
with ``ladj = log|det ∂out/∂in|`` of shape [batch]."""

from p4bg.nn.base import Bijection, Inverse, Sequential
from p4bg.nn.bent import BentIdentity
from p4bg.nn.coupling import RealNVPCoupling, Swap
from p4bg.nn.linear import DenseLinear, LULinear
from p4bg.nn.merge import MergeStats, P4Merger, reset_optimizer_state
from p4bg.nn.p4inv import MergeResult, P4Inv, p4inv_penalty
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
