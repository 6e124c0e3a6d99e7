"""analysis/: every DESIGN.md §5 metric on cases with known answers, figures, report files."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from analysis.geometry import is_l_chirality
from analysis.metrics import (
    delta_f,
    ensemble_metrics,
    forward_ess,
    forward_weight_diagnostics,
    kl_1d,
    kl_divergence,
    logsumexp,
    low_energy_fraction,
    mean_energy_shift,
    normalised_weights,
    ramachandran_histogram,
    ramachandran_kl,
    reference_metrics,
    reverse_ess,
)
from analysis.plots import (
    AngleSet,
    plot_energies,
    plot_free_energy_phi,
    plot_ramachandran,
    plot_training,
)
from analysis.report import ROWS, markdown_table, write_metrics_json, write_report_md

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def angles(rng, n, centre=(-1.5, 2.5), scale=0.6):
    """φ/ψ around a centre, wrapped to [−π, π)."""
    wrap = lambda a: (a + np.pi) % (2 * np.pi) - np.pi  # noqa: E731
    return wrap(rng.normal(centre[0], scale, n)), wrap(rng.normal(centre[1], scale, n))


def test_analysis_never_imports_torch():
    code = ("import sys, analysis.geometry, analysis.metrics, analysis.plots, analysis.report; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)


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
    assert {row[0] for row in ROWS} <= set(m) and m["n_matched"] == 2000


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


def test_metrics_json_is_strict_json_and_report_has_the_table(tmp_path):
    reference = {"n": 10, "mean_u": 1.0, "kl_rama_floor": 0.5}
    models = {"p4inv": {"mean_u": math.inf, "reverse_ess": 3e-7, "kl_rama": math.nan}}
    path = write_metrics_json(tmp_path / "metrics.json", {"reference": reference,
                                                          "models": models})  # fmt: skip

    def reject(token):
        raise ValueError(token)

    data = json.loads(path.read_text(), parse_constant=reject)
    assert (
        data["models"]["p4inv"]["mean_u"] == "inf" and data["models"]["p4inv"]["kl_rama"] == "nan"
    )
    table = markdown_table(reference, models, 4.99)
    assert "| metric | MD (reference) | p4inv |" in table and "3.0e-07" in table
    assert "1.00 kT (5.0 kJ/mol)" in table  # energies in both units (DESIGN.md §2)
    info = {"reference": "data/x", "split": "test", "temperature_K": 600.0,
            "kT_kJ_per_mol": 4.99, "u_train_max": 30.0, "runs": {"p4inv": "runs/p4inv"}}  # fmt: skip
    report = write_report_md(tmp_path / "report.md", reference, models, info, ["energies.png"])
    text = report.read_text()
    assert "![energies](energies.png)" in text and table in text
