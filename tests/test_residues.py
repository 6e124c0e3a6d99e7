"""Per-residue metrics and the TICA joint view (analysis.residues) against known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.histograms import delta_f_with_error, ramachandran_kl, ramachandran_tv
from analysis.residues import fit_tica, histogram_kl_2d, residue_metrics, tica_features
from analysis.timeseries import md_delta_f


def ar1(n: int, rho: float, rng: np.random.Generator) -> np.ndarray:
    x = np.zeros(n)
    noise = rng.standard_normal(n) * math.sqrt(1 - rho**2)
    for t in range(1, n):
        x[t] = rho * x[t - 1] + noise[t]
    return x


def test_tica_finds_the_slow_process_and_its_autocorrelation():
    """Two AR(1) processes (autocorrelation 0.95 and 0.3 per frame) mixed by a linear map:
    TICA's first eigenvalue is 0.95^lag, the second 0.3^lag, and its first component is the
    slow process up to sign and scale."""
    rng = np.random.default_rng(0)
    slow, fast = ar1(200_000, 0.95, rng), ar1(200_000, 0.3, rng)
    mix = np.array([[1.0, 0.6, 0.2], [0.5, -1.0, 0.3]])
    x = np.stack([slow, fast], 1) @ mix + 3.0
    halves = [np.arange(100_000), np.arange(100_000, 200_000)]
    model = fit_tica(x, halves, lag=2)
    np.testing.assert_allclose(model.eigenvalues, [0.95**2, 0.3**2], atol=0.01)
    projected = model.project(x)
    assert abs(np.corrcoef(projected[:, 0], slow)[0, 1]) > 0.999
    assert abs(np.corrcoef(projected[:, 1], fast)[0, 1]) > 0.99
    with pytest.raises(ValueError, match="longer than the lag"):
        fit_tica(x[:10], None, lag=20)


def test_tica_features_are_cos_and_sin_of_every_angle():
    phi, psi = np.array([[0.0, math.pi / 2]]), np.array([[math.pi, -math.pi / 2]])
    np.testing.assert_allclose(tica_features(phi, psi), [[1, 0, 0, 1, -1, 0, 0, -1]], atol=1e-15)


def test_histogram_kl_2d_known_answers():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((50_000, 2))
    assert histogram_kl_2d(a, a) == pytest.approx(0.0, abs=1e-12)
    # the same points, half of their weight moved outside the grid: q is half of p in every
    # cell, so KL = Σ p log 2 · cell = log 2
    outside = np.concatenate([a, a + 100.0])
    assert histogram_kl_2d(a, outside) == pytest.approx(math.log(2), rel=1e-7)  # ε
    # weights that undo a duplication give back KL 0
    doubled = np.concatenate([a, a[:25_000]])
    w = np.concatenate([np.full(25_000, 0.5), np.ones(25_000), np.full(25_000, 0.5)])
    assert histogram_kl_2d(a, doubled, w) == pytest.approx(0.0, abs=1e-12)
    assert histogram_kl_2d(a, a + 1.0) > 0.3
    with pytest.raises(ValueError, match="no point"):
        histogram_kl_2d(a, a + 100.0)


def test_residue_metrics_are_the_single_residue_metrics_of_each_column():
    rng = np.random.default_rng(2)
    n, m = 4000, 3000
    ref_phi = np.stack([rng.uniform(-math.pi, math.pi, n), rng.vonmises(-1.2, 2.0, n)], 1)
    ref_psi = np.stack([rng.vonmises(2.5, 3.0, n), rng.vonmises(-0.5, 2.0, n)], 1)
    phi = np.stack([rng.uniform(-math.pi, math.pi, m), rng.vonmises(-1.0, 2.0, m)], 1)
    psi = np.stack([rng.vonmises(2.5, 3.0, m), rng.vonmises(-0.5, 1.0, m)], 1)
    log_w = rng.normal(0.0, 0.3, m)
    segments = [np.arange(2000), np.arange(2000, 4000)]
    out = residue_metrics(["ALA2", "ALA3"], ref_phi, ref_psi, segments,
                          {"bg": (phi, psi, log_w)})  # fmt: skip
    assert list(out) == ["ALA2", "ALA3"]
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    for r, label in enumerate(out):
        ref, model = out[label]["reference"], out[label]["models"]["bg"]
        assert ref["delta_f"] == md_delta_f(ref_phi[:, r], segments)["delta_f"]
        floor = ramachandran_kl(ref_phi[:2000, r], ref_psi[:2000, r], ref_phi[2000:, r],
                                ref_psi[2000:, r])  # fmt: skip
        assert ref["kl_rama_floor"] == pytest.approx(floor, rel=1e-12)
        assert model["kl_rama"] == pytest.approx(
            ramachandran_kl(ref_phi[:, r], ref_psi[:, r], phi[:, r], psi[:, r]), rel=1e-12
        )
        assert model["kl_rama_reweighted"] == pytest.approx(
            ramachandran_kl(ref_phi[:, r], ref_psi[:, r], phi[:, r], psi[:, r], w), rel=1e-9
        )
        assert ref["tv_rama_floor"] == pytest.approx(ramachandran_tv(
            ref_phi[:2000, r], ref_psi[:2000, r], ref_phi[2000:, r], ref_psi[2000:, r]),
            rel=1e-12)  # fmt: skip
        assert model["tv_rama_reweighted"] == pytest.approx(
            ramachandran_tv(ref_phi[:, r], ref_psi[:, r], phi[:, r], psi[:, r], w), rel=1e-9
        )
        value, err = delta_f_with_error(phi[:, r], w)
        assert model["delta_f_reweighted"] == pytest.approx(value, rel=1e-9)
        assert model["delta_f_reweighted_err"] == pytest.approx(err, rel=1e-9)
    # uniform φ: about half the samples on each side, so ΔF is measurable and near 0
    assert out["ALA2"]["models"]["bg"]["delta_f_reweighted_note"] is None
    assert abs(out["ALA2"]["models"]["bg"]["delta_f_reweighted"]) < 0.2
