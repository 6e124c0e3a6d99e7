"""Free energies from biased or multi-temperature MD, with pymbar's MBAR: ΔF(φ > 0 vs φ < 0).

Two estimators, one for each way p4bg samples the rare basin of alanine dipeptide:

* replica exchange (:func:`mbar_delta_f`): the frames of every temperature of a ladder, reduced
  potentials β_k U, joined by MBAR into the lowest temperature's P(φ > 0);
* umbrella sampling (:func:`umbrella_delta_f`): windows restrained along φ (and ψ), reduced
  potentials β·bias_i (the force field cancels between windows), joined by MBAR into the
  unbiased state with no samples of its own.

ΔF = −ln(p / (1 − p)) in kT, with p = P(φ > 0); its uncertainty is MBAR's asymptotic one on
frames thinned by their statistical inefficiency (pymbar.timeseries), δΔF = δp / (p(1 − p)).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from p4bg.units import R

__all__ = [
    "bias_energy",
    "delta_f",
    "mbar_delta_f",
    "quiet",
    "remd_estimates",
    "round_trips",
    "umbrella_delta_f",
]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence pymbar: it announces on import that JAX is missing (on stdout and through
    logging), and warns about harmless numerics inside MBAR."""
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            # log(0) of an indicator's zeros inside MBAR's expectations: expected, harmless
            warnings.filterwarnings("ignore", "divide by zero", RuntimeWarning)
            # a negative rounding residue under the square root of an error not asked for;
            # an error that is asked for and not finite shows as NaN in the result
            warnings.filterwarnings("ignore", "invalid value encountered in sqrt", RuntimeWarning)
            yield
    finally:
        logging.disable(level)


def delta_f(p: float) -> float:
    """ΔF = −ln(p/(1−p)) in kT for p = P(φ > 0): +inf when no frame has φ > 0, −inf when all
    have."""
    if p <= 0:
        return math.inf
    return -math.inf if p >= 1 else math.log((1 - p) / p)


# ------------------------------------------------------------------------- replica exchange
def _mbar_phi_positive(
    energy: np.ndarray,
    indicator: np.ndarray,
    n_k: np.ndarray,
    beta: np.ndarray,
    initial_f_k: np.ndarray | None = None,
) -> tuple[float, float, np.ndarray]:
    """MBAR's P(φ>0) at the first temperature with its asymptotic error, and the states' f_k.
    energy, indicator: all frames [N] ordered by state, n_k frames per state. Without a φ>0
    frame (or without a φ<0 one) the probability is 0 (or 1) with an unknown error: MBAR's
    expectation would take the log of 0."""
    with quiet():
        import pymbar

        if not 0 < indicator.sum() < len(indicator):
            mbar = pymbar.MBAR(beta[:, None] * energy[None, :], n_k, initial_f_k=initial_f_k)
            return float(indicator.mean() > 0), math.nan, mbar.f_k
        mbar = pymbar.MBAR(beta[:, None] * energy[None, :], n_k, initial_f_k=initial_f_k,
                           solver_protocol="robust")  # fmt: skip
        result = mbar.compute_expectations(indicator, compute_uncertainty=True)
    return float(result["mu"][0]), float(result["sigma"][0]), mbar.f_k


def _stack(energies: list[np.ndarray], phi: list[np.ndarray], rows: list[np.ndarray]) -> tuple:
    """The frames ``rows[c]`` of each chain c, ordered by temperature: (energy, φ>0, n_k)."""
    K = energies[0].shape[1]
    e = [energies[c][rows[c]] for c in range(len(energies))]
    ind = [(phi[c][rows[c]] > 0).astype(np.float64) for c in range(len(phi))]
    energy = np.concatenate([x[:, k] for k in range(K) for x in e])
    indicator = np.concatenate([x[:, k] for k in range(K) for x in ind])
    n_k = np.full(K, sum(len(r) for r in rows), dtype=np.int64)
    return energy, indicator, n_k


