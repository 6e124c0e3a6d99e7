"""analysis/: every docs/design.md §5 metric on cases with known answers, figures, report files."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from analysis.geometry import is_l_chirality
from analysis.metrics import (
    basin_transitions,
    bg_value,
    block_standard_error,
    delta_f,
    delta_f_with_error,
    ensemble_metrics,
    eubo,
    forward_ess,
    forward_weight_diagnostics,
    high_energy_fraction,
    integrated_autocorrelation_time,
    kl_1d,
    kl_divergence,
    log_z_forward,
    log_z_reverse,
    logsumexp,
    low_energy_fraction,
    md_delta_f,
    md_efficiency,
    mean_energy_shift,
    normalised_weights,
    ramachandran_histogram,
    ramachandran_kl,
    ramachandran_tv,
    reference_metrics,
    reverse_ess,
    reverse_ess_clipped,
    total_variation,
)
from analysis.plots import (
    AngleSet,
    plot_energies,
    plot_free_energy_phi,
    plot_ramachandran,
    plot_training,
)
from analysis.report import (
    ROWS,
    markdown_table,
    metrics_json_text,
    report_md_text,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def angles(rng, n, centre=(-1.5, 2.5), scale=0.6):
    """φ/ψ around a centre, wrapped to [−π, π)."""
    wrap = lambda a: (a + np.pi) % (2 * np.pi) - np.pi  # noqa: E731
    return wrap(rng.normal(centre[0], scale, n)), wrap(rng.normal(centre[1], scale, n))


def test_analysis_never_imports_torch():
    code = ("import sys, analysis.geometry, analysis.metrics, analysis.plots, analysis.report, "
            "analysis.weights, analysis.histograms, analysis.timeseries, analysis.summary; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'p4bg' not in sys.modules, 'p4bg imported'; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)


def test_metrics_reexports_every_name_of_its_subjects():
    """analysis.metrics stays the one place to import a metric from, whatever module it is in."""
    import analysis.histograms
    import analysis.metrics
    import analysis.summary
    import analysis.timeseries
    import analysis.weights

    modules = (analysis.weights, analysis.histograms, analysis.timeseries, analysis.summary)
    owners = {name: m for m in modules for name in m.__all__}
    for name in analysis.metrics.__all__:
        assert getattr(analysis.metrics, name) is getattr(owners[name], name), name


# ----------------------------------------------------------------------------------- weights
def test_logsumexp_edge_cases():
    assert logsumexp(np.array([])) == -math.inf
    assert logsumexp(np.array([-np.inf, -np.inf])) == -math.inf
    assert logsumexp(np.array([1000.0, 1000.0])) == pytest.approx(1000 + math.log(2))


def test_reverse_ess_uniform_is_one_and_single_dominant_is_one_over_n():
    assert reverse_ess(np.full(100, -3.7)) == pytest.approx(1.0)
    log_w = np.full(100, -1e4)
    log_w[7] = 0.0
    assert reverse_ess(log_w) == pytest.approx(0.01)


def test_reverse_ess_matches_kish_formula_and_counts_failed_samples():
    rng = np.random.default_rng(0)
    w = rng.exponential(size=500)
    kish = w.sum() ** 2 / (w**2).sum() / len(w)
    assert reverse_ess(np.log(w) + 123.0) == pytest.approx(kish, rel=1e-12)  # scale-free
    failed = np.concatenate([np.log(w), [-np.inf] * 250, [np.nan] * 250])  # weight 0, still in N
    assert reverse_ess(failed) == pytest.approx(kish / 2, rel=1e-12)
    assert reverse_ess(np.full(3, -np.inf)) == 0.0


def test_infinite_log_weights_share_the_weight():
    """log q underflowing to −inf at a finite energy: those samples take all the weight."""
    log_w = np.array([0.0, np.inf, 3.0, np.inf])
    np.testing.assert_allclose(normalised_weights(log_w), [0, 0.5, 0, 0.5])
    assert reverse_ess(log_w) == pytest.approx(0.5)


def test_forward_ess_known_values():
    assert forward_ess(np.full(50, 2.0)) == pytest.approx(1.0)
    w = np.array([1.0, 2.0])  # 1 / (1.5 · 0.75)
    assert forward_ess(np.log(w) - 40.0) == pytest.approx(1 / 1.125)
    assert forward_ess(np.array([0.0, np.inf])) == 0.0  # a frame of zero model density


def test_forward_weight_diagnostics_find_the_underrepresented_frames():
    phi = np.array([-1.0] * 20 + [1.0] * 5)
    log_w = np.zeros(25)
    log_w[20:] = [30.0, 40.0, 50.0, 60.0, 70.0]  # the φ > 0 frames are the heaviest
    d = forward_weight_diagnostics(log_w, phi, top=5)
    assert d["forward_top_phi_positive"] == 1.0 and d["forward_log_w_spread"] == 70.0
    assert forward_weight_diagnostics(log_w, phi, top=10)["forward_top_phi_positive"] == 0.5


def test_normalised_weights_sum_to_one_and_reject_all_zero():
    w = normalised_weights(np.array([0.0, np.log(3.0), -np.inf, np.nan]))
    np.testing.assert_allclose(w, [0.25, 0.75, 0.0, 0.0])
    with pytest.raises(ValueError, match="no sample"):
        normalised_weights(np.array([-np.inf, np.nan]))


# ---------------------------------------------------------------------------------- energies
def test_energy_shift_and_low_energy_fraction():
    rng = np.random.default_rng(1)
    u_ref = rng.normal(3.0, 2.0, 1000)
    assert mean_energy_shift(u_ref + 2.5, u_ref) == pytest.approx(2.5)
    assert mean_energy_shift(np.array([1.0, np.inf]), u_ref) == math.inf
    u = np.array([0.0, 1.0, 5.0, np.inf])
    assert low_energy_fraction(u, 2.0) == 0.5  # the failed sample counts, and is not low


# ---------------------------------------------------------------------------------------- KL
def test_identical_ensembles_have_zero_kl():
    rng = np.random.default_rng(2)
    phi, psi = angles(rng, 5000)
    assert ramachandran_kl(phi, psi, phi, psi) == pytest.approx(0.0, abs=1e-12)
    assert kl_1d(phi, phi) == pytest.approx(0.0, abs=1e-12)
    uniform = np.ones(len(phi)) / len(phi)  # uniform weights == no weights
    assert ramachandran_kl(phi, psi, phi, psi, uniform) == pytest.approx(0.0, abs=1e-12)


def test_kl_divergence_matches_a_hand_computed_value():
    p = np.array([0.5, 0.5]) / 0.5  # densities on two cells of width 0.5
    q = np.array([0.25, 0.75]) / 0.5
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(p, q, 0.5) == pytest.approx(expected, rel=1e-8)


def test_total_variation_matches_known_answers():
    p = np.array([0.5, 0.5]) / 0.5  # densities on two cells of width 0.5
    q = np.array([0.25, 0.75]) / 0.5
    assert total_variation(p, q, 0.5) == pytest.approx(0.25, rel=1e-12)
    rng = np.random.default_rng(5)
    phi, psi = angles(rng, 5000)
    assert ramachandran_tv(phi, psi, phi, psi) == pytest.approx(0.0, abs=1e-12)
    # the same shape moved by π in φ shares no cell: TV 1; half of it moved: TV ½
    far = np.where(phi > 0, phi - np.pi, phi + np.pi)
    assert ramachandran_tv(phi, psi, far, psi) == pytest.approx(1.0, abs=0.01)
    half = np.concatenate([phi[:2500], far[2500:]])
    assert ramachandran_tv(phi, psi, half, psi) == pytest.approx(0.5, abs=0.02)
    # weights: the moved half weighted 0 leaves the first half, whose map is the whole's
    w = np.r_[np.ones(2500), np.zeros(2500)]
    assert ramachandran_tv(phi, psi, half, psi, w) < 0.15


def test_histograms_are_densities_on_the_grid_and_skip_nonfinite():
    rng = np.random.default_rng(3)
    phi, psi = angles(rng, 2000)
    phi[:10] = np.nan
    hist = ramachandran_histogram(phi, psi)
    assert hist.shape == (64, 64)
    assert hist.sum() * (2 * np.pi / 64) ** 2 == pytest.approx(1.0)


def test_reweighting_recovers_the_target_distribution():
    """Uniform proposal, von Mises target: importance weights turn a large KL into a small one."""
    rng = np.random.default_rng(4)
    target_phi = rng.vonmises(-1.5, 2.0, 200_000)
    proposal = rng.uniform(-np.pi, np.pi, 200_000)
    log_w = 2.0 * np.cos(proposal + 1.5)  # log p − log q up to a constant
    raw = kl_1d(target_phi, proposal, bins=60)
    reweighted = kl_1d(target_phi, proposal, normalised_weights(log_w), bins=60)
    assert raw > 0.3 and reweighted < 0.01
    assert delta_f(proposal, normalised_weights(log_w)) == pytest.approx(
        delta_f(target_phi), abs=0.05
    )


# ------------------------------------------------------------------------------- ΔF, chirality
def test_delta_f_known_populations():
    phi = np.array([1.0, -1.0, -2.0, -0.5, np.nan])
    assert delta_f(phi) == pytest.approx(math.log(3.0))
    assert delta_f(phi, np.array([3.0, 1.0, 1.0, 1.0, 9.0])) == pytest.approx(0.0)
    assert delta_f(np.array([-1.0, -2.0])) == math.inf


def test_chirality_of_a_mirror_image():
    rng = np.random.default_rng(5)
    xyz = rng.normal(size=(200, 22, 3))
    is_l = is_l_chirality(xyz)
    np.testing.assert_array_equal(is_l_chirality(xyz * np.array([-1.0, 1.0, 1.0])), ~is_l)


# ------------------------------------------------------------------------------ aggregates
def fake_ensemble(rng, n):
    phi, psi = angles(rng, n)
    u = rng.normal(3.0, 2.0, n)
    return u, phi, psi


def test_ensemble_metrics_of_a_model_equal_to_md():
    rng = np.random.default_rng(6)
    u, phi, psi = fake_ensemble(rng, 4000)
    reference = {"u": u, "phi": phi, "psi": psi}
    log_w = np.zeros(len(u))
    is_l, finite = np.ones(len(u), bool), np.ones(len(u), bool)
    m = ensemble_metrics(u, log_w, phi, psi, is_l, finite, reference, u.max(), log_w)
    assert m["energy_shift"] == 0 and m["reverse_ess"] == pytest.approx(1.0)
    assert m["forward_ess"] == pytest.approx(1.0)
    for key in ("kl_rama", "kl_rama_reweighted", "kl_phi", "kl_psi_reweighted",
                "kl_rama_matched", "kl_rama_reweighted_matched", "kl_phi_matched"):  # fmt: skip
        assert m[key] == pytest.approx(0.0, abs=1e-12), key
    assert m["delta_f"] == pytest.approx(m["delta_f_reweighted"]) and m["chirality_violations"] == 0
    assert {row[0] for row in ROWS} - {None} <= set(m) and m["n_matched"] == 2000


def test_ensemble_metrics_count_failed_and_nonfinite_samples():
    rng = np.random.default_rng(7)
    u, phi, psi = fake_ensemble(rng, 1000)
    reference = {"u": u.copy(), "phi": phi.copy(), "psi": psi.copy()}
    u[:5], phi[:3], psi[:3] = np.inf, np.nan, np.nan
    log_w = -u
    finite = np.ones(len(u), bool)
    finite[:3] = False
    is_l = finite.copy()  # the non-finite frames are not L, but are not counted as D either
    m = ensemble_metrics(u, log_w, phi, psi, is_l, finite, reference, 10.0)
    assert m["n_samples"] == 1000 and m["n_failed_energies"] == 5
    assert m["n_nonfinite_positions"] == 3 and m["chirality_violations"] == 0
    assert m["mean_u"] == math.inf and math.isfinite(m["energy_shift_finite"])
    low = u < 10.0
    assert m["energy_shift_low"] == pytest.approx(u[low].mean() - reference["u"].mean())
    assert math.isnan(m["forward_ess"])  # not given


def test_a_diverged_model_gets_nan_metrics_not_an_exception():
    rng = np.random.default_rng(10)
    u, phi, psi = fake_ensemble(rng, 500)
    reference = {"u": u, "phi": phi, "psi": psi}
    nan = np.full(100, np.nan)
    m = ensemble_metrics(np.full(100, np.inf), nan, nan, nan, np.zeros(100, bool),
                         np.zeros(100, bool), reference, 10.0)  # fmt: skip
    for key in ("kl_rama", "kl_rama_reweighted", "kl_phi", "kl_rama_matched", "delta_f",
                "kl_rama_reweighted_matched", "chirality_violations"):  # fmt: skip
        assert math.isnan(m[key]), key
    assert m["reverse_ess"] == 0.0 and m["low_energy_fraction"] == 0.0


def test_reference_floor_is_small_for_a_stationary_ensemble_and_reports_halves():
    rng = np.random.default_rng(8)
    u, phi, psi = fake_ensemble(rng, 100_000)
    ref = reference_metrics(u, phi, psi, np.ones(len(u), bool), u.max())
    assert ref["kl_rama_floor"] < 0.25 and ref["kl_phi_floor"] < 0.01
    assert len(ref["delta_f_halves"]) == 2 and ref["low_energy_fraction"] == pytest.approx(1 - 1e-5)


# ------------------------------------------------------------------------- figures, report
def test_figures_are_valid_pngs(tmp_path):
    import matplotlib.image

    rng = np.random.default_rng(9)
    u, phi, psi = fake_ensemble(rng, 3000)
    u_model = u + 2.0
    u_model[:4] = np.inf
    log_w = rng.normal(size=len(u))
    paths = [
        plot_energies(tmp_path / "e.png", {"MD": u, "model": u_model}, float(u.max())),
        plot_ramachandran(
            tmp_path / "r.png", [AngleSet("MD", phi, psi), AngleSet("m", phi, psi, log_w)]
        ),
        plot_free_energy_phi(
            tmp_path / "f.png", [AngleSet("MD", phi, psi), AngleSet("m", phi, psi, log_w)]
        ),
        plot_training(
            tmp_path / "t.png",
            {
                "run": {
                    "step": np.arange(10.0),
                    "nll": -np.arange(10.0),
                    "val_nll": np.where(np.arange(10) % 5 == 0, 1.0, np.nan),
                }
            },
        ),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert matplotlib.image.imread(path).shape[0] > 100
    assert not list(tmp_path.glob("*.tmp.png"))


def test_metrics_json_is_strict_json_and_report_has_the_table():
    reference = {"n": 10, "mean_u": 1.0, "kl_rama_floor": 0.5}
    models = {"p4inv": {"mean_u": math.inf, "reverse_ess": 3e-7, "kl_rama": math.nan}}
    text = metrics_json_text({"reference": reference, "models": models})

    def reject(token):
        raise ValueError(token)

    data = json.loads(text, parse_constant=reject)
    assert (
        data["models"]["p4inv"]["mean_u"] == "inf" and data["models"]["p4inv"]["kl_rama"] == "nan"
    )
    table = markdown_table(reference, models, 4.99)
    assert "| metric | MD (reference) | p4inv |" in table and "3.0e-07" in table
    assert "1.00 kT (5.0 kJ/mol)" in table  # energies in both units (docs/design.md §2)
    info = {"reference": "data/x", "split": "test", "temperature_K": 600.0,
            "kT_kJ_per_mol": 4.99, "u_train_max": 30.0, "runs": {"p4inv": "runs/p4inv"}}  # fmt: skip
    text = report_md_text(reference, models, info, ["energies.png"])
    assert "![energies](energies.png)" in text and table in text


# ------------------------------------------------------------------------- log Z sandwich
def gaussian_log_density(x, mean, sigma):
    d = x.shape[1]
    return -0.5 * np.sum(((x - mean) / sigma) ** 2, axis=1) - d * math.log(sigma * math.sqrt(
        2 * math.pi))  # fmt: skip


def gaussian_case(rng, n=200_000, mean=(0.3, -0.2), sigma=1.2):
    """q = N(0, I) exactly normalised; target exp(−u), u = |x − μ|²/(2σ²), Z = (2πσ²)^(d/2).
    Returns log w of q-samples, log w of target samples (the 'MD frames') and log Z."""
    mean = np.array(mean)
    d = len(mean)
    x_q = rng.normal(size=(n, d))
    x_p = mean + sigma * rng.normal(size=(n, d))

    def log_w(x):
        u = 0.5 * np.sum(((x - mean) / sigma) ** 2, axis=1)
        return -u - gaussian_log_density(x, 0.0, 1.0)

    return log_w(x_q), log_w(x_p), d / 2 * math.log(2 * math.pi * sigma**2)


def test_log_z_sandwich_recovers_a_known_normalisation():
    log_w, log_w_md, log_z = gaussian_case(np.random.default_rng(20))
    assert log_z_reverse(log_w) == pytest.approx(log_z, abs=0.02)
    assert log_z_forward(log_w_md) == pytest.approx(log_z, abs=0.02)


def test_log_z_of_an_unnormalised_q_moves_both_estimates_by_minus_c():
    log_w, log_w_md, _ = gaussian_case(np.random.default_rng(21), n=20_000)
    c = 3.7  # log q + c  =>  log w − c
    assert log_z_reverse(log_w - c) == pytest.approx(log_z_reverse(log_w) - c, abs=1e-9)
    assert log_z_forward(log_w_md - c) == pytest.approx(log_z_forward(log_w_md) - c, abs=1e-9)
    rng = np.random.default_rng(22)
    x = rng.normal(size=(1000, 1))
    u = 0.5 * x[:, 0] ** 2  # Z = sqrt(2π); with an exact q every log w equals log Z
    m = ensemble_metrics(u, -u - gaussian_log_density(x, 0, 1), x[:, 0], x[:, 0],
                         np.ones(1000, bool), np.ones(1000, bool),
                         {"u": u, "phi": x[:, 0], "psi": x[:, 0]}, 10.0,
                         -u - gaussian_log_density(x, 0, 1) - c)  # fmt: skip
    assert m["log_z_reverse"] == pytest.approx(0.5 * math.log(2 * math.pi))
    assert m["log_z_gap"] == pytest.approx(-c)  # only the MD side got the shift


def test_eubo_is_log_z_plus_the_forward_kl():
    """q = N(0, I), target N(μ, σ²I) unnormalised: EUBO = log Z + KL(p‖q) with
    KL = ½ Σ (σ² + μ² − 1 − ln σ²); the metrics' forward_kl recovers the KL alone."""
    mean, sigma = (0.3, -0.2), 1.2
    log_w, log_w_md, log_z = gaussian_case(np.random.default_rng(24), mean=mean, sigma=sigma)
    kl = 0.5 * sum(sigma**2 + m**2 - 1 - math.log(sigma**2) for m in mean)
    assert eubo(log_w_md) == pytest.approx(log_z + kl, abs=0.01)
    n = 20_000
    x = np.zeros((n, 1))
    m = ensemble_metrics(np.zeros(n), log_w[:n], x[:, 0], x[:, 0], np.ones(n, bool),
                         np.ones(n, bool), {"u": np.zeros(n), "phi": x[:, 0], "psi": x[:, 0]},
                         10.0, log_w_md[:n])  # fmt: skip
    assert m["eubo"] == pytest.approx(eubo(log_w_md[:n]))
    assert m["forward_kl"] == pytest.approx(kl, abs=0.03)
    # a frame the model gives no density bounds nothing; a NaN has no stand-in
    assert eubo(np.array([1.0, np.inf])) == np.inf
    assert math.isnan(eubo(np.array([1.0, np.nan]))) and math.isnan(eubo(np.array([])))
    assert math.isnan(eubo(np.array([1.0, -np.inf])))  # a failed energy is no perfect bound


