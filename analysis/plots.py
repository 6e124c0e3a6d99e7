"""Figures of a report (paper Fig. 7): energy distributions, Ramachandran maps, F(φ).

Each function takes arrays and writes one PNG; matplotlib is imported when a figure is drawn
(with the non-interactive Agg backend, so reports render on machines without a display).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from analysis.histograms import ramachandran_histogram
from analysis.weights import normalised_weights

__all__ = [
    "AngleSet",
    "plot_energies",
    "plot_free_energy_phi",
    "plot_ramachandran",
    "plot_training",
]


class AngleSet(NamedTuple):
    """One panel or curve: a label, φ and ψ (radians), and optional log-weights to reweight by."""

    label: str
    phi: np.ndarray
    psi: np.ndarray
    log_w: np.ndarray | None = None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    """Write the PNG at ``path`` as it is given, with no temporary file of its own: a caller that
    wants the file replaced atomically passes the temporary path of p4bg.files.write_atomic
    (``write_atomic(png, lambda tmp: plot_energies(tmp, ...))``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # temporary: the lead moves the writing to p4bg.analyze
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_energies(path: str | Path, energies: dict[str, np.ndarray], u_train_max: float) -> Path:
    """Violins of reduced energies (kT) per ensemble, with the share below ``u_train_max``.

    energies: label -> u (kT), e.g. MD, MD + 0.004 nm noise, each model. The axis stops a little
    above the highest MD energy; the share of each ensemble beyond it (failed samples included)
    is printed instead of drawn, so that a few clashes do not flatten the violins.
    """
    plt = _pyplot()
    labels = list(energies)
    finite_all = np.concatenate([u[np.isfinite(u)] for u in energies.values()])
    low = float(np.min(finite_all)) - 2.0
    high = u_train_max + 0.5 * (u_train_max - low)
    fig, ax = plt.subplots(figsize=(1.9 * len(labels) + 1.5, 4.2))
    for i, label in enumerate(labels):
        u = np.asarray(energies[label], dtype=np.float64)
        shown = u[np.isfinite(u) & (u <= high)]
        if len(shown) > 1:
            parts = ax.violinplot(shown, positions=[i], widths=0.8, showmedians=True)
            for body in parts["bodies"]:
                body.set_alpha(0.6)
        below = np.mean(u < u_train_max)
        beyond = np.mean(~(u <= high))
        text = f"{100 * below:.1f}% low" + (f"\n{100 * beyond:.1f}% off axis" if beyond else "")
        ax.text(i, high + 0.11 * (high - low), text, ha="center", va="top", fontsize=8)
    ax.axhline(u_train_max, color="grey", lw=0.8, ls="--", label="max u of training data")
    ax.set_xticks(range(len(labels)), labels, rotation=15)
    ax.set_ylim(low, high + 0.13 * (high - low))
    ax.set_ylabel("reduced energy u (kT)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Energy distributions")
    return _save(fig, path)


def plot_ramachandran(
    path: str | Path, panels: list[AngleSet | None], bins: int = 64, columns: int | None = None
) -> Path:
    """Ramachandran maps side by side as free energies ``−ln p(φ, ψ)`` (kT, minimum 0);
    empty bins are white. A panel with log-weights is reweighted to the target; ``None`` leaves
    its cell empty (to line up raw and reweighted maps in a grid of ``columns``)."""
    plt = _pyplot()
    n = len(panels)
    cols = columns or min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False)
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    image = None
    for ax, panel in zip(axes.flat, panels, strict=False):
        if panel is None:
            ax.set_visible(False)
            continue
        ax.set_title(panel.label, fontsize=9)
        ax.set_xlabel("φ (rad)")
        try:
            weights = None if panel.log_w is None else normalised_weights(panel.log_w)
            hist = ramachandran_histogram(panel.phi, panel.psi, weights, bins=bins)
        except ValueError:  # a diverged model: say so instead of failing the whole report
            ax.text(0.5, 0.5, "no finite samples\nwith weight", ha="center", va="center",
                    transform=ax.transAxes)  # fmt: skip
            continue
        with np.errstate(divide="ignore"):
            free = -np.log(hist)
        free -= free[np.isfinite(free)].min()
        free = np.ma.masked_invalid(free)
        image = ax.pcolormesh(edges, edges, free.T, cmap="viridis", vmin=0, vmax=10)
        ax.set_aspect("equal")
    for row, ax in enumerate(axes[:, 0]):
        ax.set_ylabel("ψ (rad)")
        if panels[row * cols] is None and cols > 1:
            axes[row, 1].set_ylabel("ψ (rad)")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, label="−ln p (kT)", shrink=0.8)
    return _save(fig, path)


