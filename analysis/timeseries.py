"""Statistics of correlated MD time series: block averaging, the integrated autocorrelation
time, basin transitions, and from them ΔF of MD frames with its error and MD's efficiency.

MD frames are not independent draws, so their errors cannot come from counting: a series is one
replica's frames in time order (φ in radians, shape (n,)); several replicas are independent
series given as index arrays ("segments") into one array of all frames.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import numpy as np

from analysis.histograms import delta_f_error, delta_f_of_fraction, finite_angles

__all__ = [
    "MIN_TRANSITIONS",
    "TRANSITION_MARGIN",
    "Blocking",
    "basin_transitions",
    "block_standard_error",
    "chi2_quantile_99",
    "committed_transitions",
    "integrated_autocorrelation_time",
    "md_delta_f",
    "md_efficiency",
    "replica_segments",
]


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


def chi2_quantile_99(df: int) -> float:
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
        if m[k] < chi2_quantile_99(levels - k):
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
        a = a[finite_angles(a) & (a != 0)]
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
    err_block, err_rep = delta_f_error(p, dp_block), delta_f_error(p, dp_rep)
    errors = [e for e in (err_block, err_rep) if math.isfinite(e)]
    return {
        "delta_f": delta_f_of_fraction(p),
        "delta_f_err": max(errors) if errors else math.nan,
        "delta_f_err_block": err_block,
        "delta_f_err_replicas": err_rep,
        "phi_positive_fraction": p,
        "delta_f_replicas": [delta_f_of_fraction(float(x)) for x in p_r],
        "n_replicas": len(series),
        "block_sizes": [b.block_size for b in blocks],
        "blocking_converged": all(b.converged for b in blocks),
    }


MIN_TRANSITIONS = 10  # committed basin changes each way before MD's ΔF or τ means something
TRANSITION_MARGIN = 0.5  # rad (≈ 29°): hysteresis of committed_transitions


def committed_transitions(
    phi_segments: list[np.ndarray], margin: float = TRANSITION_MARGIN
) -> tuple[int, int]:
    """``(into, out_of)``: committed changes into the φ > 0 basin and out of it, summed over the
    segments (radians, each in time order). Unlike analysis.metrics.basin_transitions (every
    sign change), only moves from one basin's core to the other's count: cores ``[margin,
    π − margin]`` (φ > 0) and ``[−π + margin, −margin]`` (φ < 0). Frames near φ = 0 or ±π (the
    β basin's edge, where φ wraps without a barrier) keep the last core, so recrossings and
    wraps do not count; non-finite φ is skipped; a segment's first core is not a transition."""
    into = out = 0
    for phi in phi_segments:
        phi = np.asarray(phi, dtype=np.float64)
        phi = phi[np.isfinite(phi)]
        core = np.zeros(phi.size, dtype=np.int8)
        core[(phi >= margin) & (phi <= math.pi - margin)] = 1
        core[(phi <= -margin) & (phi >= -math.pi + margin)] = -1
        seq = core[core != 0]
        change = np.diff(seq)
        into += int(np.count_nonzero(change > 0))
        out += int(np.count_nonzero(change < 0))
    return into, out


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
    into, out_of = committed_transitions([phi[s] for s in segments])
    note = None
    if min(into, out_of) < MIN_TRANSITIONS:
        # a correlation time from a series that hardly changes basin says nothing: no number
        tau = math.nan
        note = (f"not measurable here: {into} transitions into φ > 0 and {out_of} out of it; "
                f"τ needs at least {MIN_TRANSITIONS} each way")  # fmt: skip
    else:
        tau = integrated_autocorrelation_time(series)
    n = int(sum(s.size for s in series))
    independent = n / tau if tau > 0 else math.nan
    spf = math.nan if seconds_per_frame is None else float(seconds_per_frame)
    md_seconds = n * spf
    mean_length = n / len(series) if series else 0.0
    return {
        "tau_phi_frames": tau,
        "tau_phi_note": note,
        "committed_transitions": [into, out_of],
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


def replica_segments(frames_per_replica: list[int], idx: np.ndarray) -> list[np.ndarray]:
    """Positions in ``idx`` (global frame indices, in order) of each contiguous time series:
    the frames of one replica, cut where the indices are not consecutive."""
    offsets = np.cumsum([0, *frames_per_replica])
    segments = []
    for a, b in itertools.pairwise(offsets):
        pos = np.nonzero((idx >= a) & (idx < b))[0]
        if pos.size:
            cuts = np.nonzero(np.diff(idx[pos]) != 1)[0] + 1
            segments += [part for part in np.split(pos, cuts) if part.size]
    return segments