def test_log_z_gap_is_clearly_negative_when_log_q_is_not_the_sampling_density():
    """Samples from p = N(0, 1) (Z = 1, u = x²/2 + ln √(2π)) but log q of N(0, 2²): reverse
    → ln ∫p²/q = ln(2/√1.75) = 0.413, forward → −ln ∫q = 0, gap −0.413."""
    rng = np.random.default_rng(23)
    x = rng.normal(size=(400_000, 1))
    u = 0.5 * x[:, 0] ** 2 + 0.5 * math.log(2 * math.pi)
    log_w = -u - gaussian_log_density(x, 0.0, 2.0)
    expected = math.log(2 / math.sqrt(1.75))
    assert log_z_reverse(log_w) == pytest.approx(expected, abs=0.02)
    assert log_z_forward(log_w) == pytest.approx(0.0, abs=0.02)
    assert log_z_forward(log_w) - log_z_reverse(log_w) < -0.35


def test_log_z_nonfinite_values():
    # failed samples (−inf, NaN) have weight 0 and stay in N
    assert log_z_reverse(np.array([0.0, -np.inf, np.nan, 0.0])) == pytest.approx(-math.log(2))
    assert log_z_reverse(np.array([0.0, np.inf])) == math.inf
    assert math.isnan(log_z_reverse(np.array([])))
    # an MD frame of zero model density has 1/w = 0 and stays in M
    assert log_z_forward(np.array([0.0, np.inf])) == pytest.approx(math.log(2))
    assert log_z_forward(np.array([0.0, -np.inf])) == -math.inf
    assert math.isnan(log_z_forward(np.array([0.0, np.nan])))  # no stand-in: not a silent 0
    assert math.isnan(forward_ess(np.array([0.0, np.nan])))
    assert forward_ess(np.array([0.0, -np.inf])) == 0.0