def mbar_delta_f(
    energies: list[np.ndarray],
    phi: list[np.ndarray],
    temperatures: list[float],
    n_bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """ΔF(φ>0 vs φ<0) at ``temperatures[0]`` (kT) by MBAR over all temperatures.

    energies, phi: one array [frames, K] per chain (kJ/mol, radians; column k sampled at
    temperatures[k], K). The estimate uses every frame. Its uncertainty (``delta_f_err``) is
    MBAR's asymptotic one on the frames thinned by g, the largest statistical inefficiency of
    the φ>0 indicator over the temperatures' series (pymbar.timeseries). With
    ``n_bootstrap`` > 0 it is instead the standard deviation over a moving-block bootstrap:
    each chain's exchange cycles cut into blocks of 10 g cycles, drawn with replacement, all
    temperatures of a cycle together (they are correlated through the exchanges), MBAR solved
    again on each resample (minutes per resample for a 30-minute run on these CPUs)."""
    with quiet():
        from pymbar import timeseries

    beta = 1.0 / (R * np.asarray(temperatures, dtype=np.float64))
    K = len(temperatures)
    g = 1.0
    for p in phi:
        for k in range(K):
            series = (p[:, k] > 0).astype(np.float64)
            if 0 < series.mean() < 1:
                with quiet():
                    g = max(g, float(timeseries.statistical_inefficiency(series)))
    stride = max(1, math.ceil(g))
    full = [np.arange(len(e)) for e in energies]
    p, _, f_k = _mbar_phi_positive(*_stack(energies, phi, full), beta)
    thinned = [np.arange(0, len(e), stride) for e in energies]
    p_thin, dp_thin, _ = _mbar_phi_positive(*_stack(energies, phi, thinned), beta, f_k)
    rng = np.random.default_rng(seed)
    block = stride * 10
    boot = []
    for _ in range(n_bootstrap):
        rows = []
        for e in energies:
            n = len(e)
            length = min(block, n)
            starts = rng.integers(0, n - length + 1, math.ceil(n / length))
            rows.append((starts[:, None] + np.arange(length)[None, :]).ravel()[:n])
        boot.append(delta_f(_mbar_phi_positive(*_stack(energies, phi, rows), beta, f_k)[0]))
    asymptotic = dp_thin / (p_thin * (1 - p_thin)) if 0 < p_thin < 1 else math.inf
    err = asymptotic
    if n_bootstrap:
        boot_arr = np.asarray(boot)
        ok = np.isfinite(boot_arr)
        err = float(np.std(boot_arr[ok], ddof=1)) if ok.sum() >= 2 else math.nan
        if ok.sum() < len(boot_arr):  # a resample without any φ > 0 frame: ΔF = +inf there
            err = math.inf
    return {
        "delta_f": delta_f(p), "delta_f_err": err, "phi_positive_fraction": p,
        "delta_f_err_asymptotic": asymptotic,
        "delta_f_thinned": delta_f(p_thin), "statistical_inefficiency": g, "stride": stride,
        "bootstrap": {"n": n_bootstrap, "block_cycles": block, "seed": seed},
        "n_samples": int(sum(len(e) for e in energies) * K),
        "temperature_K": float(temperatures[0]),
    }  # fmt: skip


def round_trips(walker: np.ndarray) -> int:
    """Walks from the lowest temperature to the highest and back, summed over the walkers.
    walker: [cycles, K], the walker (initial replica) at each temperature."""
    K = walker.shape[1]
    trips = 0
    for w in range(K):
        where = np.argmax(walker == w, axis=1)  # the temperature index walker w sits at
        target, legs = K - 1, 0
        for k in where:
            if k == target:
                legs += 1
                target = 0 if target == K - 1 else K - 1
        trips += legs // 2
    return trips


def remd_estimates(
    chains: list[dict[str, np.ndarray]],
    temperatures: list[float],
    residue_labels: list[str] | None = None,
) -> dict:
    """The record of a replica-exchange run: MBAR over all chains (and each chain alone),
    exchange acceptance per neighbour pair, walker round trips, P(φ > 0) per temperature; with
    ``residue_labels`` and every chain's phi_residues_all, also ``residues``: label → the MBAR
    ΔF(φ > 0 vs φ < 0) of that residue's φ, with its uncertainty.

    chains: each chain's arrays (``p4bg.md.exchange.read_chain_arrays``): energies_all,
    phi_all, walker [cycles, K], attempts and accepts [K − 1], optionally phi_residues_all
    [cycles, K, residues]."""
    pooled = mbar_delta_f([c["energies_all"] for c in chains], [c["phi_all"] for c in chains],
                          temperatures)  # fmt: skip
    per_chain = [mbar_delta_f([c["energies_all"]], [c["phi_all"]], temperatures) for c in chains]
    attempts = sum(c["attempts"] for c in chains)
    accepts = sum(c["accepts"] for c in chains)
    residues = {}
    if residue_labels and all("phi_residues_all" in c for c in chains):
        for r, label in enumerate(residue_labels):
            phi = [c["phi_residues_all"][:, :, r] for c in chains]
            own = all(np.array_equal(p, c["phi_all"]) for p, c in zip(phi, chains, strict=True))
            m = pooled if own else mbar_delta_f([c["energies_all"] for c in chains], phi,
                                                temperatures)  # fmt: skip
            keep = ("delta_f", "delta_f_err", "phi_positive_fraction", "statistical_inefficiency")
            residues[label] = {k: m[k] for k in keep}
    return {
        **pooled,
        "delta_f_chains": [c["delta_f"] for c in per_chain],
        "delta_f_err_chains": [c["delta_f_err"] for c in per_chain],
        "acceptance": (accepts / np.maximum(attempts, 1)).tolist(),
        "round_trips": int(sum(round_trips(c["walker"]) for c in chains)),
        "phi_positive_fraction_by_temperature": [
            float(np.mean(np.concatenate([c["phi_all"][:, k] for c in chains]) > 0))
            for k in range(len(temperatures))
        ],
        **({"residues": residues} if residues else {}),
    }


# ------------------------------------------------------------------------ umbrella sampling
def bias_energy(angles: np.ndarray, center: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The umbrella restraint's energy Σ ½ k Δθ² (kJ/mol) over φ and ψ, Δθ the periodic
    difference (|Δθ| ≤ π), as the windows' restraint forces compute it.

    angles: (n, 2) rad (φ, ψ); center: (2,) rad; k: (2,) kJ/mol/rad² (k_ψ = 0: φ alone).
    Returns (n,)."""
    a = np.abs(angles - center)
    d = np.minimum(a, 2 * np.pi - a)
    return 0.5 * (k * d**2).sum(-1)


def umbrella_delta_f(
    angles: list[np.ndarray], centers: np.ndarray, k: np.ndarray, temperature: float
) -> dict[str, Any]:
    """ΔF(φ>0 vs φ<0) in kT at ``temperature`` (K) from umbrella windows.

    angles: one (frames, 2) array of (φ, ψ) per window, rad; centers: (windows, 2) rad;
    k: (k_φ, k_ψ) kJ/mol/rad². P(φ > 0) is MBAR's expectation in the unbiased state, on every
    frame; its error uses each window thinned by the statistical inefficiency of its bias
    energy. The first and second halves of every window give two more estimates
    (``delta_f_halves``), a check of equilibration."""
    with quiet():
        import pymbar
        from pymbar import timeseries

    beta = 1.0 / (R * temperature)
    k = np.asarray(k, dtype=np.float64)
    f_start: list[np.ndarray | None] = [None]  # the first solve's f_k starts the later ones

    def solve(series: list[np.ndarray], error: bool) -> tuple[float, float]:
        both = np.concatenate(series)
        u_kn = np.vstack([np.zeros(len(both))]
                         + [beta * bias_energy(both, c, k) for c in centers])  # fmt: skip
        n_k = np.array([0] + [len(s) for s in series])
        with quiet():
            mbar = pymbar.MBAR(u_kn, n_k, initial_f_k=f_start[0])
            if f_start[0] is None:
                f_start[0] = mbar.f_k
            result = mbar.compute_expectations((both[:, 0] > 0).astype(np.float64),
                                               compute_uncertainty=error)  # fmt: skip
        return float(result["mu"][0]), float(result["sigma"][0]) if error else math.nan

    def delta(p: float) -> float:
        return math.log((1 - p) / p) if 0 < p < 1 else math.nan

    p, _ = solve(angles, error=False)
    g = []
    for s, c in zip(angles, centers, strict=True):
        with quiet():
            g.append(float(timeseries.statistical_inefficiency(bias_energy(s, c, k))))
    thinned = [s[:: max(1, math.ceil(gi))] for s, gi in zip(angles, g, strict=True)]
    p_thin, dp = solve(thinned, error=True)
    halves = [delta(solve([s[: len(s) // 2] for s in angles], False)[0]),
              delta(solve([s[len(s) // 2 :] for s in angles], False)[0])]  # fmt: skip
    return {
        "delta_f": delta(p),
        "delta_f_err": dp / (p_thin * (1 - p_thin)) if 0 < p_thin < 1 else math.nan,
        "phi_positive_fraction": p, "delta_f_thinned": delta(p_thin), "delta_f_halves": halves,
        "statistical_inefficiency_max": max(g), "statistical_inefficiency_mean": float(np.mean(g)),
        "n_samples": int(sum(len(s) for s in angles)),
        "n_samples_thinned": int(sum(len(s) for s in thinned)), "temperature_K": temperature,
    }  # fmt: skip
