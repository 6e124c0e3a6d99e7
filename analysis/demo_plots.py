"""The demo's figures (issue 28): Ramachandran maps side by side, F(φ) with error bands, energy
histograms and the training curve with validation ESS.

Each ``plot_*`` function draws from arrays (the dataclasses of analysis.demo) and saves one PNG
at the path it is given, nothing else: a caller that wants the file replaced atomically passes
a temporary path (p4bg.files.write_atomic). matplotlib is imported when a figure is drawn, with
the non-interactive Agg backend. Angles are radians in the data and degrees on the axes; free
energies are in kT at the target temperature.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np

from analysis.demo import BGSamples, MDRun, Reference
from analysis.histograms import ramachandran_histogram
from analysis.plots import AngleSet
from analysis.weights import normalised_weights

__all__ = [
    "DPI",
    "demo_panels",
    "free_energy_phi_band",
    "plot_energy_histograms",
    "plot_free_energy_phi_bands",
    "plot_ramachandran_compare",
    "plot_training_curve",
    "validation_trend",
]

DPI = 110
COLOURS = {"BG": "C0", "MD": "C1", "reference": "black"}
PHASE_COLOURS = {"nll": "#dbe9f6", "mixed": "#fde7cf", "anneal": "#f8d5d5"}
PHASE_NAMES = {"nll": "maximum likelihood", "mixed": "mixed NLL + KL", "anneal": "annealing"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    """savefig to ``path`` as given (no directory made, no temporary of its own), then close."""
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return Path(path)


def _weights(log_w: np.ndarray | None) -> np.ndarray | None:
    """Normalised importance weights, or None for unweighted data; raises ValueError when no
    sample has a finite weight."""
    return None if log_w is None else normalised_weights(log_w)


def demo_panels(bg: BGSamples, md: MDRun, reference: Reference) -> list[AngleSet]:
    """The three maps of :func:`plot_ramachandran_compare`: BG reweighted, MD of the same cost,
    the reference frames."""
    ref_phi = reference.all("phi")
    return [
        AngleSet(f"BG, reweighted ({len(bg.phi):,} samples)", bg.phi, bg.psi, bg.log_w),
        AngleSet(f"MD, same CPU seconds ({md.ns:.3g} ns)", md.all("phi"), md.all("psi")),
        AngleSet(f"reference ({len(ref_phi):,} frames)", ref_phi, reference.all("psi")),
    ]


def plot_ramachandran_compare(
    path: str | Path, panels: list[AngleSet], bins: int = 64, max_kT: float = 12.0
) -> Path:
    """Maps of ``F(φ, ψ) = −ln p(φ, ψ)`` (kT) side by side on one colour scale: every density is
    normalised (``density=True``), then one constant, the lowest F of all panels, is subtracted,
    so equal colours mean equal free energies across panels; white = no sample. Each panel says
    its share of φ > 0 (weighted where it has log-weights)."""
    plt = _pyplot()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 0.8, 3.6), squeeze=False)
    edges = np.degrees(np.linspace(-math.pi, math.pi, bins + 1))
    maps: list[np.ndarray | None] = []
    shares: list[float] = []
    for panel in panels:
        try:
            w = _weights(panel.log_w)
            hist = ramachandran_histogram(panel.phi, panel.psi, w, bins=bins)
        except ValueError:  # nothing with finite angles and weight: say so in the panel
            maps.append(None)
            shares.append(math.nan)
            continue
        ok = np.isfinite(panel.phi)
        ww = np.ones(ok.sum()) if w is None else w[ok]
        shares.append(float(ww[panel.phi[ok] > 0].sum() / ww.sum()))
        with np.errstate(divide="ignore"):
            maps.append(-np.log(hist))
    finite = [m[np.isfinite(m)].min() for m in maps if m is not None and np.isfinite(m).any()]
    shift = min(finite) if finite else 0.0
    image = None
    for ax, panel, free, share in zip(axes[0], panels, maps, shares, strict=True):
        ax.set_title(panel.label, fontsize=9)
        ax.set_xlabel("φ (degrees)")
        ax.set_xlim(-180, 180)
        ax.set_ylim(-180, 180)
        ax.set_xticks(range(-180, 181, 90))
        ax.set_yticks(range(-180, 181, 90))
        ax.set_aspect("equal")
        if free is None:
            ax.text(0, 0, "no finite samples\nwith weight", ha="center", va="center")
            continue
        image = ax.pcolormesh(edges, edges, np.ma.masked_invalid(free - shift).T,
                              cmap="viridis", vmin=0, vmax=max_kT)  # fmt: skip
        ax.axvline(0, color="white", lw=0.6, ls="--")
        text = "no sample with φ > 0" if share == 0 else f"φ > 0: {share:.2%}"
        ax.text(0.97, 0.03, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})  # fmt: skip
    axes[0, 0].set_ylabel("ψ (degrees)")
    if image is not None:
        fig.colorbar(image, ax=axes, label="F(φ, ψ) = −ln p (kT)", shrink=0.85)
    return _save(fig, path)


def free_energy_phi_band(
    phi: np.ndarray, weights: np.ndarray | None = None, bins: int = 60, batches: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(centres, F, low, high)``: F(φ) = −ln p(φ) in kT on ``bins`` bins over [−π, π] (centres
    in radians), shifted to minimum 0, and the band F(p ± δp) of one standard error, δp the
    standard error of the density from ``batches`` consecutive batches of the samples (each
    batch's weights normalised among themselves: a batch-means ratio estimate). For MD frames in
    time order the batches are blocks, and the band is a lower bound where a block is shorter
    than the correlation time. NaN where a bin is empty; ``high`` is +inf where p − δp ≤ 0."""
    phi = np.asarray(phi, dtype=np.float64)
    w = np.ones(phi.size) if weights is None else np.asarray(weights, dtype=np.float64)
    ok = np.isfinite(phi) & np.isfinite(w)
    edges = np.linspace(-math.pi, math.pi, bins + 1)

    def density(idx: np.ndarray) -> np.ndarray | None:
        sel = idx[ok[idx]]
        if not w[sel].sum() > 0:
            return None
        return np.histogram(phi[sel], bins=edges, weights=w[sel], density=True)[0]

    p = density(np.arange(phi.size))
    if p is None:
        raise ValueError("free_energy_phi_band: no sample with a finite φ and weight")
    parts = [d for idx in np.array_split(np.arange(phi.size), batches)
             if (d := density(idx)) is not None]  # fmt: skip
    dp = (np.std(parts, axis=0, ddof=1) / math.sqrt(len(parts)) if len(parts) >= 2
          else np.full(bins, np.nan))  # fmt: skip
    with np.errstate(divide="ignore", invalid="ignore"):
        free = np.where(p > 0, -np.log(p), np.nan)
        shift = np.nanmin(free)
        low = -np.log(p + dp) - shift
        high = np.where(p - dp > 0, -np.log(np.maximum(p - dp, 1e-300)), np.inf) - shift
    low = np.where(p > 0, low, np.nan)
    high = np.where(p > 0, high, np.nan)
    return 0.5 * (edges[1:] + edges[:-1]), free - shift, low, high


