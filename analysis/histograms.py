"""Dihedral histograms, their KL divergences, ΔF of the φ basins and chirality (docs/design.md
§5).

Angles are radians on [−π, π], arrays of shape (N,); weights, when given, are importance weights
of the same shape (normalised or not). Samples with a non-finite angle are left out of the
histograms and of ΔF, which are normalised over the samples that have finite angles, so that a
model that diverged on some samples is still scored on the others.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "EPS",
    "PHI_BINS",
    "RAMA_BINS",
    "chirality_violations",
    "delta_f",
    "delta_f_error",
    "delta_f_of_fraction",
    "delta_f_with_error",
    "finite_angles",
    "kl_1d",
    "kl_divergence",
    "ramachandran_histogram",
    "ramachandran_kl",
    "ramachandran_tv",
    "total_variation",
]

EPS = 1e-10  # the ε of the KL definition
RAMA_BINS = 64  # per axis, on [−π, π]²
PHI_BINS = 200  # 1-D φ and ψ histograms
_RANGE = (-math.pi, math.pi)


def finite_angles(phi: np.ndarray, psi: np.ndarray | None = None) -> np.ndarray:
    """Mask, shape (N,), of the samples whose φ (and ψ, if given) are finite: the ones a
    histogram or ΔF can use."""
    ok = np.isfinite(phi)
    return ok if psi is None else ok & np.isfinite(psi)


def ramachandran_histogram(
    phi: np.ndarray,
    psi: np.ndarray,
    weights: np.ndarray | None = None,
    bins: int = RAMA_BINS,
) -> np.ndarray:
    """Density (``density=True``) on a ``bins × bins`` grid over [−π, π]², φ along axis 0.

    Samples with non-finite angles are left out (and their weight with them)."""
    ok = finite_angles(phi, psi)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)[ok]
    if not ok.any() or (w is not None and not w.sum() > 0):
        raise ValueError("ramachandran_histogram: no sample with finite angles and weight")
    hist, _, _ = np.histogram2d(phi[ok], psi[ok], bins=bins, range=[_RANGE, _RANGE], weights=w,
                                density=True)  # fmt: skip
    return hist


def _histogram_1d(angle: np.ndarray, weights: np.ndarray | None, bins: int) -> np.ndarray:
    ok = finite_angles(angle)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)[ok]
    if not ok.any() or (w is not None and not w.sum() > 0):
        raise ValueError("histogram: no sample with a finite angle and weight")
    hist, _ = np.histogram(angle[ok], bins=bins, range=_RANGE, weights=w, density=True)
    return hist


def kl_divergence(p: np.ndarray, q: np.ndarray, cell: float) -> float:
    """``Σ p log((p+ε)/(q+ε)) · cell`` for densities p (reference) and q (model) on one grid."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    return float(np.sum(p * np.log((p + EPS) / (q + EPS))) * cell)


def ramachandran_kl(
    phi_ref: np.ndarray,
    psi_ref: np.ndarray,
    phi: np.ndarray,
    psi: np.ndarray,
    weights: np.ndarray | None = None,
    bins: int = RAMA_BINS,
) -> float:
    """KL(MD ‖ model) of the φ/ψ densities on a ``bins × bins`` grid (docs/design.md §5)."""
    return kl_divergence(*_rama_pair(phi_ref, psi_ref, phi, psi, weights, bins))


def _rama_pair(
    phi_ref: np.ndarray,
    psi_ref: np.ndarray,
    phi: np.ndarray,
    psi: np.ndarray,
    weights: np.ndarray | None,
    bins: int,
) -> tuple[np.ndarray, np.ndarray, float]:
    """The MD and the model's φ/ψ densities on one grid, and the grid's cell area."""
    p = ramachandran_histogram(phi_ref, psi_ref, bins=bins)
    q = ramachandran_histogram(phi, psi, weights, bins=bins)
    return p, q, (2 * math.pi / bins) ** 2


