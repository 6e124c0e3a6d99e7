"""Per-residue and joint views of a peptide's backbone, for molecules longer than one residue.

For every residue with a φ and a ψ (the non-cap residues of a capped peptide): its Ramachandran
KL against the MD reference with the MD-vs-MD floor, and ΔF(φ > 0 vs φ < 0) of the MD frames and
of the reweighted samples with their uncertainties, by the same definitions as the central
residue's (docs/design.md §5). The joint view is a TICA projection (time-lagged independent
components of cos φ, sin φ, cos ψ, sin ψ of every residue, fitted on the MD reference's time
series): the slowest collective motions of the backbone, where a model that gets every residue
right on its own but misses their correlation shows up; its 2-D KL against MD is reported with
its floor like the Ramachandran KL. For a replica-exchange reference the series is the lowest
temperature's, whose configuration changes by exchanges as well as by dynamics: the components
are then the slowest modes of that series, not of the dynamics, while the KL stays a fixed
two-dimensional comparison of the ensembles.

TICA is written here (a generalised symmetric eigenproblem, fifteen lines of numpy) rather than
taken from deeptime or PyEMMA, whose fitting and projection would be the only thing used, to
keep analysis/ free of another compiled dependency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis.histograms import (
    delta_f_with_error,
    kl_divergence,
    ramachandran_kl,
    ramachandran_tv,
)
from analysis.summary import split_halves
from analysis.timeseries import MIN_TRANSITIONS, committed_transitions, md_delta_f
from analysis.weights import MIN_BASIN_ESS, basin_ess, normalised_weights

__all__ = [
    "TICA_BINS",
    "Tica",
    "fit_tica",
    "grid_edges",
    "histogram_kl_2d",
    "residue_metrics",
    "tica_features",
]

TICA_BINS = 64  # per axis, on the MD reference's range of the two components


def _or_nan(fn: Any, *args: Any) -> float:
    try:
        return float(fn(*args))
    except ValueError:  # no finite angle with weight (a diverged model)
        return math.nan


def residue_metrics(
    labels: list[str],
    ref_phi: np.ndarray,
    ref_psi: np.ndarray,
    segments: list[np.ndarray] | None,
    samples: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> dict[str, dict[str, Any]]:
    """Per residue: the reference's KL floor and ΔF, and each model's KLs and reweighted ΔF.

    labels: one per residue (e.g. "ALA2"); ref_phi, ref_psi: radians, shape (frames, residues);
    segments: index arrays of the reference's contiguous time series (for the floor's halves
    and ΔF's errors); samples: name -> (phi, psi, log_w) of a model, shapes (n, residues),
    (n, residues), (n,). Returns ``{label: {"reference": {...}, "models": {name: {...}}}}``.
    """
    a, b = split_halves(len(ref_phi))
    out: dict[str, dict[str, Any]] = {}
    weights = {}
    for name, (_, _, log_w) in samples.items():
        try:
            weights[name] = normalised_weights(log_w)
        except ValueError:  # no sample has weight
            weights[name] = None
    for r, label in enumerate(labels):
        phi, psi = ref_phi[:, r], ref_psi[:, r]
        reference: dict[str, Any] = {
            "kl_rama_floor": ramachandran_kl(phi[a], psi[a], phi[b], psi[b]),
            "tv_rama_floor": ramachandran_tv(phi[a], psi[a], phi[b], psi[b]),
            **md_delta_f(phi, segments),
        }
        series = segments if segments is not None else [np.arange(len(phi))]
        into, out_of = committed_transitions([phi[s] for s in series])
        reference["committed_transitions"] = [into, out_of]
        reference["delta_f_note"] = None
        if min(into, out_of) < MIN_TRANSITIONS:
            reference["delta_f_note"] = (f"not measurable here: {into} transitions into φ > 0 "
                                         f"and {out_of} out of it")  # fmt: skip
        models = {}
        for name, (s_phi, s_psi, _) in samples.items():
            w = weights[name]
            m: dict[str, Any] = {
                "kl_rama": _or_nan(ramachandran_kl, phi, psi, s_phi[:, r], s_psi[:, r]),
                "kl_rama_reweighted": math.nan if w is None else _or_nan(
                    ramachandran_kl, phi, psi, s_phi[:, r], s_psi[:, r], w),
                "tv_rama": _or_nan(ramachandran_tv, phi, psi, s_phi[:, r], s_psi[:, r]),
                "tv_rama_reweighted": math.nan if w is None else _or_nan(
                    ramachandran_tv, phi, psi, s_phi[:, r], s_psi[:, r], w),
            }  # fmt: skip
            k = min(b.stop - b.start, len(s_phi))
            m["kl_rama_matched"] = _or_nan(ramachandran_kl, phi[a], psi[a], s_phi[:k, r],
                                           s_psi[:k, r])  # fmt: skip
            m["delta_f"], m["delta_f_err"] = delta_f_with_error(s_phi[:, r])
            if w is None:
                m["delta_f_reweighted"] = m["delta_f_reweighted_err"] = math.nan
                pos = neg = 0.0
            else:
                m["delta_f_reweighted"], m["delta_f_reweighted_err"] = delta_f_with_error(
                    s_phi[:, r], w)  # fmt: skip
                pos, neg = basin_ess(s_phi[:, r], w)
            m["effective_samples_phi_positive"], m["effective_samples_phi_negative"] = pos, neg
            m["delta_f_reweighted_note"] = None
            if min(pos, neg) < MIN_BASIN_ESS:
                m["delta_f_reweighted_note"] = (
                    f"not measurable here: {min(pos, neg):.1f} effective samples in the "
                    f"{'φ > 0' if pos < neg else 'φ < 0'} basin")  # fmt: skip
            models[name] = m
        out[label] = {"reference": reference, "models": models}
    return out


def tica_features(phi: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """cos and sin of every φ and ψ: shape (frames, 4·residues), from (frames, residues) each."""
    return np.concatenate([np.cos(phi), np.sin(phi), np.cos(psi), np.sin(psi)], axis=1)


@dataclass(frozen=True)
class Tica:
    """A fitted TICA: ``project(x) = (x − mean) @ vectors``; ``eigenvalues`` the
    autocorrelations of the components at ``lag`` frames (slowest first)."""

    mean: np.ndarray
    vectors: np.ndarray  # (features, components)
    eigenvalues: np.ndarray
    lag: int

    def project(self, features: np.ndarray) -> np.ndarray:
        return (features - self.mean) @ self.vectors


def fit_tica(
    features: np.ndarray, segments: list[np.ndarray] | None, lag: int, components: int = 2
) -> Tica:
    """TICA of time series: ``C_τ v = λ C_0 v`` with the instantaneous covariance C_0 and the
    symmetrised time-lagged covariance C_τ of the mean-free features, pairs (t, t + lag) taken
    within each segment (index arrays into ``features``, in time order; default: one series).
    Directions of C_0 with eigenvalue below 1e-10 of its largest are projected out first."""
    x = np.asarray(features, dtype=np.float64)
    segments = segments if segments is not None else [np.arange(len(x))]
    pairs = [(s[:-lag], s[lag:]) for s in segments if len(s) > lag]
    if not pairs or lag < 1:
        raise ValueError(f"fit_tica: no segment is longer than the lag ({lag} frames)")
    first = np.concatenate([p for p, _ in pairs])
    second = np.concatenate([q for _, q in pairs])
    mean = 0.5 * (x[first].mean(0) + x[second].mean(0))
    a, b = x[first] - mean, x[second] - mean
    c0 = (a.T @ a + b.T @ b) / (2 * len(a))
    ct = (a.T @ b + b.T @ a) / (2 * len(a))
    value, vector = np.linalg.eigh(c0)
    keep = value > 1e-10 * value.max()
    whiten = vector[:, keep] / np.sqrt(value[keep])
    lam, rot = np.linalg.eigh(whiten.T @ ct @ whiten)
    order = np.argsort(lam)[::-1][:components]
    return Tica(mean, whiten @ rot[:, order], lam[order], lag)


def grid_edges(reference: np.ndarray, bins: int = TICA_BINS) -> list[np.ndarray]:
    """Bin edges of the 2-D grid over the reference points' range (n, 2), padded by 5 %."""
    lo, hi = reference.min(0), reference.max(0)
    pad = 0.05 * (hi - lo)
    return [np.linspace(lo[k] - pad[k], hi[k] + pad[k], bins + 1) for k in range(2)]


def histogram_kl_2d(
    reference: np.ndarray,
    points: np.ndarray,
    weights: np.ndarray | None = None,
    bins: int = TICA_BINS,
    edges: list[np.ndarray] | None = None,
) -> float:
    """KL(reference ‖ points) of 2-D densities on a ``bins × bins`` grid spanning the
    reference's range (padded by 5 %), with the ε of the Ramachandran KL. The points' density is
    normalised by their whole weight, so weight outside the grid counts as missing from it.
    reference, points: shape (n, 2); weights: the points' (default equal)."""
    edges = edges or grid_edges(reference, bins)
    ok = np.isfinite(points).all(1)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)[ok]
    p, _, _ = np.histogram2d(reference[:, 0], reference[:, 1], bins=edges)
    q, _, _ = np.histogram2d(points[ok, 0], points[ok, 1], bins=edges, weights=w)
    total = float(ok.sum()) if w is None else float(w.sum())
    if not q.sum() > 0:
        raise ValueError("histogram_kl_2d: no point with weight inside the reference's range")
    cell = (edges[0][1] - edges[0][0]) * (edges[1][1] - edges[1][0])
    p, q = p / (p.sum() * cell), q / (total * cell)
    return kl_divergence(p, q, cell)
