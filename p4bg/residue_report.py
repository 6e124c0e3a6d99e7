"""The per-residue part of ``p4bg.analyze``: every residue's angles from the reference frames
and from each run's samples.dcd, their metrics and the TICA joint view (analysis.residues), and
the figures residues.png and tica.png."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from analysis.geometry import dihedral
from analysis.plots import AngleSet, plot_ramachandran, plot_tica
from analysis.residues import (
    TICA_BINS,
    fit_tica,
    grid_edges,
    histogram_kl_2d,
    residue_metrics,
    tica_features,
)
from analysis.weights import normalised_weights
from p4bg.config import ConfigError
from p4bg.files import write_atomic
from p4bg.zmatrix import backbone_dihedrals, residue_of

if TYPE_CHECKING:
    from p4bg.analyze import Reference

__all__ = [
    "per_residue",
    "recorded_free_energies",
    "reference_free_energy",
    "residue_angles",
    "sample_positions",
]


def residue_angles(xyz: np.ndarray, chain: list[tuple[str, tuple, tuple]]) -> tuple:
    """φ and ψ (radians) of every residue of ``chain`` (:func:`p4bg.zmatrix.backbone_dihedrals`)
    for xyz (frames, atoms, 3) nm: two arrays of shape (frames, residues)."""
    phi = np.stack([dihedral(xyz, atoms) for _, atoms, _ in chain], 1)
    psi = np.stack([dihedral(xyz, atoms) for _, _, atoms in chain], 1)
    return phi, psi


def sample_positions(run: Path, n: int) -> np.ndarray:
    """The positions of a run's samples (samples.dcd on samples.pdb), nm, (n, atoms, 3)."""
    import mdtraj

    traj = mdtraj.load(str(run / "samples.dcd"), top=str(run / "samples.pdb"))
    if traj.n_frames != n:
        raise ConfigError(f"{run}: samples.dcd holds {traj.n_frames} frames, samples.npz {n}; "
                          f"resample with `python -m p4bg.sample {run} --overwrite`")  # fmt: skip
    return traj.xyz


def per_residue(
    ref: Reference,
    runs: list[Path],
    samples: dict[str, dict[str, np.ndarray]],
    out: Path,
    tica_lag_ps: float,
    recorded: bool = False,
) -> tuple[dict[str, Any], dict[str, Any] | None, list[str]]:
    """Per-residue metrics, the TICA joint view and their figures (analysis.residues), for a
    peptide with more than one residue; empty for one. ``recorded``: the reference is all of
    its dataset, so the free energies its metadata.json records (:func:`recorded_free_energies`)
    replace those of its frames."""
    chain = backbone_dihedrals(ref.system.topology)
    if len(chain) < 2:
        return {}, None, []
    labels = [label for label, _, _ in chain]
    if len(set(labels)) < len(labels):  # several chains: residue numbers repeat
        labels = [f"{label}#{k}" for k, label in enumerate(labels)]
    ref_phi, ref_psi = residue_angles(ref.xyz, chain)
    angles = {}
    for run in runs:
        s = samples[run.name]
        phi, psi = residue_angles(sample_positions(run, len(s["u"])), chain)
        angles[run.name] = (phi, psi, s["log_w"])
    residues = residue_metrics(labels, ref_phi, ref_psi, ref.segments, angles)
    if recorded:
        central = residue_of(chain, ref.system.phi_atoms, ref.system.psi_atoms)
        for label, estimate in recorded_free_energies(ref.meta, central).items():
            if label in residues:
                _use_estimate(residues[label]["reference"], estimate)
    panels: list[AngleSet | None] = []
    for r, label in enumerate(labels):
        panels.append(AngleSet(f"{label}: MD", ref_phi[:, r], ref_psi[:, r]))
        for name, (phi, psi, log_w) in angles.items():
            panels.append(AngleSet(f"{label}: {name} (raw)", phi[:, r], psi[:, r]))
            panels.append(AngleSet(f"{label}: {name} (reweighted)", phi[:, r], psi[:, r], log_w))
    columns = 1 + 2 * len(angles)
    figures = [write_atomic(out / "residues.png", lambda tmp: plot_ramachandran(
        tmp, panels, columns=columns)).name]  # fmt: skip
    lag = max(1, round(tica_lag_ps / ref.ps_per_frame)) if ref.ps_per_frame else 1
    try:
        model = fit_tica(tica_features(ref_phi, ref_psi), ref.segments, lag)
    except ValueError as err:
        print(f"p4bg.analyze: note: no TICA view ({err})", file=sys.stderr)
        return residues, None, figures
    ref_points = model.project(tica_features(ref_phi, ref_psi))
    edges = grid_edges(ref_points)
    a, b = len(ref_points) // 2, len(ref_points)
    tica: dict[str, Any] = {
        "lag_frames": lag, "lag_ps": lag * ref.ps_per_frame if ref.ps_per_frame else None,
        "eigenvalues": model.eigenvalues.tolist(), "bins": TICA_BINS,
        "kl_floor": histogram_kl_2d(ref_points[:a], ref_points[a:b], edges=edges), "models": {},
    }  # fmt: skip
    tica_panels: list[tuple[str, np.ndarray, np.ndarray | None]] = [("MD", ref_points, None)]
    for name, (phi, psi, log_w) in angles.items():
        points = model.project(tica_features(phi, psi))
        try:
            w = normalised_weights(log_w)
        except ValueError:
            w = None
        kl = _kl_or_nan(ref_points, points, None, edges)
        kl_w = math.nan if w is None else _kl_or_nan(ref_points, points, w, edges)
        tica["models"][name] = {"kl": kl, "kl_reweighted": kl_w}
        tica_panels += [(f"{name} (raw)", points, None), (f"{name} (reweighted)", points, log_w)]
    figures.append(write_atomic(out / "tica.png", lambda tmp: plot_tica(
        tmp, tica_panels, edges, columns=1 + 2 * len(angles))).name)  # fmt: skip
    return residues, tica, figures