# ------------------------------------------------------------------------ clipped ESS
def test_reverse_ess_clipped_known_values():
    n = 20_000  # k = ceil(1e-4 · n) = 2: the two largest weights become the 2nd largest
    w = np.ones(n)
    w[5], w[9] = 100.0, 50.0
    clipped = w.copy()
    clipped[5] = 50.0
    kish = lambda v: v.sum() ** 2 / (v**2).sum() / len(v)  # noqa: E731
    assert reverse_ess_clipped(np.log(w) - 7.0) == pytest.approx(kish(clipped), rel=1e-12)
    assert reverse_ess(np.log(w)) == pytest.approx(kish(w), rel=1e-12)
    assert reverse_ess_clipped(np.log(w)) > reverse_ess(np.log(w))
    small = np.log(np.arange(1.0, 101.0))  # N ≤ 1e4: k = 1, nothing changes
    assert reverse_ess_clipped(small) == pytest.approx(reverse_ess(small), rel=1e-12)
    # failed samples stay in N (weight 0) and are never among the largest
    failed = np.concatenate([np.log(w[:10_000]), np.full(10_000, -np.inf)])
    part = w[:10_000].copy()
    part[5] = 50.0  # k = 2: the two largest (100, 50) become 50
    assert reverse_ess_clipped(failed) == pytest.approx(kish(part) / 2, rel=1e-12)
    assert reverse_ess_clipped(np.full(5, -np.inf)) == 0.0
    with pytest.raises(ValueError, match="fraction"):
        reverse_ess_clipped(small, fraction=0.0)


