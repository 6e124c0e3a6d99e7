"""The metrics of DESIGN.md §5 over arrays: energies (kT), dihedrals (radians), log-weights.

Every function takes plain numpy arrays, so the same code scores MD and generated ensembles.
Conventions for samples that failed (non-finite positions, or an energy evaluation that failed,
u = +inf): they stay in every count N, carry weight 0 (log w = −inf; a NaN log-weight is treated
the same way), are never "low energy", and are left out of histograms, which are normalised over
the samples that have finite angles. :func:`ensemble_metrics` reports how many there were.
On MD frames (forward ESS, forward log Z) a NaN log-weight has no stand-in and makes the
estimate NaN; ±inf ones give the limits (see each function); ``forward_n_nonfinite`` counts them.

Uncertainties: ΔF of model samples (independent draws) from the delta method with the weights
(:func:`delta_f_with_error`); ΔF of MD frames (correlated time series) from block averaging and
between replicas (:func:`md_delta_f`); MD's statistical efficiency from the integrated
autocorrelation time of the φ>0 indicator (:func:`md_efficiency`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "CLIP_FRACTION",
    "EPS",
    "PHI_BINS",
    "RAMA_BINS",
    "Blocking",
    "basin_transitions",
    "bg_value",
    "block_standard_error",
    "chirality_violations",
    "delta_f",
    "delta_f_with_error",
    "ensemble_metrics",
    "forward_ess",
    "forward_weight_diagnostics",
    "high_energy_fraction",
    "integrated_autocorrelation_time",
    "kl_1d",
    "kl_divergence",
    "log_z_forward",
    "log_z_reverse",
    "logsumexp",
    "low_energy_fraction",
    "md_delta_f",
    "md_efficiency",
    "mean_energy_shift",
    "normalised_weights",
    "ramachandran_histogram",
    "ramachandran_kl",
    "reference_metrics",
    "reverse_ess",
    "reverse_ess_clipped",
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


CLIP_FRACTION = 1e-4  # share of the largest weights clipped in reverse_ess_clipped (TA-BG)


def log_z_reverse(log_w: np.ndarray) -> float:
    """Reverse estimate of log Z from model samples (DESIGN.md §5): ``LSE(log w) − ln N``.

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


def high_energy_fraction(u: np.ndarray, threshold: float) -> float:
    """Share of all samples that are not below ``threshold`` (kT): ``u ≥ threshold`` or failed
    (u = +inf or NaN); the complement of :func:`low_energy_fraction`."""
    u = np.asarray(u, dtype=np.float64)
    return float(np.mean(~(u < threshold))) if u.size else math.nan


# ------------------------------------------------------------------- correlated time series
class Blocking(NamedTuple):
    """Result of :func:`block_standard_error`: the mean, its standard error, the block size
    (frames) and number of blocks at the chosen level, and whether the test found a level where
    the block means are uncorrelated (False: the series is too short, the error is a lower
    bound)."""

    mean: float
    se: float
    block_size: int
    n_blocks: int
    converged: bool