def reference_free_energy(meta: dict[str, Any]) -> tuple[float, float, str] | None:
    """ΔF(φ>0 vs φ<0) with its uncertainty (kT) and its source, from what a dataset's
    metadata.json records besides its frames: umbrella sampling along φ (and ψ) with MBAR
    (p4bg.umbrella) first, else MBAR over a replica-exchange ladder (p4bg.remd); None if
    neither is there (the frames' own ΔF is used)."""
    umbrella, mbar = meta.get("umbrella"), meta.get("mbar")
    if isinstance(umbrella, dict) and umbrella.get("status") == "complete":
        return _umbrella_estimate(umbrella, "p4bg.umbrella")
    if isinstance(mbar, dict) and math.isfinite(mbar.get("delta_f", math.nan)):
        return (float(mbar["delta_f"]), float(mbar["delta_f_err"]),
                f"MBAR over {len(meta['temperatures_K'])} temperatures (p4bg.remd)")  # fmt: skip
    return None


def recorded_free_energies(
    meta: dict[str, Any], central: str | None
) -> dict[str, tuple[float, float, str]]:
    """Per residue label, ΔF(φ>0 vs φ<0) with its uncertainty (kT) and its source, as a
    dataset's metadata.json records them: the system's own φ (the ``central`` residue's) from
    umbrella sampling or MBAR over a replica-exchange ladder
    (:func:`reference_free_energy`), any other residue's from umbrella sampling
    (``p4bg.umbrella --residue``) or else from that ladder's MBAR of its φ."""
    out = {}
    mbar = meta.get("mbar") if isinstance(meta.get("mbar"), dict) else {}
    for label, record in (mbar.get("residues") or {}).items():
        if math.isfinite(record.get("delta_f", math.nan)):
            out[label] = (float(record["delta_f"]), float(record["delta_f_err"]),
                          f"MBAR over {len(meta['temperatures_K'])} temperatures of this "
                          f"residue's φ (p4bg.remd)")  # fmt: skip
    own = reference_free_energy(meta)
    if central is not None and own is not None:
        out[central] = own
    for label, record in (meta.get("umbrella_residues") or {}).items():
        if isinstance(record, dict) and record.get("status") == "complete":
            out[label] = _umbrella_estimate(record, f"p4bg.umbrella --residue {label}")
    return out


def _umbrella_estimate(record: dict[str, Any], command: str) -> tuple[float, float, str]:
    """(ΔF, its error, its source) of a complete umbrella record made by ``command``."""
    plan = record["plan"]
    grid = (f"{plan['windows']} x {plan['psi_windows']} (φ, ψ)" if plan.get("psi_windows")
            else f"{plan['windows']} φ")  # fmt: skip
    return (
        float(record["delta_f"]),
        float(record["delta_f_err"]),
        f"umbrella sampling, {grid} windows, MBAR ({command})",
    )


def _use_estimate(reference: dict[str, Any], estimate: tuple[float, float, str]) -> None:
    """Put a recorded free energy in place of the one from the frames (kept as
    ``delta_f_frames``), as the metrics table does for the system's own φ."""
    reference["delta_f_frames"] = reference["delta_f"]
    reference["delta_f_frames_err"] = reference["delta_f_err"]
    reference["delta_f_frames_note"] = reference.get("delta_f_note")
    reference["delta_f"], reference["delta_f_err"], reference["delta_f_source"] = estimate
    reference["delta_f_note"] = None


def _kl_or_nan(ref: np.ndarray, points: np.ndarray, w: np.ndarray | None, edges: list) -> float:
    try:
        return histogram_kl_2d(ref, points, w, edges=edges)
    except ValueError:
        return math.nan