def plot_free_energy_phi_bands(
    path: str | Path,
    bg: BGSamples,
    md: MDRun,
    reference: Reference,
    metrics: dict[str, Any] | None = None,
    bins: int = 60,
    batches: int = 10,
    max_kT: float = 14.0,
) -> Path:
    """F(φ) = −ln p(φ) in kT (each curve shifted to minimum 0) for the BG reweighted and MD, with
    one-standard-error bands from :func:`free_energy_phi_band` (BG: ``batches`` batches of
    independent samples; MD: as many blocks in time, a lower bound), and the reference frames'
    curve. A box gives each ΔF(φ>0 vs φ<0) from ``metrics`` (analysis.demo.demo_metrics; else
    the reference's alone). A curve that stops has no sample there."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    ax.axvspan(0, 180, color="0.93", zorder=0)
    ax.text(90, max_kT * 0.97, "φ > 0", ha="center", va="top", fontsize=9, color="0.4")
    ax.text(-90, max_kT * 0.97, "φ < 0", ha="center", va="top", fontsize=9, color="0.4")
    curves = [("BG, reweighted", bg.phi, bg.log_w, COLOURS["BG"], True),
              (f"MD, same CPU seconds ({md.ns:.3g} ns)", md.all("phi"), None, COLOURS["MD"],
               True),
              ("reference", reference.all("phi"), None, COLOURS["reference"], False)]  # fmt: skip
    empty = 0  # curves without a φ > 0 sample, labelled one under the other
    for label, phi, log_w, colour, band in curves:
        try:
            centres, free, low, high = free_energy_phi_band(phi, _weights(log_w), bins, batches)
        except ValueError:
            continue
        x = np.degrees(centres)
        ax.plot(x, free, color=colour, lw=1.8 if band else 1.2, ls="-" if band else "--",
                label=label, zorder=3)  # fmt: skip
        if band:
            ax.fill_between(x, low, np.minimum(high, max_kT + 1), color=colour, alpha=0.25, lw=0)
        if not np.isfinite(free[centres > 0]).any():
            ax.text(90, max_kT * (0.55 - 0.08 * empty), f"{label.split(',')[0]}: no sample "
                    "with φ > 0", ha="center", color=colour, fontsize=9)  # fmt: skip
            empty += 1
    ref_text = f"{reference.delta_f:.2f} ± {reference.delta_f_err:.2f} kT"
    box = [f"ΔF(φ>0 vs φ<0), reference: {ref_text}"]
    if metrics is not None:
        for key, name in (("bg", "BG"), ("md", "MD")):
            d = metrics[key]["delta_f"]
            value = (f"{d['value']:.2f} ± {d['err']:.2f} kT" if d["value"] is not None
                     else "not measurable here")  # fmt: skip
            box.append(f"{name}: {value}")
    ax.text(1.02, 0.0, "\n".join(box), transform=ax.transAxes, fontsize=8, va="bottom",
            bbox={"facecolor": "white", "alpha": 0.9, "lw": 0.5})  # fmt: skip
    ax.set_xlim(-180, 180)
    ax.set_xticks(range(-180, 181, 60))
    ax.set_ylim(0, max_kT)
    ax.set_xlabel("φ (degrees)")
    ax.set_ylabel("F(φ) = −ln p(φ) (kT)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Free energy along φ (bands: one standard error)")
    return _save(fig, path)


def _weighted_quantile(x: np.ndarray, w: np.ndarray, q: float) -> float:
    order = np.argsort(x)
    c = np.cumsum(w[order])
    return float(x[order][min(np.searchsorted(c, q * c[-1]), x.size - 1)])


def plot_energy_histograms(path: str | Path, bg: BGSamples, md: MDRun, bins: int = 80) -> Path:
    """Densities of the reduced energy u (kT) of the BG's samples, raw (outline) and reweighted
    (filled), and of the MD frames: the raw BG sits higher than MD where the model puts mass on
    strained configurations, and reweighting should bring it onto MD. The axis spans the bulk
    (0.5–99.5 % of MD and of the reweighted BG); the legend counts what falls beyond it and the
    failed energies (u = +inf)."""
    plt = _pyplot()
    u_bg = np.asarray(bg.u, dtype=np.float64)
    u_md = md.all("u")
    ok = np.isfinite(u_bg)
    try:
        w = normalised_weights(bg.log_w)[ok]
    except ValueError:
        w = None
    ends = []
    if np.isfinite(u_md).any():
        ends += list(np.percentile(u_md[np.isfinite(u_md)], [0.5, 99.5]))
    if w is not None and w.sum() > 0:
        ends += [_weighted_quantile(u_bg[ok], w, 0.005), _weighted_quantile(u_bg[ok], w, 0.995)]
    elif ok.any():
        ends += list(np.percentile(u_bg[ok], [0.5, 99.5]))
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    if not ends:
        ax.text(0.5, 0.5, "no finite energy", ha="center", transform=ax.transAxes)
        return _save(fig, path)
    span = max(ends) - min(ends) or 1.0
    edges = np.linspace(min(ends) - 0.1 * span, max(ends) + 0.1 * span, bins + 1)
    beyond = float(np.mean(~(u_bg <= edges[-1])))
    failed = int(np.sum(~ok))
    ax.hist(u_bg[ok], bins=edges, density=True, histtype="step", color=COLOURS["BG"], lw=1.2,
            label=f"BG raw ({beyond:.1%} beyond the axis, {failed:,} failed)")  # fmt: skip
    if w is not None and w.sum() > 0:
        ax.hist(u_bg[ok], bins=edges, weights=w, density=True, color=COLOURS["BG"], alpha=0.35,
                label="BG reweighted")  # fmt: skip
    if np.isfinite(u_md).any():
        ax.hist(u_md[np.isfinite(u_md)], bins=edges, density=True, histtype="step", lw=1.6,
                color=COLOURS["MD"], label=f"MD ({u_md.size:,} frames)")  # fmt: skip
    ax.set_xlabel("reduced energy u = U/kT (kT)")
    ax.set_ylabel("density (1/kT)")
    ax.legend(fontsize=8)
    ax.set_title("Energies at the target temperature")
    return _save(fig, path)


def validation_trend(metrics: dict[str, np.ndarray]) -> dict[str, float] | None:
    """Whether validation NLL climbs (overfitting) before annealing, from metrics.csv columns
    (``step``, ``val_nll`` and optionally ``phase``, strings): its minimum and the step of it,
    the last value, and ``rise`` = last − minimum (nats). Annealing rows are left out: there the
    target moves away from the validation frames' temperature and the NLL rises by design.
    None without validation values."""
    step = np.asarray(metrics.get("step", []), dtype=np.float64)
    val = np.asarray(metrics.get("val_nll", np.full(step.size, np.nan)), dtype=np.float64)
    keep = np.isfinite(val)
    if "phase" in metrics:
        keep &= np.asarray(metrics["phase"]).astype(str) != "anneal"
    if not keep.any():
        return None
    s, v = step[keep], val[keep]
    i = int(np.argmin(v))
    return {"min": float(v[i]), "step_min": float(s[i]), "last": float(v[-1]),
            "step_last": float(s[-1]), "rise": float(v[-1] - v[i])}  # fmt: skip


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) index ranges of equal consecutive values."""
    cut = np.flatnonzero(values[1:] != values[:-1]) + 1
    return list(itertools.pairwise([0, *cut.tolist(), len(values)]))