def plot_free_energy_phi(
    path: str | Path, curves: list[AngleSet], bins: int = 100, max_kT: float = 12.0
) -> Path:
    """Free energy along φ, ``F(φ) = −ln p(φ)`` in kT (minimum 0, axis up to ``max_kT``), per
    curve; curves with log-weights are reweighted (dashed). Empty bins leave gaps."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    centres = np.linspace(-math.pi, math.pi, bins + 1)
    centres = 0.5 * (centres[1:] + centres[:-1])
    colours: dict[int, str] = {}
    for curve in curves:
        ok = np.isfinite(curve.phi)
        weights = None
        if curve.log_w is not None:
            try:
                weights = normalised_weights(curve.log_w)[ok]
            except ValueError:
                continue  # no sample with weight: nothing to draw
        if not ok.any() or (weights is not None and not weights.sum() > 0):
            continue
        hist, _ = np.histogram(curve.phi[ok], bins=bins, range=(-math.pi, math.pi),
                               weights=weights, density=True)  # fmt: skip
        with np.errstate(divide="ignore"):
            free = -np.log(hist)
        free -= free[np.isfinite(free)].min()
        # the same ensemble raw and reweighted share a colour; reweighted is dashed
        key = id(curve.phi)
        colour = colours.setdefault(key, f"C{len(colours)}")
        style = "--" if curve.log_w is not None else "-"
        ax.plot(centres, np.where(np.isfinite(free), free, np.nan), style, color=colour,
                label=curve.label)  # fmt: skip
    ax.set_xlabel("φ (rad)")
    ax.set_ylabel("F(φ) (kT)")
    ax.set_xlim(-math.pi, math.pi)
    ax.set_ylim(0, max_kT)
    ax.legend(fontsize=8)
    ax.set_title("Free energy along φ")
    return _save(fig, path)


def _finite(m: dict[str, np.ndarray], key: str) -> np.ndarray:
    """A column's values where finite (empty when the column is absent)."""
    v = m.get(key)
    return np.zeros(0) if v is None else np.asarray(v, dtype=np.float64)[np.isfinite(v)]


ESS_CURVES = (("val_ess", "-", "reverse ESS"),
              ("val_ess_clipped", "--", "reverse ESS (clipped top 1e-4)"))  # fmt: skip


