"""Every metric of docs/design.md §5 at once: one dict for the MD reference, one per generated
ensemble, and the BG value that compares them.

These are what an analysis writes to metrics.json; the single metrics they gather live in
analysis.weights, analysis.histograms and analysis.timeseries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from analysis.histograms import (
    chirality_violations,
    delta_f,
    delta_f_with_error,
    kl_1d,
    ramachandran_kl,
    ramachandran_tv,
)
from analysis.timeseries import MIN_TRANSITIONS, md_delta_f, md_efficiency
from analysis.weights import (
    MIN_BASIN_ESS,
    basin_ess,
    eubo,
    forward_ess,
    high_energy_fraction,
    log_z_forward,
    log_z_reverse,
    low_energy_fraction,
    mean_energy_shift,
    normalised_weights,
    reverse_ess,
    reverse_ess_clipped,
)

__all__ = [
    "bg_value",
    "ensemble_metrics",
    "forward_weight_diagnostics",
    "reference_metrics",
    "split_halves",
]


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


def split_halves(n: int) -> tuple[slice, slice]:
    """First and second half of n frames (the first shorter by one for odd n): the two sets the
    MD-vs-MD floor of each KL compares."""
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
    a, b = split_halves(len(phi))
    out = {
        "n": len(u),
        "mean_u": float(np.mean(u)),
        "median_u": float(np.median(u)),
        "u_train_max": float(u_train_max),
        "low_energy_fraction": low_energy_fraction(u, u_train_max),
        "high_energy_fraction": high_energy_fraction(u, u_train_max),
        "kl_rama_floor": ramachandran_kl(phi[a], psi[a], phi[b], psi[b]),
        "tv_rama_floor": ramachandran_tv(phi[a], psi[a], phi[b], psi[b]),
        "kl_phi_floor": kl_1d(phi[a], phi[b]),
        "kl_psi_floor": kl_1d(psi[a], psi[b]),
        "delta_f": delta_f(phi),
        "delta_f_halves": [delta_f(phi[a]), delta_f(phi[b])],
        "chirality_violations": chirality_violations(is_l),
        "d_form_fraction": chirality_violations(is_l),
    }
    out.update(md_delta_f(phi, segments))
    out.update(md_efficiency(phi, segments, ps_per_frame, seconds_per_frame))
    into, out_of = out["committed_transitions"]
    out["delta_f_note"] = None
    if min(into, out_of) < MIN_TRANSITIONS:  # the frames' populations say nothing: no number
        out["delta_f_note"] = (f"not measurable here: {into} transitions into φ > 0 and "
                               f"{out_of} out of it; ΔF needs at least {MIN_TRANSITIONS} "
                               "each way")  # fmt: skip
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
    """Every metric of docs/design.md §5 for one generated ensemble against an MD reference.

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
        "tv_rama": _or_nan(ramachandran_tv, ref_phi, ref_psi, phi, psi),
        "kl_phi": _or_nan(kl_1d, ref_phi, phi),
        "kl_psi": _or_nan(kl_1d, ref_psi, psi),
        "chirality_violations": chirality_violations(is_l, finite),
        "d_form_fraction": chirality_violations(is_l, finite),
    }
    out["delta_f"], out["delta_f_err"] = delta_f_with_error(phi)
    # forward − reverse: ≥ 0 in expectation when log q is the normalised density of the samples
    out["log_z_gap"] = out["log_z_forward"] - out["log_z_reverse"]
    # EUBO − log Ẑ estimates KL(p‖q): the coordinates' volume convention cancels, so it can be
    # set beside another code's EUBO − log Z where the EUBOs themselves cannot
    out["eubo"] = eubo(log_w_reference) if log_w_reference is not None else math.nan
    out["forward_kl"] = out["eubo"] - out["log_z_reverse"]
    if log_w_reference is not None:
        out["forward_n_nonfinite"] = int(np.sum(~np.isfinite(log_w_reference)))
        out.update(forward_weight_diagnostics(log_w_reference, ref_phi))
    try:
        w = normalised_weights(log_w)
    except ValueError:  # every weight is zero: nothing can be reweighted
        w = None
    out["kl_rama_reweighted"] = _weighted(ramachandran_kl, w, ref_phi, ref_psi, phi, psi)
    out["tv_rama_reweighted"] = _weighted(ramachandran_tv, w, ref_phi, ref_psi, phi, psi)
    out["kl_phi_reweighted"] = _weighted(kl_1d, w, ref_phi, phi)
    out["kl_psi_reweighted"] = _weighted(kl_1d, w, ref_psi, psi)
    out["delta_f_reweighted"], out["delta_f_reweighted_err"] = (
        (math.nan, math.nan) if w is None else delta_f_with_error(phi, w)
    )
    pos, neg = (0.0, 0.0) if w is None else basin_ess(phi, w)
    out["effective_samples_phi_positive"], out["effective_samples_phi_negative"] = pos, neg
    out["delta_f_reweighted_note"] = None
    if min(pos, neg) < MIN_BASIN_ESS:  # a ΔF from a handful of weighted samples: no number
        out["delta_f_reweighted_note"] = (
            f"not measurable here: {min(pos, neg):.1f} effective samples in the "
            f"{'φ > 0' if pos < neg else 'φ < 0'} basin; ΔF needs at least {MIN_BASIN_ESS:g}"
        )
    out.update(bg_value(out["reverse_ess"], len(u), sampling_seconds, md_independent_per_second))
    # The floor compares n/2 MD frames with n/2 others, and with ε = 1e-10 every empty bin on
    # the q side weighs heavily, so the KL depends on the q sample count. For a like-for-like
    # comparison with the floor: the first half of the MD frames against as many model samples
    # (fewer if the model has fewer; n_matched says how many).
    a, b = split_halves(len(ref_phi))
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
    # the TV's histogram noise shrinks with the counts too: the same like-for-like pair
    out["tv_rama_matched"] = _or_nan(ramachandran_tv, ref_phi[a], ref_psi[a], phi[sub], psi[sub])
    out["tv_rama_reweighted_matched"] = _weighted(
        ramachandran_tv, w_sub, ref_phi[a], ref_psi[a], phi[sub], psi[sub]
    )
    return out