def total_variation(p: np.ndarray, q: np.ndarray, cell: float) -> float:
    """``½ Σ |p − q| · cell`` for densities p and q on one grid: the largest difference in
    probability the two give any set of cells, in [0, 1]."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    return float(0.5 * np.sum(np.abs(p - q)) * cell)


def ramachandran_tv(
    phi_ref: np.ndarray,
    psi_ref: np.ndarray,
    phi: np.ndarray,
    psi: np.ndarray,
    weights: np.ndarray | None = None,
    bins: int = RAMA_BINS,
) -> float:
    """Total variation between the MD and the model's φ/ψ histograms on a ``bins × bins``
    grid (the "Ramachandran TV" of CMT, arXiv:2510.18460). Unlike the KL it needs no ε and
    is symmetric and bounded, so a model that misses a basin scores that basin's population,
    not a number set by ε."""
    return total_variation(*_rama_pair(phi_ref, psi_ref, phi, psi, weights, bins))


def kl_1d(
    angle_ref: np.ndarray,
    angle: np.ndarray,
    weights: np.ndarray | None = None,
    bins: int = PHI_BINS,
) -> float:
    """KL(MD ‖ model) of one dihedral's density with ``bins`` bins on [−π, π]."""
    p = _histogram_1d(angle_ref, None, bins)
    q = _histogram_1d(angle, weights, bins)
    return kl_divergence(p, q, 2 * math.pi / bins)


def delta_f(phi: np.ndarray, weights: np.ndarray | None = None) -> float:
    """``ΔF = −ln(P(φ>0) / P(φ<0))`` in kT; samples without a finite φ are left out.

    +inf when no (weighted) sample has φ > 0, −inf when none has φ < 0."""
    ok = finite_angles(phi)
    w = np.ones(ok.sum()) if weights is None else np.asarray(weights, dtype=np.float64)[ok]
    positive = float(w[phi[ok] > 0].sum())
    negative = float(w[phi[ok] < 0].sum())
    if positive == 0 and negative == 0:
        return math.nan
    with np.errstate(divide="ignore"):
        return float(-np.log(positive) + np.log(negative))


def chirality_violations(is_l: np.ndarray, finite: np.ndarray | None = None) -> float:
    """Share of D-form frames among the frames with finite positions."""
    is_l = np.asarray(is_l, dtype=bool)
    finite = np.ones_like(is_l) if finite is None else np.asarray(finite, dtype=bool)
    n = int(finite.sum())
    return float(np.sum(~is_l & finite) / n) if n else math.nan


def delta_f_of_fraction(p: float) -> float:
    """ΔF = −ln(p / (1 − p)) for the φ > 0 population p (kT); ±inf for an empty basin, NaN for
    p outside [0, 1]."""
    if not 0 <= p <= 1:
        return math.nan
    if p == 0:
        return math.inf
    if p == 1:
        return -math.inf
    return -math.log(p / (1 - p))


def delta_f_error(p: float, dp: float) -> float:
    """Standard error of ΔF from that of p: ``δΔF = δp / (p(1−p))`` (first order); NaN when ΔF
    is infinite or δp unknown."""
    if not 0 < p < 1 or not math.isfinite(dp):
        return math.nan
    return dp / (p * (1 - p))


def delta_f_with_error(phi: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """``(ΔF, δΔF)`` in kT for independent samples, raw or importance-weighted.

    p = P(φ>0) = Σ w̄ᵢ Iᵢ with w̄ the weights normalised over the samples with finite φ, φ ≠ 0;
    its standard error is the delta-method (linearised ratio estimator) one,
    ``δp² = Σ w̄ᵢ² (Iᵢ − p)²``, which is p(1−p)/n for equal weights and about p(1−p)/n_eff
    (Kish) otherwise; then δΔF = δp/(p(1−p)). It only counts the spread of the weights seen:
    with a tiny ESS it is optimistic. ΔF is ±inf (error NaN) when one basin is empty."""
    phi = np.asarray(phi, dtype=np.float64)
    ok = finite_angles(phi) & (phi != 0)
    w = np.ones(phi.size) if weights is None else np.asarray(weights, dtype=np.float64)
    w = np.where(ok, w, 0.0)
    total = w.sum()
    if not total > 0:
        return math.nan, math.nan
    w = w / total
    indicator = (phi > 0).astype(np.float64)
    p = float(np.sum(w * indicator))
    dp = math.sqrt(float(np.sum(w**2 * (indicator - p) ** 2)))
    return delta_f_of_fraction(p), delta_f_error(p, dp)