def _chi2_quantile_99(df: int) -> float:
    """0.99 quantile of χ²(df), Wilson–Hilferty approximation (within 1 % for df ≥ 1)."""
    z = 2.3263478740408408  # 0.99 quantile of N(0, 1)
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def block_standard_error(x: np.ndarray) -> Blocking:
    """Standard error of the mean of a correlated time series by block averaging.

    Flyvbjerg–Petersen blocking (J. Chem. Phys. 91, 461 (1989)): the series is halved repeatedly
    by averaging neighbour pairs (an odd last element is dropped); at level k (blocks of 2^k
    frames, n_k of them, variance s_k) the error estimate is ``sqrt(s_k / (n_k − 1))``, which
    grows until the blocks are longer than the correlation time and then stays on a plateau.
    The plateau level is chosen automatically as in Jonsson (Phys. Rev. E 98, 043304 (2018)):
    the first level k at which ``M_k = Σ_{i≥k} n_i (γ_i / s_i)²`` (γ_i the lag-1
    autocovariance at level i) is below the 0.99 quantile of χ²(levels − k), i.e. the block
    means no longer show lag-1 correlation. A constant series has error 0.
    """
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("block_standard_error: the series has non-finite values")
    if x.size < 2:
        return Blocking(float(np.mean(x)) if x.size else math.nan, math.nan, 1, x.size, False)
    mean = float(np.mean(x))
    sizes, variances, terms = [], [], []
    y = x
    while len(y) >= 2:
        d = y - np.mean(y)
        var = float(np.mean(d**2))
        gamma = float(np.sum(d[:-1] * d[1:]) / len(y))
        sizes.append(len(y))
        variances.append(var)
        terms.append(len(y) * (gamma / var) ** 2 if var > 0 else 0.0)
        y = y[: len(y) - len(y) % 2]
        y = 0.5 * (y[0::2] + y[1::2])
    levels = len(sizes)
    m = np.cumsum(terms[::-1])[::-1]  # M_k
    chosen, converged = levels - 1, False
    for k in range(levels):
        if m[k] < _chi2_quantile_99(levels - k):
            chosen, converged = k, True
            break
    n_k = sizes[chosen]
    se = math.sqrt(variances[chosen] / (n_k - 1))
    return Blocking(mean, se, 2**chosen, n_k, converged)


