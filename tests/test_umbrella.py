"""python -m p4bg.umbrella: the MBAR estimator against an exactly known free energy, the
restraint against its numpy twin, and a short run recorded in the dataset."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from p4bg.md.estimators import bias_energy, umbrella_delta_f
from p4bg.umbrella import main
from p4bg.units import R


def _sample_windows(free_energy, centers, k, temperature, n, rng):
    """Exact samples of each window's biased density exp(−β(F(φ) + bias)) on a fine grid."""
    grid = np.linspace(-np.pi, np.pi, 20_000, endpoint=False)
    beta = 1 / (R * temperature)
    out = []
    for c in centers:
        log_p = -beta * (free_energy(grid) + bias_energy(np.stack([grid, grid], 1), c, k))
        p = np.exp(log_p - log_p.max())
        phi = rng.choice(grid, size=n, p=p / p.sum()) + rng.uniform(0, 2 * np.pi / 20_000, n)
        out.append(np.stack([phi, np.zeros(n)], 1))
    return out, grid


@pytest.mark.parametrize("temperature", [300.0, 600.0])
def test_umbrella_estimator_recovers_a_known_free_energy(temperature):
    rng = np.random.default_rng(0)

    def free_energy(phi):  # kJ/mol: a deep φ<0 well, a shallow φ>0 one, barriers between
        return 8.0 * np.cos(phi) + 6.0 * np.cos(2 * phi) - 5.0 * np.sin(phi)

    centers = np.stack([np.linspace(-np.pi, np.pi, 24, endpoint=False), np.zeros(24)], 1)
    k = np.array([150.0, 0.0])
    windows, grid = _sample_windows(free_energy, centers, k, temperature, 3000, rng)
    weight = np.exp(-free_energy(grid) / (R * temperature))
    exact = math.log(weight[grid <= 0].sum() / weight[grid > 0].sum())
    result = umbrella_delta_f(windows, centers, k, temperature)
    assert abs(result["delta_f"] - exact) < 4 * result["delta_f_err"] + 0.01
    assert 0 < result["delta_f_err"] < 0.1
    assert all(abs(h - exact) < 0.2 for h in result["delta_f_halves"])


def test_bias_is_periodic_and_sums_the_restrained_angles():
    k = np.array([100.0, 40.0])
    c = np.array([3.0, 0.0])
    a = np.array([[-3.0, 0.5], [3.0, 0.0]])
    d = 2 * np.pi - 6.0  # -3 and 3 are 0.28 rad apart across ±π
    np.testing.assert_allclose(bias_energy(a, c, k), [0.5 * 100 * d**2 + 0.5 * 40 * 0.25, 0.0])


def test_umbrella_run_records_its_estimate_in_the_dataset(data, tmp_path):
    import shutil

    dataset = tmp_path / "ds"
    shutil.copytree(data, dataset)
    args = ["--windows", "4", "--psi-windows", "2", "--ns", "0.004", "--save-every-ps", "0.1",
            "--equilibration-ps", "0.5", "--platform", "Reference", "--no-progress"]  # fmt: skip
    main([str(dataset), *args])
    meta = json.loads((dataset / "metadata.json").read_text())
    u = meta["umbrella"]
    assert u["status"] == "complete" and u["plan"]["psi_windows"] == 2
    assert len(list((dataset / "umbrella").glob("window_*.npz"))) == 8
    assert u["n_samples"] == 8 * 40 and math.isfinite(u["delta_f"])
    with np.load(dataset / "umbrella" / "window_005.npz") as w:
        assert tuple(w["center"]) == pytest.approx((0.0, 0.0)) and len(w["phi"]) == 40
    # a lost window is simulated again, the others are kept
    kept = (dataset / "umbrella" / "window_000.npz").read_bytes()
    (dataset / "umbrella" / "window_003.npz").unlink()
    main([str(dataset), *args])
    assert (dataset / "umbrella" / "window_000.npz").read_bytes() == kept
    assert (dataset / "umbrella" / "window_003.npz").is_file()
    with pytest.raises(SystemExit, match="same options"):
        main([str(dataset), *args, "--k", "50"])