def test_high_energy_fraction_is_the_complement_of_the_low_energy_fraction():
    u = np.array([0.0, 1.0, 5.0, np.inf, np.nan])
    assert high_energy_fraction(u, 2.0) == pytest.approx(0.6)
    assert low_energy_fraction(u, 2.0) + high_energy_fraction(u, 2.0) == pytest.approx(1.0)


# ------------------------------------------------------------ correlated series, ΔF errors
def ar1(rng, n, rho):
    from scipy.signal import lfilter

    e = rng.normal(size=n)
    e[0] /= math.sqrt(1 - rho**2)  # start in the stationary distribution
    return lfilter([1.0], [1.0, -rho], e)


def two_state_chain(rng, n, a, b):
    """0 → 1 with probability a, 1 → 0 with probability b per step; stationary P(1) = a/(a+b),
    autocorrelation λ^t with λ = 1 − a − b."""
    r = rng.random(n)
    s = np.empty(n, dtype=bool)
    s[0] = rng.random() < a / (a + b)
    for i in range(1, n):
        s[i] = (r[i] >= b) if s[i - 1] else (r[i] < a)
    return s


def test_chi2_quantile_approximation():
    chi2 = pytest.importorskip("scipy.stats").chi2
    from analysis.timeseries import chi2_quantile_99

    for df in range(1, 40):
        assert chi2_quantile_99(df) == pytest.approx(chi2.ppf(0.99, df), rel=0.01)


