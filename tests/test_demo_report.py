"""analysis.demo and analysis.demo_plots: the demo's numbers on synthetic data with known answers,
the "not measurable here" rules, the KL floor at matched size, the report text and every figure.

The φ density is two basins with a known ΔF(φ>0 vs φ<0); MD is a two-state Markov chain between
them (few or many transitions), the BG a weighted sample from a known proposal.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from analysis.demo import (
    MIN_BASIN_ESS,
    MIN_TRANSITIONS,
    BGSamples,
    MDRun,
    Measurement,
    Reference,
    basin_ess,
    bg_delta_f,
    committed_transitions,
    demo_metrics,
    demo_report_md,
    md_delta_f_measurement,
    md_tau_phi,
)
from analysis.demo_plots import (
    demo_panels,
    free_energy_phi_band,
    plot_energy_histograms,
    plot_free_energy_phi_bands,
    plot_ramachandran_compare,
    plot_training_curve,
    validation_trend,
)
from analysis.report import metrics_json_text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NEG, POS = (-1.5, 0.3), (1.0, 0.2)  # φ basins: centre, width (rad); ψ around 2.5 and 0.5
DF = 2.0  # kT: P(φ>0) = 1 / (1 + e^2) ≈ 0.119


def p_pos(df: float = DF) -> float:
    return 1.0 / (1.0 + math.exp(df))


def basin_angles(rng: np.random.Generator, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """φ, ψ (radians) for a boolean array of basin labels."""
    n = positive.size
    phi = np.where(positive, rng.normal(POS[0], POS[1], n), rng.normal(NEG[0], NEG[1], n))
    psi = np.where(positive, rng.normal(0.5, 0.4, n), rng.normal(2.5, 0.4, n))
    return phi, psi


def two_state_chain(rng: np.random.Generator, n: int, k_out: float, start_pos: bool = False):
    """Labels of a two-state Markov chain with stationary P(pos) = p_pos(): leaves φ>0 with
    probability k_out per frame and enters it with k_out·p/(1−p)."""
    p = p_pos()
    k_in = k_out * p / (1 - p)
    u = rng.random(n)
    state = np.empty(n, dtype=bool)
    s = start_pos
    for i in range(n):
        state[i] = s
        if u[i] < (k_out if s else k_in):
            s = not s
    return state


def md_run(rng, segments: int, frames: int, k_out: float, dt_ps: float = 1.0) -> MDRun:
    phis, psis, us = [], [], []
    for _ in range(segments):
        labels = two_state_chain(rng, frames, k_out)
        phi, psi = basin_angles(rng, labels)
        phis.append(phi)
        psis.append(psi)
        us.append(rng.normal(-30.0, 4.0, frames))
    return MDRun(phis, psis, us, dt_ps=dt_ps, cpu_seconds=900.0)


def reference(rng, n: int = 20_000) -> Reference:
    """Independent draws from the target, as two segments (their halves give the floor)."""
    phi, psi = basin_angles(rng, rng.random(n) < p_pos())
    return Reference([phi[: n // 2], phi[n // 2 :]], [psi[: n // 2], psi[n // 2 :]], DF, 0.05,
                     "synthetic: exact two-basin density", seconds=60.0)  # fmt: skip


def bg_samples(rng, n: int = 20_000, q_pos: float = 0.5) -> BGSamples:
    """Draws from a proposal with P(φ>0) = q_pos and the target's basin shapes: the weight of a
    sample is P_target(basin) / q(basin), so reweighting must recover ΔF."""
    labels = rng.random(n) < q_pos
    phi, psi = basin_angles(rng, labels)
    log_w = np.where(labels, math.log(p_pos() / q_pos), math.log((1 - p_pos()) / (1 - q_pos)))
    u = rng.normal(-30.0, 4.0, n)
    u[:5] = np.inf  # failed energies stay with weight 0
    log_w[:5] = -np.inf
    return BGSamples(phi, psi, u, log_w, cpu_seconds=900.0)


def test_committed_transitions_ignore_recrossings_and_wraps():
    phi = np.array([-1.5, 0.1, -0.1, 0.2, 1.0, 0.3, -0.2, 1.1, -1.4, 3.1, -3.1, 3.0, -1.5])
    # -1.5 → (0.1, −0.1, 0.2 near 0: no core) → 1.0 in; 0.3 → −0.2 → 1.1 stays; −1.4 out; the
    # wraps at ±π (3.1, −3.1, 3.0) are no core either
    assert committed_transitions([phi]) == (1, 1)
    assert committed_transitions([phi[:5], phi[5:]]) == (1, 1)  # a segment's start is no move
    assert committed_transitions([np.array([np.nan, -1.0, np.nan, 1.0])]) == (1, 0)


def test_md_delta_f_measured_with_many_transitions():
    rng = np.random.default_rng(0)
    md = md_run(rng, segments=2, frames=60_000, k_out=0.02)
    into, out = committed_transitions(md.phi)
    assert min(into, out) >= 100
    m = md_delta_f_measurement(md)
    assert m.measured and m.err is not None and 0 < m.err < 0.3
    assert abs(m.value - DF) < 4 * m.err
    tau = md_tau_phi(md)  # two-state chain: τ = (1+ρ)/(1−ρ), ρ = 1 − k_in − k_out
    rho = 1 - 0.02 / (1 - p_pos())
    # Sokal's window cuts the tail: τ comes out 10–25 % low at this length
    assert tau.measured and tau.value == pytest.approx((1 + rho) / (1 - rho), rel=0.35)


def test_md_delta_f_not_measurable_with_few_or_no_transitions():
    rng = np.random.default_rng(1)
    md = md_run(rng, segments=2, frames=20_000, k_out=0.0005)
    into, out = committed_transitions(md.phi)
    assert 0 < min(into, out) < MIN_TRANSITIONS
    m = md_delta_f_measurement(md)
    assert m.value is None and m.note.startswith("not measurable here:")
    assert f"{into} transition" in m.note and "40 ns" in m.note
    assert not md_tau_phi(md).measured

    stuck = MDRun([rng.normal(-1.5, 0.3, 5000)] * 2, [np.zeros(5000)] * 2, [np.zeros(5000)] * 2,
                  dt_ps=2.0)  # fmt: skip
    m = md_delta_f_measurement(stuck)
    assert m.value is None and "no transition into φ > 0 in 20 ns" in m.note
    assert "< 0.15 per ns" in m.note  # rule of three: −ln 0.05 / 20 ns
    assert "not ΔF" in m.note
    tau = md_tau_phi(stuck)
    assert tau.note == "not measurable here: no transition into φ > 0 in 20 ns of MD"
    assert md_delta_f_measurement(MDRun([], [], [], dt_ps=1.0)).note.endswith("no MD frames")


def test_bg_delta_f_recovered_from_weights():
    rng = np.random.default_rng(2)
    bg = bg_samples(rng)
    m = bg_delta_f(bg)
    assert m.measured and 0 < m.err < 0.1
    assert abs(m.value - DF) < 4 * m.err


def test_bg_delta_f_not_measurable_with_few_effective_samples():
    rng = np.random.default_rng(3)
    bg = bg_samples(rng, n=4000, q_pos=0.0005)  # about 2 samples with φ > 0
    pos, neg = basin_ess(bg.phi, np.exp(np.where(np.isfinite(bg.log_w), bg.log_w, -np.inf)))
    assert pos < MIN_BASIN_ESS < neg
    m = bg_delta_f(bg)
    assert m.value is None and "effective samples in the φ > 0 basin" in m.note
    none = BGSamples(bg.phi, bg.psi, bg.u, np.full(bg.phi.size, -np.inf))
    assert "no BG sample has a finite weight" in bg_delta_f(none).note


def test_basin_ess_counts_kish_per_basin():
    phi = np.array([1.0, 1.0, -1.0, -1.0, -1.0, np.nan])
    w = np.array([1.0, 3.0, 1.0, 1.0, 1.0, 5.0])
    pos, neg = basin_ess(phi, w)
    assert pos == pytest.approx(16 / 10) and neg == pytest.approx(3.0)


def test_measurement_text():
    assert Measurement(3.812, 0.091).text(unit="kT") == "3.81 ± 0.09 kT"
    assert Measurement(0.5).text("{:.1%}") == "50.0%"
    assert Measurement.missing("why").text() == "not measurable here: why"
    assert Measurement(math.nan).measured is False


def test_demo_metrics_good_bg_and_stuck_md():
    rng = np.random.default_rng(4)
    ref = reference(rng)
    bg = bg_samples(rng)
    md = MDRun([rng.normal(-1.5, 0.3, 8000)], [rng.normal(2.5, 0.4, 8000)],
               [rng.normal(-30, 4, 8000)], dt_ps=1.0, cpu_seconds=900.0)  # fmt: skip
    m = demo_metrics(bg, md, ref)
    json.loads(metrics_json_text(m))  # JSON-ready
    floor = m["reference"]["kl_rama_floor"]["value"]
    assert floor > 0 and m["reference"]["n_half"] == 10_000
    # matched: the BG's first n/2 samples, MD's 8,000 frames (fewer than n/2: all of them)
    assert m["bg"]["n_matched"] == 10_000 and m["md"]["n_matched"] == 8000
    assert m["bg"]["kl_rama_over_floor"]["value"] < 2.0
    assert m["md"]["kl_rama_over_floor"]["value"] > 10  # MD misses the φ > 0 basin
    assert m["md"]["frames_phi_positive"] == 0 and m["md"]["delta_f"]["value"] is None
    assert m["md"]["delta_f_minus_reference"]["value"] is None
    assert abs(m["bg"]["delta_f"]["value"] - DF) < 4 * m["bg"]["delta_f"]["err"]
    assert m["bg"]["n_failed_energies"] == 5
    checks = {c["check"]: c for c in m["checks"]}
    assert all(c["passed"] for c in checks.values()) and m["all_checks_passed"]
    assert checks["reverse ESS ≥ 10%"]["threshold"] == 0.10
    assert checks["|ΔF − reference| ≤ 0.3 kT"]["value"] >= 0
    assert checks["reverse ESS ≥ 10%"]["shown"].endswith("%")
    assert checks["Ramachandran KL ≤ 2 × floor"]["shown"].endswith("× floor")


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="segment lengths"):
        MDRun([np.zeros(3)], [np.zeros(2)], [np.zeros(3)], dt_ps=1.0)
    with pytest.raises(ValueError, match="dt_ps"):
        MDRun([np.zeros(3)], [np.zeros(3)], [np.zeros(3)], dt_ps=0.0)
    with pytest.raises(ValueError, match="one length"):
        BGSamples(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(2))


def test_demo_metrics_bad_bg_fails_checks_with_reasons():
    rng = np.random.default_rng(5)
    ref = reference(rng)
    n = 20_000
    phi, psi = basin_angles(rng, np.zeros(n, dtype=bool))  # never visits φ > 0
    log_w = rng.normal(0, 4.0, n)  # very uneven weights: small ESS
    bg = BGSamples(phi, psi, np.zeros(n), log_w)
    md = md_run(rng, segments=1, frames=30_000, k_out=0.02)  # more frames than n/2: thinned
    m = demo_metrics(bg, md, ref)
    assert m["md"]["n_matched"] == 10_000
    checks = m["checks"]
    assert [c["passed"] for c in checks] == [False, False, False]
    assert checks[1]["value"] is None and "BG ΔF is not measurable" in checks[1]["note"]
    assert m["md"]["delta_f"]["value"] is not None  # this MD crosses often enough


def test_kl_floor_not_measurable_without_reference_frames():
    rng = np.random.default_rng(6)
    ref = Reference([np.array([-1.0, 1.0])], [np.zeros(2)], DF, 0.1, "two frames")
    m = demo_metrics(bg_samples(rng, n=2000), md_run(rng, 1, 500, 0.02), ref)
    assert m["reference"]["kl_rama_floor"]["value"] is None
    assert m["bg"]["kl_rama_over_floor"]["value"] is None
    assert not m["checks"][2]["passed"]


def test_report_text():
    rng = np.random.default_rng(7)
    md = md_run(rng, segments=2, frames=3000, k_out=0.0)
    m = demo_metrics(bg_samples(rng), md, reference(rng))
    trend = validation_trend({"step": np.arange(4.0), "val_nll": np.array([3.0, 2.0, 2.5, 9.0]),
                              "phase": np.array(["nll", "nll", "nll", "anneal"])})  # fmt: skip
    assert trend == {"min": 2.0, "step_min": 1.0, "last": 2.5, "step_last": 2.0, "rise": 0.5}
    text = demo_report_md(m, {"Ramachandran maps": "ramachandran.png"},
                          {"temperature_K": 300, "kT_kJ_per_mol": 2.494, "command": "make demo",
                           "training": trend, "notes": ["synthetic"]})  # fmt: skip
    assert "| | BG | MD, same CPU seconds | reference |" in text
    assert "not measurable here: no transition into φ > 0 in 6 ns" in text
    assert "synthetic: exact two-basin density" in text
    assert "✓ reverse ESS ≥ 10%: " in text and "![Ramachandran maps](ramachandran.png)" in text
    assert "docs/design.md §5" in text and "> Note: synthetic" in text
    # no figure for a quantity that is not measurable
    md_row = next(line for line in text.splitlines() if line.startswith("| ΔF − reference"))
    assert md_row.split(" | ")[2] == "–"


def test_free_energy_band_from_batches():
    rng = np.random.default_rng(8)
    phi, _ = basin_angles(rng, rng.random(50_000) < p_pos())
    centres, free, low, high = free_energy_phi_band(phi, bins=60, batches=10)
    assert centres.shape == free.shape == (60,) and np.nanmin(free) == 0
    ok = np.isfinite(free)
    assert np.all(low[ok] <= free[ok]) and np.all(high[ok] >= free[ok])
    # the basin minima differ by about ln(p_neg σ_pos / (p_pos σ_neg)) = DF − ln(1.5)
    gap = np.nanmin(free[centres > 0]) - np.nanmin(free[centres < 0])
    assert gap == pytest.approx(DF - math.log(NEG[1] / POS[1]), abs=0.3)


def test_every_plot_writes_a_png(tmp_path):
    rng = np.random.default_rng(9)
    ref, bg = reference(rng, 4000), bg_samples(rng, 4000)
    md = MDRun([rng.normal(-1.5, 0.3, 2000)], [rng.normal(2.5, 0.4, 2000)],
               [rng.normal(-30, 4, 2000)], dt_ps=1.0)  # fmt: skip
    m = demo_metrics(bg, md, ref)
    steps = np.arange(0, 3000, 100.0)
    phase = np.where(steps < 1500, "nll", np.where(steps < 2000, "mixed", "anneal"))
    temps = np.where(phase == "anneal", 600 * (0.5 ** ((steps - 1900) // 200 / 5)), np.nan)
    training = {"step": steps, "nll": 50 - steps / 100, "val_nll": 45 - steps / 200,
                "val_ess": np.linspace(0.001, 0.4, steps.size), "phase": phase,
                "anneal_temperature": temps}  # fmt: skip
    paths = [
        plot_ramachandran_compare(tmp_path / "rama.png", demo_panels(bg, md, ref)),
        plot_free_energy_phi_bands(tmp_path / "fphi.png", bg, md, ref, m),
        plot_energy_histograms(tmp_path / "energies.png", bg, md),
        plot_training_curve(tmp_path / "training.png", training),
        plot_training_curve(tmp_path / "training_min.png",
                            {"step": steps, "nll": 50 - steps / 100, "val_nll": steps * np.nan}),
    ]  # fmt: skip
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC, path
