"""The metrics of DESIGN.md §5 over arrays: energies (kT), dihedrals (radians), log-weights.

Every function takes plain numpy arrays, so the same code scores MD and generated ensembles.
Conventions for samples that failed (non-finite positions, or an energy evaluation that failed,
u = +inf): they stay in every count N, carry weight 0 (log w = −inf; a NaN log-weight is treated
the same way), are never "low energy", and are left out of histograms, which are normalised over
the samples that have finite angles. :func:`ensemble_metrics` reports how many there were.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "EPS",
    "PHI_BINS",
    "RAMA_BINS",
    "chirality_violations",
    "delta_f",
    "ensemble_metrics",
    "forward_ess",
    "forward_weight_diagnostics",
    "kl_1d",
    "kl_divergence",
    "logsumexp",
    "low_energy_fraction",
    "mean_energy_shift",
    "normalised_weights",
    "ramachandran_histogram",
    "ramachandran_kl",
    "reference_metrics",
    "reverse_ess",
]

EPS = 1e-10  # the ε of the KL definition
RAMA_BINS = 64  # per axis, on [−π, π]²
PHI_BINS = 200  # 1-D φ and ψ histograms
_RANGE = (-math.pi, math.pi)


def logsumexp(a: np.ndarray) -> float:
    """log Σ exp(a), stable; −inf for an empty array or one that is all −inf."""
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0:
        return -math.inf
    m = np.max(a)
    if not np.isfinite(m):
        return float(m)
    return float(m + np.log(np.sum(np.exp(a - m))))


def _clean_log_w(log_w: np.ndarray) -> np.ndarray:
    """NaN log-weights (a sample without a density or energy) become −inf: weight 0. If some
    are +inf (log q underflowed to −inf at a finite energy), those samples share all the weight
    equally, the limit of the finite case."""
    log_w = np.asarray(log_w, dtype=np.float64)
    log_w = np.where(np.isnan(log_w), -np.inf, log_w)
    if np.isposinf(log_w).any():
        log_w = np.where(np.isposinf(log_w), 0.0, -np.inf)
    return log_w


def normalised_weights(log_w: np.ndarray) -> np.ndarray:
    """Self-normalised importance weights (sum 1) from unnormalised log-weights.

    Raises ValueError when no sample has a finite weight (nothing to reweight with)."""
    log_w = _clean_log_w(log_w)
    total = logsumexp(log_w)
    if not np.isfinite(total):
        raise ValueError("normalised_weights: no sample has a finite log-weight")
    return np.exp(log_w - total)


def reverse_ess(log_w: np.ndarray) -> float:
    """Kish effective sample size of model samples as a fraction of N (DESIGN.md §5):
    ``exp(2·LSE(log w) − LSE(2 log w)) / N``. 1 for equal weights, 1/N for one dominant sample."""
    log_w = _clean_log_w(log_w)
    if log_w.size == 0:
        return math.nan
    a, b = logsumexp(log_w), logsumexp(2 * log_w)
    if not np.isfinite(a):
        return 0.0
    return float(math.exp(2 * a - b) / log_w.size)


def forward_ess(log_w: np.ndarray) -> float:
    """Forward ESS fraction on target (MD) samples: ``1 / (mean(w) · mean(1/w))``, in log space.

    ``log_w = −u − log q`` evaluated on the MD frames. The unknown normalisation cancels. A frame
    the model gives zero density (log w = +inf) or that has no energy makes it 0."""
    log_w = np.asarray(log_w, dtype=np.float64)
    if log_w.size == 0:
        return math.nan
    if not np.isfinite(log_w).all():
        return 0.0
    n = math.log(log_w.size)
    return float(math.exp(-((logsumexp(log_w) - n) + (logsumexp(-log_w) - n))))


def mean_energy_shift(u_model: np.ndarray, u_reference: np.ndarray) -> float:
    """``⟨u⟩_model − ⟨u⟩_MD`` in kT. Failed samples (u = +inf) make it +inf: report them."""
    return float(np.mean(u_model) - np.mean(u_reference))


def low_energy_fraction(u: np.ndarray, threshold: float) -> float:
    """Share of all samples with ``u < threshold`` (kT); the paper uses the maximum u of the
    training data. Failed samples count in N and are not low-energy."""
    u = np.asarray(u, dtype=np.float64)
    return float(np.mean(u < threshold)) if u.size else math.nan


def _angles_ok(phi: np.ndarray, psi: np.ndarray | None = None) -> np.ndarray:
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
    ok = _angles_ok(phi, psi)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)[ok]
    if not ok.any() or (w is not None and not w.sum() > 0):
        raise ValueError("ramachandran_histogram: no sample with finite angles and weight")
    hist, _, _ = np.histogram2d(phi[ok], psi[ok], bins=bins, range=[_RANGE, _RANGE], weights=w,
                                density=True)  # fmt: skip
    return hist


def _histogram_1d(angle: np.ndarray, weights: np.ndarray | None, bins: int) -> np.ndarray:
    ok = _angles_ok(angle)
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
    """KL(MD ‖ model) of the φ/ψ densities on a ``bins × bins`` grid (DESIGN.md §5)."""
    p = ramachandran_histogram(phi_ref, psi_ref, bins=bins)
    q = ramachandran_histogram(phi, psi, weights, bins=bins)
    return kl_divergence(p, q, (2 * math.pi / bins) ** 2)


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
    ok = _angles_ok(phi)
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


def _split_halves(n: int) -> tuple[slice, slice]:
    return slice(0, n // 2), slice(n // 2, n)


def reference_metrics(
    u: np.ndarray, phi: np.ndarray, psi: np.ndarray, is_l: np.ndarray, u_train_max: float
) -> dict[str, Any]:
    """Metrics of the MD reference itself, with the MD-vs-MD floor of each KL.

    The floor compares the first and second half of the reference frames (in the order given:
    for a p4bg test split, one replica's block against the other's): the KL a perfect model
    would still show with this many correlated frames."""
    if len(phi) < 4:
        raise ValueError(f"reference_metrics: need at least 4 reference frames, got {len(phi)}")
    a, b = _split_halves(len(phi))
    return {
        "n": len(u),
        "mean_u": float(np.mean(u)),
        "median_u": float(np.median(u)),
        "low_energy_fraction": low_energy_fraction(u, u_train_max),
        "kl_rama_floor": ramachandran_kl(phi[a], psi[a], phi[b], psi[b]),
        "kl_phi_floor": kl_1d(phi[a], phi[b]),
        "kl_psi_floor": kl_1d(psi[a], psi[b]),
        "delta_f": delta_f(phi),
        "delta_f_halves": [delta_f(phi[a]), delta_f(phi[b])],
        "chirality_violations": chirality_violations(is_l),
    }


def forward_weight_diagnostics(
    log_w: np.ndarray, phi: np.ndarray, top: int = 10
) -> dict[str, float]:
    """Why a forward ESS is small: the spread of log w over the MD frames (max − median, nats)
    and the share of φ > 0 frames among the ``top`` frames of largest weight, i.e. the frames
    the model most under-represents."""
    log_w = np.asarray(log_w, dtype=np.float64)
    ok = np.isfinite(log_w)
    if not ok.any():
        return {"forward_log_w_spread": math.nan, "forward_top_phi_positive": math.nan}
    order = np.argsort(np.where(ok, log_w, -np.inf))[::-1][: min(top, int(ok.sum()))]
    return {
        "forward_log_w_spread": float(np.max(log_w[ok]) - np.median(log_w[ok])),
        "forward_top_phi_positive": float(np.mean(phi[order] > 0)),
    }


def _or_nan(fn: Callable[..., float], *args: Any) -> float:
    """A histogram metric, or NaN when no sample has finite angles (a diverged model)."""
    try:
        return fn(*args)
    except ValueError:
        return math.nan


def _weighted(fn: Callable[..., float], w: np.ndarray | None, *args: Any) -> float:
    """``fn(*args, w)``, or NaN without weights or without finite angles."""
    return math.nan if w is None else _or_nan(fn, *args, w)


def ensemble_metrics(
    u: np.ndarray,
    log_w: np.ndarray,
    phi: np.ndarray,
    psi: np.ndarray,
    is_l: np.ndarray,
    finite: np.ndarray,
    reference: dict[str, np.ndarray],
    u_train_max: float,
    log_w_reference: np.ndarray | None = None,
) -> dict[str, Any]:
    """Every metric of DESIGN.md §5 for one generated ensemble against an MD reference.

    u: reduced energies of the samples (kT), +inf where evaluation failed; log_w: −u − log q;
    phi, psi: radians; is_l: L-chirality per sample; finite: samples with finite positions;
    reference: ``{"u", "phi", "psi"}`` arrays of the MD frames; u_train_max: maximum u of the
    training frames (kT); log_w_reference: −u − log q on the MD frames (forward ESS), if known.
    """
    u = np.asarray(u, dtype=np.float64)
    ok_u = np.isfinite(u)
    ref_u, ref_phi, ref_psi = reference["u"], reference["phi"], reference["psi"]
    out: dict[str, Any] = {
        "n_samples": len(u),
        "n_nonfinite_positions": int(np.sum(~np.asarray(finite, dtype=bool))),
        "n_failed_energies": int(np.sum(~ok_u)),
        "mean_u": float(np.mean(u)),
        "mean_u_finite": float(np.mean(u[ok_u])) if ok_u.any() else math.nan,
        "median_u": float(np.median(u)),
        "energy_shift": mean_energy_shift(u, ref_u),
        "energy_shift_finite": mean_energy_shift(u[ok_u], ref_u) if ok_u.any() else math.nan,
        "median_energy_shift": float(np.median(u) - np.median(ref_u)),
        # the bulk of the distribution, as a violin plot clipped at the training maximum shows it
        "energy_shift_low": mean_energy_shift(u[u < u_train_max], ref_u)
        if (u < u_train_max).any()
        else math.nan,
        "low_energy_fraction": low_energy_fraction(u, u_train_max),
        "reverse_ess": reverse_ess(log_w),
        "forward_ess": forward_ess(log_w_reference) if log_w_reference is not None else math.nan,
        "kl_rama": _or_nan(ramachandran_kl, ref_phi, ref_psi, phi, psi),
        "kl_phi": _or_nan(kl_1d, ref_phi, phi),
        "kl_psi": _or_nan(kl_1d, ref_psi, psi),
        "delta_f": delta_f(phi),
        "chirality_violations": chirality_violations(is_l, finite),
    }
    if log_w_reference is not None:
        out.update(forward_weight_diagnostics(log_w_reference, ref_phi))
    try:
        w = normalised_weights(log_w)
    except ValueError:  # every weight is zero: nothing can be reweighted
        w = None
    out["kl_rama_reweighted"] = _weighted(ramachandran_kl, w, ref_phi, ref_psi, phi, psi)
    out["kl_phi_reweighted"] = _weighted(kl_1d, w, ref_phi, phi)
    out["kl_psi_reweighted"] = _weighted(kl_1d, w, ref_psi, psi)
    out["delta_f_reweighted"] = math.nan if w is None else delta_f(phi, w)
    # The floor compares n/2 MD frames with n/2 others, and with ε = 1e-10 every empty bin on
    # the q side weighs heavily, so the KL depends on the q sample count. For a like-for-like
    # comparison with the floor: the first half of the MD frames against as many model samples
    # (fewer if the model has fewer; n_matched says how many).
    a, b = _split_halves(len(ref_phi))
    m = min(b.stop - b.start, len(u))
    sub = slice(0, m)
    out["n_matched"] = m
    out["kl_rama_matched"] = _or_nan(ramachandran_kl, ref_phi[a], ref_psi[a], phi[sub], psi[sub])
    out["kl_phi_matched"] = _or_nan(kl_1d, ref_phi[a], phi[sub])
    try:
        w_sub = normalised_weights(np.asarray(log_w)[sub])
    except ValueError:
        w_sub = None
    out["kl_rama_reweighted_matched"] = _weighted(
        ramachandran_kl, w_sub, ref_phi[a], ref_psi[a], phi[sub], psi[sub]
    )
    return out