def test_integrated_autocorrelation_time_of_ar1():
    rng = np.random.default_rng(30)
    for rho in (0.0, 0.5, 0.9):
        x = ar1(rng, 200_000, rho)
        tau = (1 + rho) / (1 - rho)
        assert integrated_autocorrelation_time(x) == pytest.approx(tau, rel=0.1), rho
    parts = [ar1(rng, 50_000, 0.8) for _ in range(4)]  # independent replicas share τ = 9
    assert integrated_autocorrelation_time(parts) == pytest.approx(9.0, rel=0.1)
    assert math.isnan(integrated_autocorrelation_time(np.ones(100)))  # no variance
    short = ar1(rng, 30, 0.99)  # too short to find a window, or flagged as unreliable
    assert not md_efficiency(short)["tau_phi_reliable"]
    assert md_efficiency(ar1(rng, 100_000, 0.5))["tau_phi_reliable"]


def test_block_standard_error_known_answers():
    rng = np.random.default_rng(31)
    x = rng.normal(size=2**16)
    b = block_standard_error(x)
    assert b.converged and b.se == pytest.approx(x.std(ddof=1) / math.sqrt(len(x)), rel=0.05)
    assert b.block_size <= 2
    rho, n = 0.9, 2**17
    y = ar1(rng, n, rho)
    expected = math.sqrt(1 / (1 - rho**2) * (1 + rho) / (1 - rho) / n)  # σ²τ/n
    b = block_standard_error(y)
    assert b.converged and b.se == pytest.approx(expected, rel=0.15) and b.block_size >= 32
    assert block_standard_error(np.full(100, 1.0)).se == 0.0
    assert math.isnan(block_standard_error(np.array([1.0])).se)
    with pytest.raises(ValueError, match="non-finite"):
        block_standard_error(np.array([1.0, np.nan]))


