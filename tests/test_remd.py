"""python -m p4bg.remd: the exchange rule, the engine sampling a known distribution at every
temperature, MBAR against a known answer, a short run that analyze reads as a dataset, and exact
resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from p4bg.data import load_dataset
from p4bg.md.estimators import mbar_delta_f
from p4bg.md.exchange import ReplicaExchange, exchange, geometric_ladder, read_chain_arrays
from p4bg.remd import main
from p4bg.units import R


def test_geometric_ladder_has_a_constant_ratio():
    t = geometric_ladder(300.0, 600.0, 5)
    assert t[0] == 300.0 and math.isclose(t[-1], 600.0)
    ratios = np.array(t[1:]) / np.array(t[:-1])
    assert np.allclose(ratios, 2**0.25)
    with pytest.raises(ValueError, match="t_min < t_max"):
        geometric_ladder(600.0, 300.0, 4)


def test_exchange_accepts_with_the_metropolis_probability():
    """Empirical swap frequency of one pair against min(1, exp((β_0 − β_1)(U_0 − U_1)))."""
    beta = 1.0 / (R * np.array([300.0, 400.0]))
    rng = np.random.default_rng(0)
    for u0, u1 in [(10.0, 0.0), (0.0, 5.0), (0.0, 20.0)]:
        energy = np.array([u0, u1])
        expected = min(1.0, math.exp((beta[0] - beta[1]) * (u0 - u1)))
        n = 20_000
        swaps = sum(exchange(energy, beta, 0, rng)[0] == 1 for _ in range(n))
        assert abs(swaps / n - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-9
    # odd parity leaves the first temperature out; counts go to the pair's slot
    attempts, accepts = np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64)
    perm = exchange(np.array([0.0, 9.0, 0.0, 0.0]), 1.0 / (R * np.array([300, 350, 400, 450])),
                    1, rng, attempts, accepts)  # fmt: skip
    assert perm[0] == 0 and perm[3] == 3 and list(attempts) == [0, 1, 0]
    assert sorted(perm) == [0, 1, 2, 3]


# ------------------------------------------------ the engine on a known distribution
# One particle (12 amu) in a tilted double well along x, harmonic in y and z:
#   U = h ((x/w)² − 1)² + a x/w + ½ k_yz (y² + z²),
# whose exact x-density at T is ∝ exp(−U(x)/kT). At 300 K the barrier is 1.6 kT and the
# tilt makes the x > 0 basin's population depend on T (0.27 at 300 K, 0.39 at 675 K).
WELL = {"h": 4.0, "w": 0.1, "a": 1.5, "kyz": 2000.0}  # kJ/mol, nm, kJ/mol, kJ/mol/nm²
MASS = 12.0  # amu
LADDER = [300.0, 450.0, 675.0]


def _double_well():
    import openmm

    system = openmm.System()
    system.addParticle(MASS)
    force = openmm.CustomExternalForce("h*((x/w)^2 - 1)^2 + a*x/w + 0.5*kyz*(y^2 + z^2)")
    for name, value in WELL.items():
        force.addGlobalParameter(name, value)
    force.addParticle(0, [])
    system.addForce(force)
    return system


def _langevin(temperature: float, seed: int):
    import openmm

    integrator = openmm.LangevinMiddleIntegrator(temperature, 5.0, 0.002)  # 1/ps, ps
    integrator.setRandomNumberSeed(seed)
    return integrator


def _engine(seed: int) -> ReplicaExchange:
    start = np.array([[WELL["w"], 0.0, 0.0]])
    return ReplicaExchange(_double_well(), start, LADDER, _langevin, steps_per_cycle=10,
                           seed=seed, platform="Reference")  # fmt: skip


def _exact_cdf(x: np.ndarray, temperature: float) -> np.ndarray:
    """The exact CDF of x at ``temperature``, integrated on a fine grid."""
    grid = np.linspace(-0.3, 0.3, 60_001)
    u = WELL["h"] * ((grid / WELL["w"]) ** 2 - 1) ** 2 + WELL["a"] * grid / WELL["w"]
    density = np.exp(-(u - u.min()) / (R * temperature))
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2)])
    return np.interp(x, grid, cdf / cdf[-1])


def test_replica_exchange_samples_the_boltzmann_distribution_at_every_temperature():
    """20,000 exchange cycles of 20 fs on the double well: at every temperature the positions
    follow the exact Boltzmann density (Kolmogorov–Smirnov distance) and the velocities the
    Maxwell–Boltzmann one (mean kinetic energy 3/2 kT).

    Tolerances, measured: over 11 seeds the largest KS distance was 0.021 and the kinetic energy
    within 3 % of 3/2 kT. Broken engines (checked by hand, not kept as tests) fail them: swaps
    without the temperature factor (β = 0, every swap accepted) or with β = 1/T (R missing) give
    KS 0.14 at 300 K; velocities not rescaled give kinetic energies of 1.41 and 0.79 × 3/2 kT at
    300 and 675 K, rescaled by the inverse factor 2.5 × at 300 K."""
    engine = _engine(seed=1)
    engine.start(equilibration_cycles=200)
    n = 20_000
    x = np.empty((n, len(LADDER)))
    kinetic = np.empty((n, len(LADDER)))
    for c in range(n):
        cycle = engine.step()
        x[c] = cycle.xyz[:, 0, 0]
        kinetic[c] = 0.5 * MASS * (cycle.velocities[:, 0, :] ** 2).sum(-1)  # kJ/mol
    assert (engine.accepts / engine.attempts > 0.5).all()  # the replicas do exchange
    for k, temperature in enumerate(LADDER):
        xs = np.sort(x[:, k])
        cdf = _exact_cdf(xs, temperature)
        ks = max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max())
        assert ks < 0.035, (temperature, ks)
        ratio = kinetic[:, k].mean() / (1.5 * R * temperature)
        assert abs(ratio - 1) < 0.06, (temperature, ratio)


def test_an_exchange_moves_configurations_with_velocities_rescaled():
    """After a cycle, the context at T_k holds the configuration that was at T_perm[k], with its
    velocities scaled by sqrt(T_k / T_perm[k]) (kinetic energy by T_k / T_perm[k])."""
    engine = _engine(seed=2)
    engine.start()
    swapped = 0
    for _ in range(20):
        cycle = engine.step()
        for k, source in enumerate(cycle.perm):
            state = engine.contexts[k].getState(getPositions=True, getVelocities=True)
            np.testing.assert_array_equal(state.getPositions(asNumpy=True)._value,
                                          cycle.xyz[source])  # fmt: skip
            scale = math.sqrt(LADDER[k] / LADDER[source])
            np.testing.assert_allclose(state.getVelocities(asNumpy=True)._value,
                                       cycle.velocities[source] * scale, rtol=1e-12)  # fmt: skip
            swapped += source != k
    assert swapped >= 10  # both directions, several pairs
    assert sorted(engine.walker) == [0, 1, 2]


def test_mbar_recovers_a_two_state_free_energy():
    """Two basins of energies 0 and ΔE (kJ/mol) with equal degeneracy, sampled exactly at each
    temperature of the ladder: ΔF at the lowest is ΔE/kT_0."""
    rng = np.random.default_rng(1)
    temps = geometric_ladder(300.0, 600.0, 4)
    d_e = 12.0
    energies, phi = [], []
    for _ in range(2):  # two chains
        e = np.zeros((20_000, len(temps)))
        p = np.zeros_like(e)
        for k, t in enumerate(temps):
            p_b = 1.0 / (1.0 + math.exp(d_e / (R * t)))
            b = rng.random(len(e)) < p_b
            e[:, k] = np.where(b, d_e, 0.0) + rng.normal(0, 1e-3, len(e))  # no exact ties
            p[:, k] = np.where(b, 1.0, -1.0)
        energies.append(e)
        phi.append(p)
    result = mbar_delta_f(energies, phi, temps)
    exact = d_e / (R * temps[0])
    assert abs(result["delta_f"] - exact) < 4 * result["delta_f_err"]
    assert 0.01 < result["delta_f_err"] < 0.1 and result["stride"] <= 2  # iid: g ≈ 1


def _remd(out, *extra):
    main(["--ns", "0.01", "--chains", "2", "--n-temperatures", "3", "--t-max", "500",
          "--exchange-every-ps", "0.05", "--equilibration-ps", "1", "--chunk-frames", "80",
          "--platform", "Reference", "--no-progress", "--out", str(out), *extra])  # fmt: skip


def test_remd_writes_a_dataset_at_the_lowest_temperature_and_resumes_exactly(tmp_path):
    _remd(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert meta["status"] == "complete" and meta["temperature_K"] == 300.0
    assert len(meta["temperatures_K"]) == 3 and meta["replicas"][0]["frames"] == 200
    mbar = meta["mbar"]
    for key in ("delta_f", "delta_f_err", "acceptance", "delta_f_chains", "round_trips"):
        assert key in mbar
    assert all(0 < a <= 1 for a in mbar["acceptance"])
    data = load_dataset(tmp_path / "a")
    assert data.xyz.shape == (400, 66)
    chain = read_chain_arrays(tmp_path / "a" / "replica_00")
    # the dataset's energies are the lowest temperature's column
    assert np.array_equal(data.energies[:200], chain["energies_all"][:, 0])
    assert chain["energies_all"].shape == (200, 3) and chain["walker"].shape == (200, 3)
    assert all(sorted(row) == [0, 1, 2] for row in chain["walker"])
    # the estimate again from the stored chunks, without MD
    main(["--out", str(tmp_path / "a"), "--reestimate"])
    again = json.loads((tmp_path / "a" / "metadata.json").read_text())["mbar"]
    assert again["delta_f_chains"] == pytest.approx(mbar["delta_f_chains"], nan_ok=True)

    # killed after its first chunk, then resumed: the same frames as the uninterrupted run
    _remd(tmp_path / "b", "--stop-after-chunks", "1")
    assert json.loads((tmp_path / "b" / "metadata.json").read_text())["status"] == "interrupted"
    _remd(tmp_path / "b", "--resume")
    again = load_dataset(tmp_path / "b")
    assert np.array_equal(again.xyz, data.xyz)
    assert np.array_equal(again.energies, data.energies)
    with pytest.raises(SystemExit, match="--resume"):
        _remd(tmp_path / "b")


def test_remd_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--ns", "1", "--t-min", "600", "--t-max", "300", "--out", str(tmp_path / "x")])
    assert "--t-min < --t-max" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="exchange-every-ps"):
        main(["--ns", "1", "--exchange-every-ps", "0.0005", "--out", str(tmp_path / "y")])


def test_remd_of_a_peptide_records_every_residues_phi_and_its_mbar_estimate(tmp_path):
    """On the tetrapeptide every cycle keeps φ of each residue at every temperature; the
    central residue's column is the φ the chain already records, and the per-residue MBAR
    record of that residue is the run's own estimate. analyze's per-residue table takes each
    residue's record, an umbrella record on a residue in preference to MBAR."""
    from p4bg.residue_report import recorded_free_energies

    main(["--system", "alanine_tetrapeptide", "--ns", "0.004", "--chains", "1",
          "--n-temperatures", "3", "--t-max", "500", "--exchange-every-ps", "0.05",
          "--equilibration-ps", "0.2", "--platform", "Reference", "--no-progress", "--out",
          str(tmp_path / "t")])  # fmt: skip
    chain = read_chain_arrays(tmp_path / "t" / "replica_00")
    assert chain["phi_residues_all"].shape == (80, 3, 3)
    np.testing.assert_array_equal(chain["phi_residues_all"][:, :, 1], chain["phi_all"])
    meta = json.loads((tmp_path / "t" / "metadata.json").read_text())
    residues = meta["mbar"]["residues"]
    assert list(residues) == ["ALA2", "ALA3", "ALA4"]
    assert residues["ALA3"]["delta_f"] == pytest.approx(meta["mbar"]["delta_f"], nan_ok=True)

    fake = {"temperatures_K": [300.0, 400.0, 500.0],
            "mbar": {"delta_f": 4.0, "delta_f_err": 0.2,
                     "residues": {"ALA2": {"delta_f": 3.5, "delta_f_err": 0.3},
                                  "ALA3": {"delta_f": 4.0, "delta_f_err": 0.2},
                                  "ALA4": {"delta_f": float("inf"), "delta_f_err": float("nan")}}},
            "umbrella_residues": {"ALA2": {"status": "complete", "delta_f": 3.6,
                                           "delta_f_err": 0.05,
                                           "plan": {"windows": 36, "psi_windows": 0}}}}  # fmt: skip
    got = recorded_free_energies(fake, "ALA3")
    assert set(got) == {"ALA2", "ALA3"}  # ALA4's infinite MBAR value is no estimate
    assert got["ALA2"][:2] == (3.6, 0.05) and "umbrella" in got["ALA2"][2]
    assert got["ALA3"][:2] == (4.0, 0.2) and "MBAR over 3 temperatures" in got["ALA3"][2]