def plot_training(path: str | Path, runs: dict[str, dict[str, np.ndarray]]) -> Path:
    """Training curves per run from metrics.csv columns (NaN where a row has none).

    Left panel: training (thin) and validation (thick) NLL against ``step`` from ``nll`` and
    ``val_nll``; a falling training NLL under a rising validation NLL is overfitting. When the
    columns exist, the per-basin validation NLL ``val_nll_phi_pos`` (dashed) and
    ``val_nll_phi_neg`` (dotted) join it. Right panel, when any run has them: the validation
    reverse ESS ``val_ess`` (solid) and ``val_ess_clipped`` (dashed, clipped top 1e-4), stored
    as fractions and drawn in % on a log axis. Older runs without these columns get the NLL
    panel alone."""
    plt = _pyplot()
    ess_keys = ("val_ess", "val_ess_clipped")
    has_ess = any(len(_finite(m, k)) for m in runs.values() for k in ess_keys)
    fig, axes = plt.subplots(1, 2 if has_ess else 1, figsize=(12.0 if has_ess else 6.4, 4.0),
                             squeeze=False)  # fmt: skip
    ax = axes[0, 0]
    nll_keys = ("nll", "val_nll", "val_nll_phi_pos", "val_nll_phi_neg")
    for i, (label, m) in enumerate(runs.items()):
        colour = f"C{i}"
        ok = np.isfinite(m["nll"])
        ax.plot(m["step"][ok], m["nll"][ok], color=colour, lw=0.6, alpha=0.6,
                label=f"{label} train")  # fmt: skip
        ok = np.isfinite(m["val_nll"])
        ax.plot(m["step"][ok], m["val_nll"][ok], color=colour, lw=2, label=f"{label} val")
        for key, style, text in (("val_nll_phi_pos", "--", "val φ>0"),
                                 ("val_nll_phi_neg", ":", "val φ<0")):  # fmt: skip
            if key in m and np.isfinite(m[key]).any():
                ok = np.isfinite(m[key])
                ax.plot(m["step"][ok], m[key][ok], style, color=colour, lw=1.4,
                        label=f"{label} {text}")  # fmt: skip
    values = np.concatenate([_finite(m, k) for m in runs.values() for k in nll_keys])
    if len(values):
        low, high = np.percentile(values, [0.5, 97])
        ax.set_ylim(low - 2, high + 2)
    ax.set_xlabel("step")
    ax.set_ylabel("NLL (nats, 60-dim latent space)")
    ax.legend(fontsize=8)
    ax.set_title("Training curves")
    if has_ess:
        ax = axes[0, 1]
        for i, (label, m) in enumerate(runs.items()):
            for key, style, text in ESS_CURVES:
                if key not in m:
                    continue
                ok = np.isfinite(m[key]) & (m[key] > 0)  # a log axis cannot show 0
                if ok.any():
                    ax.plot(m["step"][ok], 100 * m[key][ok], style, color=f"C{i}",
                            label=f"{label} {text}")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("validation reverse ESS (%)")
        ax.legend(fontsize=8)
        ax.set_title("Reverse ESS during training")
    return _save(fig, path)


def plot_tica(
    path: str | Path,
    panels: list[tuple[str, np.ndarray, np.ndarray | None]],
    edges: list[np.ndarray],
    columns: int | None = None,
) -> Path:
    """Free energy ``−ln p`` (kT, minimum 0) on the first two TICA components, one panel per
    ensemble: (label, points (n, 2), log-weights or None). ``edges``: the grid (the MD
    reference's range), shared by every panel so that the maps compare cell by cell."""
    plt = _pyplot()
    n = len(panels)
    cols = columns or min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False)
    image = None
    for ax, (label, points, log_w) in zip(axes.flat, panels, strict=False):
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("TIC 1")
        ok = np.isfinite(points).all(1)
        try:
            weights = None if log_w is None else normalised_weights(log_w)[ok]
            hist, _, _ = np.histogram2d(points[ok, 0], points[ok, 1], bins=edges, weights=weights)
            if not hist.sum() > 0:
                raise ValueError
        except ValueError:
            ax.text(0.5, 0.5, "no samples\nwith weight", ha="center", va="center",
                    transform=ax.transAxes)  # fmt: skip
            continue
        with np.errstate(divide="ignore"):
            free = -np.log(hist / hist.sum())
        free -= free[np.isfinite(free)].min()
        image = ax.pcolormesh(edges[0], edges[1], np.ma.masked_invalid(free).T, cmap="viridis",
                              vmin=0, vmax=10)  # fmt: skip
    for ax in axes[:, 0]:
        ax.set_ylabel("TIC 2")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, label="−ln p (kT)", shrink=0.8)
    return _save(fig, path)