def test_md_statistics_of_a_two_state_markov_chain():
    a, b, n = 0.02, 0.05, 400_000
    s = two_state_chain(np.random.default_rng(32), n, a, b)
    phi = np.where(s, 1.0, -1.0)
    lam = 1 - a - b
    tau, p = (1 + lam) / (1 - lam), a / (a + b)
    assert basin_transitions([phi]) == pytest.approx(n * 2 * a * b / (a + b), rel=0.05)
    segments = np.array_split(np.arange(n), 4)
    eff = md_efficiency(phi, segments, ps_per_frame=0.2, seconds_per_frame=0.01)
    assert eff["tau_phi_frames"] == pytest.approx(tau, rel=0.1)
    assert eff["tau_phi_ps"] == pytest.approx(0.2 * eff["tau_phi_frames"])
    assert eff["independent_samples"] == pytest.approx(n / eff["tau_phi_frames"])
    assert eff["independent_samples_per_second"] == pytest.approx(
        1 / (eff["tau_phi_frames"] * 0.01)
    )
    assert eff["basin_transitions"] == sum(basin_transitions([phi[i]]) for i in segments)
    md = md_delta_f(phi, segments)
    expected_err = math.sqrt(p * (1 - p) * tau / n) / (p * (1 - p))  # δp / (p(1−p))
    assert md["delta_f"] == pytest.approx(-math.log(p / (1 - p)), abs=4 * expected_err)
    assert md["delta_f_err_block"] == pytest.approx(expected_err, rel=0.2)
    assert md["n_replicas"] == 4 and md["blocking_converged"]
    assert md["delta_f_err"] == max(md["delta_f_err_block"], md["delta_f_err_replicas"])