def _series_list(series: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
    if isinstance(series, np.ndarray) and series.ndim == 1:
        return [np.asarray(series, dtype=np.float64)]
    return [np.asarray(s, dtype=np.float64) for s in series]


def integrated_autocorrelation_time(series: np.ndarray | list[np.ndarray], c: float = 5.0) -> float:
    """Integrated autocorrelation time ``τ = 1 + 2 Σ_{t≥1} ρ(t)`` (in frames) of one time series
    or of several independent ones (replicas) sharing one τ.

    Convention: τ = 1 + 2Σρ, so a series of n frames holds n/τ independent samples and the
    variance of its mean is σ²τ/n (for AR(1) with coefficient ρ: τ = (1+ρ)/(1−ρ)). ρ(t) is
    the pooled autocovariance (each series about its own mean, summed over the replicas,
    biased estimator) over its value at lag 0; the sum is cut at Sokal's automatic window, the
    smallest M with M ≥ c·τ(M). NaN when the series have no variance or are too short for such
    a window (then τ cannot be estimated from them)."""
    parts = [s for s in _series_list(series) if len(s) >= 2]
    if not parts or any(not np.isfinite(s).all() for s in parts):
        return math.nan
    n_max = max(len(s) for s in parts)
    total = np.zeros(n_max)
    for s in parts:
        d = s - np.mean(s)
        size = 1 << (2 * len(s) - 1).bit_length()  # zero padding: no circular wrap
        f = np.fft.rfft(d, size)
        total[: len(s)] += np.fft.irfft(f * np.conj(f), size)[: len(s)]
    if not total[0] > 1e-12 * sum(len(s) for s in parts):
        return math.nan
    tau = 1.0 + 2.0 * np.cumsum(total[1:] / total[0])  # tau[M − 1] = τ(M)
    window = np.arange(1, n_max)
    ok = window >= c * tau
    if not ok.any():
        return math.nan
    return float(tau[int(np.argmax(ok))])


def basin_transitions(phi_segments: list[np.ndarray]) -> int:
    """Changes of the φ > 0 indicator between consecutive frames, summed over the time series
    (replicas); recrossings count, frames with non-finite φ are skipped."""
    total = 0
    for phi in phi_segments:
        phi = np.asarray(phi, dtype=np.float64)
        side = phi[np.isfinite(phi)] > 0
        total += int(np.count_nonzero(side[1:] != side[:-1]))
    return total


def _delta_f_of(p: float) -> float:
    """ΔF = −ln(p / (1 − p)) for the φ > 0 population p (kT)."""
    if not 0 <= p <= 1:
        return math.nan
    if p == 0:
        return math.inf
    if p == 1:
        return -math.inf
    return -math.log(p / (1 - p))


def _delta_f_error(p: float, dp: float) -> float:
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
    ok = _angles_ok(phi) & (phi != 0)
    w = np.ones(phi.size) if weights is None else np.asarray(weights, dtype=np.float64)
    w = np.where(ok, w, 0.0)
    total = w.sum()
    if not total > 0:
        return math.nan, math.nan
    w = w / total
    indicator = (phi > 0).astype(np.float64)
    p = float(np.sum(w * indicator))
    dp = math.sqrt(float(np.sum(w**2 * (indicator - p) ** 2)))
    return _delta_f_of(p), _delta_f_error(p, dp)


def md_delta_f(phi: np.ndarray, segments: list[np.ndarray] | None = None) -> dict[str, Any]:
    """ΔF(φ>0 vs φ<0) of MD frames with its uncertainty, from time series.

    phi: radians of all frames; segments: index arrays into phi, one per contiguous time series
    (a replica's frames, in time order); default: phi is one series. p = P(φ>0) over all
    frames. Two standard errors of p:

    - block averaging (:func:`block_standard_error` of each replica's φ>0 indicator, combined
      as ``δp² = Σ_r (n_r/N)² δp_r²``, replicas being independent);
    - between replicas (≥ 2): the standard error of the mean of the per-replica populations
      p_r, ``std(p_r, ddof=1) / sqrt(R)``; this sees a replica stuck in one basin, which block
      averaging inside that replica cannot.

    Each is propagated to ΔF as δΔF = δp/(p(1−p)); ``delta_f_err`` is the larger of the two
    (the block one alone with a single replica). ``delta_f_replicas`` lists each replica's ΔF.
    """
    phi = np.asarray(phi, dtype=np.float64)
    segments = [np.arange(phi.size)] if segments is None else [np.asarray(s) for s in segments]
    series = []
    for s in segments:
        a = phi[s]
        a = a[_angles_ok(a) & (a != 0)]
        if a.size:
            series.append((a > 0).astype(np.float64))
    n = sum(s.size for s in series)
    if n == 0:
        nan = math.nan
        return {"delta_f": nan, "delta_f_err": nan, "delta_f_err_block": nan,
                "delta_f_err_replicas": nan, "phi_positive_fraction": nan,
                "delta_f_replicas": [], "n_replicas": 0}  # fmt: skip
    p = float(sum(s.sum() for s in series) / n)
    blocks = [block_standard_error(s) for s in series]
    dp_block = math.sqrt(sum((s.size / n) ** 2 * b.se**2 for s, b in zip(series, blocks,
                                                                         strict=True)))  # fmt: skip
    p_r = np.array([s.mean() for s in series])
    dp_rep = float(np.std(p_r, ddof=1) / math.sqrt(len(p_r))) if len(p_r) >= 2 else math.nan
    err_block, err_rep = _delta_f_error(p, dp_block), _delta_f_error(p, dp_rep)
    errors = [e for e in (err_block, err_rep) if math.isfinite(e)]
    return {
        "delta_f": _delta_f_of(p),
        "delta_f_err": max(errors) if errors else math.nan,
        "delta_f_err_block": err_block,
        "delta_f_err_replicas": err_rep,
        "phi_positive_fraction": p,
        "delta_f_replicas": [_delta_f_of(float(x)) for x in p_r],
        "n_replicas": len(series),
        "block_sizes": [b.block_size for b in blocks],
        "blocking_converged": all(b.converged for b in blocks),
    }


def md_efficiency(
    phi: np.ndarray,
    segments: list[np.ndarray] | None = None,
    ps_per_frame: float | None = None,
    seconds_per_frame: float | None = None,
) -> dict[str, Any]:
    """Statistical efficiency of MD for the φ>0 population: τ of the φ>0 indicator
    (:func:`integrated_autocorrelation_time`, 1+2Σρ convention, pooled over the replicas, and
    per replica), basin transitions, independent samples ``n_frames / τ``, and given the MD
    wall seconds per frame (all workers together, i.e. total production steps / total steps per
    second), independent samples per wall second ``1 / (τ · seconds_per_frame)``.
    ``tau_phi_reliable`` says whether the replicas are at least 50 τ long on average (shorter
    series underestimate τ: the estimate is then a lower bound)."""
    phi = np.asarray(phi, dtype=np.float64)
    segments = [np.arange(phi.size)] if segments is None else [np.asarray(s) for s in segments]
    series = [(phi[s] > 0).astype(np.float64) for s in segments]
    tau = integrated_autocorrelation_time(series)
    n = int(sum(s.size for s in series))
    independent = n / tau if tau > 0 else math.nan
    spf = math.nan if seconds_per_frame is None else float(seconds_per_frame)
    md_seconds = n * spf
    mean_length = n / len(series) if series else 0.0
    return {
        "tau_phi_frames": tau,
        "tau_phi_reliable": bool(tau > 0 and mean_length >= 50 * tau),
        "tau_phi_frames_replicas": [integrated_autocorrelation_time(s) for s in series],
        "tau_phi_ps": tau * ps_per_frame if ps_per_frame else math.nan,
        "ps_per_frame": float(ps_per_frame) if ps_per_frame else math.nan,
        "basin_transitions": basin_transitions([phi[s] for s in segments]),
        "n_frames_series": n,
        "independent_samples": independent,
        "seconds_per_frame": spf,
        "md_seconds": md_seconds,
        "independent_samples_per_second": independent / md_seconds if md_seconds > 0 else math.nan,
    }


def bg_value(
    ess: float, n_samples: int, seconds: float | None, md_independent_per_second: float | None
) -> dict[str, float]:
    """The BG's effective samples per wall second, ``ESS · N / seconds`` (seconds: sampling,
    energies and weights together), and its ratio to MD's independent samples per second
    (the "BG value": > 1 means the BG beats MD at sampling the φ populations)."""
    sec = math.nan if seconds is None else float(seconds)
    md = math.nan if md_independent_per_second is None else float(md_independent_per_second)
    effective = ess * n_samples
    per_second = effective / sec if sec > 0 else math.nan
    return {
        "sampling_seconds": sec,
        "bg_effective_samples": effective,
        "bg_effective_samples_per_second": per_second,
        "md_independent_samples_per_second": md,
        "bg_value": per_second / md if md > 0 else math.nan,
    }


def _split_halves(n: int) -> tuple[slice, slice]:
    return slice(0, n // 2), slice(n // 2, n)


def reference_metrics(
    u: np.ndarray,
    phi: np.ndarray,
    psi: np.ndarray,
    is_l: np.ndarray,
    u_train_max: float,
    segments: list[np.ndarray] | None = None,
    ps_per_frame: float | None = None,
    seconds_per_frame: float | None = None,
) -> dict[str, Any]:
    """Metrics of the MD reference itself, with the MD-vs-MD floor of each KL.

    The floor compares the first and second half of the reference frames (in the order given:
    for a p4bg test split, the first replicas' blocks against the last ones'): the KL a perfect
    model would still show with this many correlated frames. segments: index arrays of the
    contiguous time series (one per replica, in time order; default: all frames are one), for
    the uncertainty of ΔF (:func:`md_delta_f`) and the statistical efficiency
    (:func:`md_efficiency`, with the saving interval ``ps_per_frame`` and the MD wall
    ``seconds_per_frame``)."""
    if len(phi) < 4:
        raise ValueError(f"reference_metrics: need at least 4 reference frames, got {len(phi)}")
    a, b = _split_halves(len(phi))
    out = {
        "n": len(u),
        "mean_u": float(np.mean(u)),
        "median_u": float(np.median(u)),
        "u_train_max": float(u_train_max),
        "low_energy_fraction": low_energy_fraction(u, u_train_max),
        "high_energy_fraction": high_energy_fraction(u, u_train_max),
        "kl_rama_floor": ramachandran_kl(phi[a], psi[a], phi[b], psi[b]),
        "kl_phi_floor": kl_1d(phi[a], phi[b]),
        "kl_psi_floor": kl_1d(psi[a], psi[b]),
        "delta_f": delta_f(phi),
        "delta_f_halves": [delta_f(phi[a]), delta_f(phi[b])],
        "chirality_violations": chirality_violations(is_l),
        "d_form_fraction": chirality_violations(is_l),
    }
    out.update(md_delta_f(phi, segments))
    out.update(md_efficiency(phi, segments, ps_per_frame, seconds_per_frame))
    return out


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
    sampling_seconds: float | None = None,
    md_independent_per_second: float | None = None,
) -> dict[str, Any]:
    """Every metric of DESIGN.md §5 for one generated ensemble against an MD reference.

    u: reduced energies of the samples (kT), +inf where evaluation failed; log_w: −u − log q;
    phi, psi: radians; is_l: L-chirality per sample; finite: samples with finite positions;
    reference: ``{"u", "phi", "psi"}`` arrays of the MD frames; u_train_max: maximum u of the
    training frames (kT); log_w_reference: −u − log q on the MD frames (forward ESS and the
    forward log Z), if known; sampling_seconds: wall time of sampling with energies and weights;
    md_independent_per_second: MD's independent samples per second (:func:`md_efficiency`),
    for the BG value (:func:`bg_value`).
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
        "u_train_max": float(u_train_max),
        "low_energy_fraction": low_energy_fraction(u, u_train_max),
        "high_energy_fraction": high_energy_fraction(u, u_train_max),
        "reverse_ess": reverse_ess(log_w),
        "reverse_ess_clipped": reverse_ess_clipped(log_w),
        "forward_ess": forward_ess(log_w_reference) if log_w_reference is not None else math.nan,
        "log_z_reverse": log_z_reverse(log_w),
        "log_z_forward": log_z_forward(log_w_reference)
        if log_w_reference is not None
        else math.nan,
        "kl_rama": _or_nan(ramachandran_kl, ref_phi, ref_psi, phi, psi),
        "kl_phi": _or_nan(kl_1d, ref_phi, phi),
        "kl_psi": _or_nan(kl_1d, ref_psi, psi),
        "chirality_violations": chirality_violations(is_l, finite),
        "d_form_fraction": chirality_violations(is_l, finite),
    }
    out["delta_f"], out["delta_f_err"] = delta_f_with_error(phi)
    # forward − reverse: ≥ 0 in expectation when log q is the normalised density of the samples
    out["log_z_gap"] = out["log_z_forward"] - out["log_z_reverse"]
    if log_w_reference is not None:
        out["forward_n_nonfinite"] = int(np.sum(~np.isfinite(log_w_reference)))
        out.update(forward_weight_diagnostics(log_w_reference, ref_phi))
    try:
        w = normalised_weights(log_w)
    except ValueError:  # every weight is zero: nothing can be reweighted
        w = None
    out["kl_rama_reweighted"] = _weighted(ramachandran_kl, w, ref_phi, ref_psi, phi, psi)
    out["kl_phi_reweighted"] = _weighted(kl_1d, w, ref_phi, phi)
    out["kl_psi_reweighted"] = _weighted(kl_1d, w, ref_psi, psi)
    out["delta_f_reweighted"], out["delta_f_reweighted_err"] = (
        (math.nan, math.nan) if w is None else delta_f_with_error(phi, w)
    )
    out.update(bg_value(out["reverse_ess"], len(u), sampling_seconds, md_independent_per_second))
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
