"""What the energies and importance weights of an ensemble say (docs/design.md §5).

Weights: log w = −u − log q (u in kT, log q in nats) per sample, arrays of shape (N,). From them
the effective sample sizes (reverse on model samples, forward on MD frames, clipped as in TA-BG)
and the two estimates of log Z that bracket it in expectation. Energies: the shift of the mean
against MD and the share of samples below the training data's maximum energy.

A failed sample (u = +inf, or a NaN log-weight) stays in N with weight 0; a NaN on MD frames has
no stand-in and makes the forward estimates NaN (see each function).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "CLIP_FRACTION",
    "MIN_BASIN_ESS",
    "basin_ess",
    "eubo",
    "forward_ess",
    "high_energy_fraction",
    "log_z_forward",
    "log_z_reverse",
    "logsumexp",
    "low_energy_fraction",
    "mean_energy_shift",
    "normalised_weights",
    "reverse_ess",
    "reverse_ess_clipped",
]

CLIP_FRACTION = 1e-4  # share of the largest weights clipped in reverse_ess_clipped (TA-BG)


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
    """Kish effective sample size of model samples as a fraction of N (docs/design.md §5):
    ``exp(2·LSE(log w) − LSE(2 log w)) / N``. 1 for equal weights, 1/N for one dominant sample."""
    log_w = _clean_log_w(log_w)
    if log_w.size == 0:
        return math.nan
    a, b = logsumexp(log_w), logsumexp(2 * log_w)
    if not np.isfinite(a):
        return 0.0
    return float(math.exp(2 * a - b) / log_w.size)


def reverse_ess_clipped(log_w: np.ndarray, fraction: float = CLIP_FRACTION) -> float:
    """Reverse ESS (Kish, fraction of N) after clipping the largest weights (TA-BG's convention):
    the ``k = ceil(fraction · N)`` largest weights are set to the smallest of them (the k-th
    largest weight). N counts failed samples (weight 0), as in :func:`reverse_ess`. For
    N ≤ 1/fraction, k = 1 and nothing changes. Always report it labelled as clipped."""
    if not 0 < fraction < 1:
        raise ValueError(f"reverse_ess_clipped: fraction must be in (0, 1), got {fraction}")
    log_w = _clean_log_w(log_w)
    if log_w.size == 0:
        return math.nan
    k = math.ceil(fraction * log_w.size)
    kth_largest = np.partition(log_w, log_w.size - k)[log_w.size - k]
    return reverse_ess(np.minimum(log_w, kth_largest))


def forward_ess(log_w: np.ndarray) -> float:
    """Forward ESS fraction on target (MD) samples: ``1 / (mean(w) · mean(1/w))``, in log space.

    ``log_w = −u − log q`` evaluated on the MD frames. The unknown normalisation cancels. A frame
    the model gives zero density (log w = +inf) or zero weight (log w = −inf) makes it 0, the
    limit of mean(w) · mean(1/w) → ∞; a NaN (no density or energy for a frame: no value to use)
    makes it NaN. :func:`ensemble_metrics` counts such frames (``forward_n_nonfinite``)."""
    log_w = np.asarray(log_w, dtype=np.float64)
    if log_w.size == 0 or np.isnan(log_w).any():
        return math.nan
    if not np.isfinite(log_w).all():
        return 0.0
    n = math.log(log_w.size)
    return float(math.exp(-((logsumexp(log_w) - n) + (logsumexp(-log_w) - n))))


def log_z_reverse(log_w: np.ndarray) -> float:
    """Reverse estimate of log Z from model samples (docs/design.md §5): ``LSE(log w) − ln N``.

    ``log w = −u − log q`` of the samples. Failed samples (log w = −inf, or NaN) have weight 0
    and stay in N. A sample with log w = +inf (log q = −inf at a finite energy) makes it +inf.
    In expectation over sample sets it is at most log Z (Jensen); it equals log Z for q = p.
    NaN for no samples."""
    log_w = np.asarray(log_w, dtype=np.float64)
    if log_w.size == 0:
        return math.nan
    log_w = np.where(np.isnan(log_w), -np.inf, log_w)
    return logsumexp(log_w) - math.log(log_w.size)


def log_z_forward(log_w_target: np.ndarray) -> float:
    """Forward estimate of log Z from M target (held-out MD) frames: ``−(LSE(−log w) − ln M)``.

    ``log w = −u − log q`` on the MD frames. A frame of zero model density (log w = +inf)
    contributes 1/w = 0 and stays in M; a frame with w = 0 (log w = −inf) makes it −inf. A NaN
    (no density or no energy for an MD frame) makes it NaN: there is no value to put in its
    place. In expectation it is at least log Z when q is a normalised density."""
    log_w = np.asarray(log_w_target, dtype=np.float64)
    if log_w.size == 0 or np.isnan(log_w).any():
        return math.nan
    return -(logsumexp(-log_w) - math.log(log_w.size))


def eubo(log_w_target: np.ndarray) -> float:
    """The evidence upper bound ``E_p[log w] = E_p[−u − log q]`` over M target (MD) frames,
    nats: at least log Z, by KL(p‖q) (CMT, arXiv:2510.18460, reports it on MD frames as its
    mode-collapse detector; lower is better). A frame of zero model density (log w = +inf)
    makes it +inf; a NaN, or a frame whose energy failed (log w = −inf, which would read as a
    perfect bound), makes it NaN. Its value depends on the coordinates' volume convention as
    log Z does; ``eubo − log Ẑ`` (the forward KL) does not."""
    log_w = np.asarray(log_w_target, dtype=np.float64)
    if log_w.size == 0 or np.isnan(log_w).any() or np.isneginf(log_w).any():
        return math.nan
    return float(np.mean(log_w))


def mean_energy_shift(u_model: np.ndarray, u_reference: np.ndarray) -> float:
    """``⟨u⟩_model − ⟨u⟩_MD`` in kT. Failed samples (u = +inf) make it +inf: report them."""
    return float(np.mean(u_model) - np.mean(u_reference))


def low_energy_fraction(u: np.ndarray, threshold: float) -> float:
    """Share of all samples with ``u < threshold`` (kT); the paper uses the maximum u of the
    training data. Failed samples count in N and are not low-energy."""
    u = np.asarray(u, dtype=np.float64)
    return float(np.mean(u < threshold)) if u.size else math.nan


CLIP_FRACTION = 1e-4  # share of the largest weights clipped in reverse_ess_clipped (TA-BG)


def high_energy_fraction(u: np.ndarray, threshold: float) -> float:
    """Share of all samples that are not below ``threshold`` (kT): ``u ≥ threshold`` or failed
    (u = +inf or NaN); the complement of :func:`low_energy_fraction`."""
    u = np.asarray(u, dtype=np.float64)
    return float(np.mean(~(u < threshold))) if u.size else math.nan


MIN_BASIN_ESS = 10.0  # effective samples in each φ basin before a reweighted ΔF means something


def basin_ess(phi: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """Kish counts ``(Σ_B w)² / Σ_B w²`` of the φ > 0 and φ < 0 samples (weights (n,), any
    normalisation; non-finite φ left out): the independent samples each basin rests on."""
    phi = np.asarray(phi, dtype=np.float64)
    w = np.where(np.isfinite(phi), np.asarray(weights, dtype=np.float64), 0.0)
    out = []
    for mask in (phi > 0, phi < 0):
        s, s2 = float(w[mask].sum()), float((w[mask] ** 2).sum())
        out.append(s * s / s2 if s2 > 0 else 0.0)
    return out[0], out[1]