def test_md_delta_f_sees_replicas_stuck_in_different_basins():
    phi = np.concatenate([np.full(1000, 1.0), np.full(1000, -1.0)])
    md = md_delta_f(phi, [np.arange(1000), np.arange(1000, 2000)])
    assert md["delta_f"] == pytest.approx(0.0) and md["delta_f_err_block"] == 0.0
    # p_r = 1, 0: δp = std/√2 = 0.5, δΔF = 0.5 / (0.5 · 0.5) = 2
    assert md["delta_f_err_replicas"] == pytest.approx(2.0) and md["delta_f_err"] == 2.0
    assert md["delta_f_replicas"] == [-math.inf, math.inf]
    one = md_delta_f(np.full(10, -1.0))
    assert one["delta_f"] == math.inf and math.isnan(one["delta_f_err"])


def test_delta_f_with_error_known_answers():
    n = 1000
    phi = np.where(np.arange(n) < 250, 1.0, -1.0)  # p = 1/4 exactly
    value, err = delta_f_with_error(phi)
    assert value == pytest.approx(math.log(3.0))
    assert err == pytest.approx(1 / math.sqrt(n * 0.25 * 0.75))  # binomial δp / (p(1−p))
    # doubling the weight of every φ>0 sample: p = 2/5; δp² = Σ w̄²(I − p)²
    w = np.where(phi > 0, 2.0, 1.0)
    value, err = delta_f_with_error(phi, w)
    wn = w / w.sum()
    dp = math.sqrt(np.sum(wn**2 * ((phi > 0) - 0.4) ** 2))
    assert value == pytest.approx(math.log(1.5)) and err == pytest.approx(dp / 0.24)
    assert delta_f_with_error(np.array([1.0, np.nan]))[0] == -math.inf
    assert all(math.isnan(v) for v in delta_f_with_error(np.full(3, np.nan)))


def test_delta_f_error_of_reweighted_samples_matches_the_spread_of_repeats():
    """Uniform proposal, von Mises target: the reported error is the std of ΔF over repeats."""
    rng = np.random.default_rng(33)
    values, errors = [], []
    for _ in range(300):
        x = rng.uniform(-np.pi, np.pi, 2000)
        value, err = delta_f_with_error(x, normalised_weights(1.5 * np.cos(x + 1.0)))
        values.append(value)
        errors.append(err)
    assert np.std(values) == pytest.approx(np.mean(errors), rel=0.15)


def test_bg_value_known_answer():
    v = bg_value(0.5, 1000, 10.0, 5.0)
    assert v["bg_effective_samples_per_second"] == 50.0 and v["bg_value"] == 10.0
    assert math.isnan(bg_value(0.5, 1000, None, 5.0)["bg_value"])
    assert math.isnan(bg_value(0.5, 1000, 10.0, math.nan)["bg_value"])