def plot_training_curve(path: str | Path, metrics: dict[str, np.ndarray]) -> Path:
    """One run's training from its metrics.csv columns: ``step``, ``nll`` (thin) and ``val_nll``
    (thick, with its lowest point before annealing marked; a rise after it while the training
    NLL falls is overfitting) on the left axis in nats; ``val_ess`` (fraction, drawn in %, log
    axis) on the right; the ``phase`` column (strings: nll, mixed, anneal) shaded; annealing
    stages marked with their ``anneal_temperature`` (K). Columns may be absent or NaN."""
    plt = _pyplot()
    step = np.asarray(metrics["step"], dtype=np.float64)

    def col(key: str) -> np.ndarray:
        nan = np.full(step.size, np.nan)
        return np.asarray(metrics[key], np.float64) if key in metrics else nan

    fig, ax = plt.subplots(figsize=(8.0, 4.4))
    if "phase" in metrics and step.size:
        phase = np.asarray(metrics["phase"]).astype(str)
        seen = set()
        for a, b in _runs(phase):
            end = step[b] if b < step.size else step[-1]
            name = phase[a]
            ax.axvspan(step[a], end, color=PHASE_COLOURS.get(name, "0.9"), lw=0, zorder=0,
                       label=None if name in seen else PHASE_NAMES.get(name, name))  # fmt: skip
            seen.add(name)
    temps = col("anneal_temperature")
    marks = np.flatnonzero(np.isfinite(temps) & np.r_[True, ~np.isclose(temps[1:], temps[:-1])])
    if marks.size > 8:
        marks = marks[np.linspace(0, marks.size - 1, 8).round().astype(int)]
    for i in marks:
        ax.axvline(step[i], color="0.5", lw=0.6, ls=":")
        ax.text(step[i], 1.0, f"{temps[i]:.0f} K", transform=ax.get_xaxis_transform(),
                rotation=90, fontsize=7, va="top", ha="right", color="0.3")  # fmt: skip
    nll, val = col("nll"), col("val_nll")
    ok = np.isfinite(nll)
    ax.plot(step[ok], nll[ok], color="C0", lw=0.7, alpha=0.7, label="training NLL")
    ok = np.isfinite(val)
    ax.plot(step[ok], val[ok], color="C0", lw=2.0, marker=".", label="validation NLL")
    trend = validation_trend(metrics)
    if trend is not None:
        ax.plot([trend["step_min"]], [trend["min"]], "v", color="C3", ms=8,
                label=f"lowest val NLL; then {trend['rise']:+.2f} nats by step "
                      f"{trend['step_last']:,.0f}")  # fmt: skip
    values = np.concatenate([nll[np.isfinite(nll)], val[np.isfinite(val)]])
    if values.size:
        low, high = np.percentile(values, [0.5, 97])
        ax.set_ylim(low - 2, high + 2)
    ax.set_xlabel("step")
    ax.set_ylabel("NLL (nats)")
    handles, labels = ax.get_legend_handles_labels()
    ess = col("val_ess")
    ok = np.isfinite(ess) & (ess > 0)  # a log axis cannot show 0
    if ok.any():
        ax2 = ax.twinx()
        line = ax2.plot(step[ok], 100 * ess[ok], color="C2", lw=1.6, marker="o", ms=3,
                        label="validation reverse ESS (%)")  # fmt: skip
        ax2.set_yscale("log")
        ax2.set_ylim(max(100 * ess[ok].min() / 3, 1e-4), 100)
        ax2.set_ylabel("validation reverse ESS (%)", color="C2")
        handles += line
        labels += [line[0].get_label()]
    ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
    ax.set_title("Training: NLL, validation NLL and reverse ESS")
    return _save(fig, path)
