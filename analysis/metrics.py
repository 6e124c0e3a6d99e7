"""The metrics of docs/design.md §5 over arrays: energies (kT), dihedrals (radians), log-weights.

Kept as the one place to import every metric from; they live by subject in analysis.weights
(ESS, log Z, EUBO, energy shares), analysis.histograms (Ramachandran and 1-D KL, TV, ΔF,
chirality),
analysis.timeseries (blocking, autocorrelation time, MD ΔF and efficiency) and analysis.summary
(the metric dicts of the MD reference and of a generated ensemble, the BG value).

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

from analysis.histograms import (
    EPS,
    PHI_BINS,
    RAMA_BINS,
    chirality_violations,
    delta_f,
    delta_f_with_error,
    kl_1d,
    kl_divergence,
    ramachandran_histogram,
    ramachandran_kl,
    ramachandran_tv,
    total_variation,
)
from analysis.summary import (
    bg_value,
    ensemble_metrics,
    forward_weight_diagnostics,
    reference_metrics,
)
from analysis.timeseries import (
    Blocking,
    basin_transitions,
    block_standard_error,
    integrated_autocorrelation_time,
    md_delta_f,
    md_efficiency,
)
from analysis.weights import (
    CLIP_FRACTION,
    MIN_BASIN_ESS,
    basin_ess,
    eubo,
    forward_ess,
    high_energy_fraction,
    log_z_forward,
    log_z_reverse,
    logsumexp,
    low_energy_fraction,
    mean_energy_shift,
    normalised_weights,
    reverse_ess,
    reverse_ess_clipped,
)

__all__ = [
    "CLIP_FRACTION",
    "EPS",
    "MIN_BASIN_ESS",
    "PHI_BINS",
    "RAMA_BINS",
    "Blocking",
    "basin_ess",
    "basin_transitions",
    "bg_value",
    "block_standard_error",
    "chirality_violations",
    "delta_f",
    "delta_f_with_error",
    "ensemble_metrics",
    "eubo",
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
    "ramachandran_tv",
    "reference_metrics",
    "reverse_ess",
    "reverse_ess_clipped",
    "total_variation",
]