def test_new_keys_in_ensemble_and_reference_metrics():
    rng = np.random.default_rng(34)
    u, phi, psi = fake_ensemble(rng, 2000)
    ref = reference_metrics(u, phi, psi, np.ones(len(u), bool), 5.0,
                            [np.arange(1000), np.arange(1000, 2000)], 0.2, 0.01)  # fmt: skip
    for key in ("delta_f_err", "delta_f_err_block", "delta_f_err_replicas", "tau_phi_frames",
                "tau_phi_ps", "basin_transitions", "independent_samples",
                "independent_samples_per_second", "high_energy_fraction", "d_form_fraction"):  # fmt: skip
        assert key in ref, key
    assert ref["low_energy_fraction"] + ref["high_energy_fraction"] == pytest.approx(1.0)
    # frames that never change φ basin: no τ and no rate, said so instead of a number
    assert math.isnan(ref["tau_phi_frames"]) and ref["tau_phi_note"].startswith("not measurable")
    log_w = rng.normal(size=len(u))
    m = ensemble_metrics(u, log_w, phi, psi, np.ones(len(u), bool), np.ones(len(u), bool),
                         {"u": u, "phi": phi, "psi": psi}, 5.0, log_w, 4.0,
                         ref["independent_samples_per_second"])  # fmt: skip
    assert m["log_z_gap"] == pytest.approx(m["log_z_forward"] - m["log_z_reverse"])
    assert m["reverse_ess_clipped"] >= m["reverse_ess"] and m["forward_n_nonfinite"] == 0
    assert math.isnan(m["bg_value"])  # without MD's rate there is no ratio
    assert m["high_energy_fraction"] == pytest.approx(np.mean(u >= 5.0))
    assert m["d_form_fraction"] == m["chirality_violations"] == 0.0
    assert math.isfinite(m["delta_f_err"]) and math.isfinite(m["delta_f_reweighted_err"])
    assert {row[1] for row in ROWS} - {None} <= set(ref)
    table = markdown_table(ref, {"model": m}, 4.99)
    assert "reverse ESS (clipped top 1e-4)" in table
    # ... and no ΔF from them either: the table says why (the value stays in the metrics)
    assert ref["delta_f_note"].startswith("not measurable here") and ref["delta_f_note"] in table
    assert f"| ΔF φ>0 vs φ<0, raw | {ref['delta_f_note']} |" in table  # the MD cell
    # equal weights: every φ > 0 sample counts, enough for a reweighted ΔF with its error
    even = ensemble_metrics(u, np.zeros(len(u)), phi, psi, np.ones(len(u), bool),
                            np.ones(len(u), bool), {"u": u, "phi": phi, "psi": psi}, 5.0, log_w,
                            4.0, ref["independent_samples_per_second"])  # fmt: skip
    assert even["delta_f_reweighted_note"] is None
    assert even["effective_samples_phi_positive"] == pytest.approx(np.sum(phi > 0))
    shown = f"{even['delta_f_reweighted']:.2f} ± {even['delta_f_reweighted_err']:.2f} kT"
    assert shown in markdown_table(ref, {"model": even}, 4.99)
    # a reweighted ΔF resting on a handful of φ > 0 samples is not printed as a number
    few = np.where(phi > 0, -30.0, log_w)
    few[np.flatnonzero(phi > 0)[:3]] = 0.0
    m_few = ensemble_metrics(u, few, phi, psi, np.ones(len(u), bool), np.ones(len(u), bool),
                             {"u": u, "phi": phi, "psi": psi}, 5.0, log_w, 4.0,
                             ref["independent_samples_per_second"])  # fmt: skip
    assert m_few["effective_samples_phi_positive"] < 10
    assert m_few["delta_f_reweighted_note"].startswith("not measurable here: ")
    assert m_few["delta_f_reweighted_note"] in markdown_table(ref, {"model": m_few}, 4.99)


def test_training_figure_with_ess_and_per_basin_columns(tmp_path):
    import matplotlib.image

    step = np.arange(20.0)
    val = np.where(np.arange(20) % 5 == 0, 1.0, np.nan)
    runs = {
        "new": {"step": step, "nll": -step, "val_nll": val, "val_ess": val * 1e-3,
                "val_ess_clipped": val * 2e-3, "val_nll_phi_pos": val + 3,
                "val_nll_phi_neg": val - 1},
        "old": {"step": step, "nll": -step, "val_nll": val},  # an older run: no such columns
        "zero": {"step": step, "nll": -step, "val_nll": val, "val_ess": val * 0.0},
    }  # fmt: skip
    path = plot_training(tmp_path / "t.png", runs)
    wide = matplotlib.image.imread(path).shape[1]
    narrow = matplotlib.image.imread(plot_training(tmp_path / "o.png", {"old": runs["old"]}))
    assert wide > 1.5 * narrow.shape[1]  # the ESS panel is there only with ESS columns
