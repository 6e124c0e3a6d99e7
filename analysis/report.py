"""metrics.json and report.md of an analysis: one table comparing MD and every model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = [
    "ROWS",
    "bg_value_lines",
    "markdown_table",
    "metrics_json_text",
    "report_md_text",
]

# (key in a model's metrics or None, key in the reference metrics or None, label, format).
# Format "delta_f" prints "x ± y kT" with the error from the key + "_err".
ROWS: list[tuple[str | None, str | None, str, str]] = [
    ("n_samples", "n", "samples / frames", "{:,.0f}"),
    ("n_failed_energies", None, "failed energies (u = +inf)", "{:,.0f}"),
    ("n_nonfinite_positions", None, "non-finite positions", "{:,.0f}"),
    ("mean_u", "mean_u", "mean u", "energy"),
    ("median_u", "median_u", "median u", "energy"),
    ("energy_shift", None, "mean energy shift vs MD", "energy"),
    ("energy_shift_finite", None, "… over finite samples", "energy"),
    ("median_energy_shift", None, "median energy shift vs MD", "energy"),
    ("energy_shift_low", None, "mean shift of the low-energy samples vs MD", "energy"),
    ("u_train_max", "u_train_max", "max u of the training data (threshold)", "energy"),
    ("low_energy_fraction", "low_energy_fraction", "low-energy fraction (u < max u train)",
     "{:.1%}"),
    ("high_energy_fraction", "high_energy_fraction",
     "share above max u train (u ≥ max u train or failed)", "{:.1%}"),
    ("reverse_ess", None, "reverse ESS", "ess"),
    ("reverse_ess_clipped", None, "reverse ESS (clipped top 1e-4)", "ess"),
    ("forward_ess", None, "forward ESS (MD frames)", "ess"),
    ("forward_log_w_spread", None, "… max − median log w over MD frames (nats)", "{:.1f}"),
    ("forward_top_phi_positive", None, "… φ > 0 share of the 10 heaviest MD frames", "{:.0%}"),
    ("log_z_reverse", None, "log Ẑ reverse = LSE(log w) − ln N (samples)", "{:.3f}"),
    ("log_z_forward", None, "log Ẑ forward = −(LSE(−log w) − ln M) (MD frames)", "{:.3f}"),
    ("log_z_gap", None, "log Z gap forward − reverse (clearly < 0: log q not normalised)",
     "{:+.3f}"),
    ("eubo", None, "EUBO = mean log w over MD frames (nats; ≥ log Z, lower is better)",
     "{:.3f}"),
    ("forward_kl", None, "… EUBO − log Ẑ reverse: KL(MD ‖ model) estimate (nats)", "{:.3f}"),
    ("kl_rama", "kl_rama_floor", "Ramachandran KL 64×64, raw (MD: floor)", "{:.4f}"),
    ("kl_rama_reweighted", None, "Ramachandran KL, reweighted", "{:.4f}"),
    ("kl_rama_matched", "kl_rama_floor", "… at the floor's size (MD 1st half vs n_matched samples)",
     "{:.4f}"),
    ("kl_rama_reweighted_matched", None, "… reweighted, at the floor's size", "{:.4f}"),
    ("tv_rama", "tv_rama_floor", "Ramachandran TV 64×64, raw (MD: floor)", "{:.4f}"),
    ("tv_rama_reweighted", None, "Ramachandran TV, reweighted", "{:.4f}"),
    ("tv_rama_matched", "tv_rama_floor", "… at the floor's size (MD 1st half vs n_matched samples)",
     "{:.4f}"),
    ("tv_rama_reweighted_matched", None, "… reweighted, at the floor's size", "{:.4f}"),
    ("kl_phi", "kl_phi_floor", "φ KL 200 bins, raw (MD: floor)", "{:.4f}"),
    ("kl_phi_reweighted", None, "φ KL, reweighted", "{:.4f}"),
    ("kl_psi", "kl_psi_floor", "ψ KL 200 bins, raw (MD: floor)", "{:.4f}"),
    ("kl_psi_reweighted", None, "ψ KL, reweighted", "{:.4f}"),
    ("delta_f", "delta_f", "ΔF φ>0 vs φ<0, raw", "delta_f"),
    ("delta_f_reweighted", None, "ΔF, reweighted", "delta_f"),
    ("chirality_violations", "chirality_violations", "D-form share", "{:.2%}"),
    (None, "tau_phi_frames", "MD τ of the φ>0 indicator (1 + 2Σρ, frames)", "{:.1f}"),
    (None, "tau_phi_ps", "… in ps", "{:.1f}"),
    (None, "basin_transitions", "MD φ>0 ↔ φ<0 changes between frames", "{:,.0f}"),
    (None, "independent_samples", "MD independent samples (frames / τ)", "{:,.0f}"),
    (None, "seconds_per_frame", "MD wall seconds per frame (all workers)", "{:.3g}"),
    ("md_independent_samples_per_second", "independent_samples_per_second",
     "MD independent samples / s", "{:.3g}"),
    ("sampling_seconds", None, "BG sampling wall time (s)", "{:.1f}"),
    ("bg_effective_samples_per_second", None, "BG effective samples / s (reverse ESS · N / s)",
     "{:.3g}"),
    ("bg_value", None, "BG value (BG effective / MD independent samples per s)", "{:.3g}"),
]  # fmt: skip


def _format(value: Any, fmt: str, kT: float | None = None, err: Any = None) -> str:
    if value is None:
        return "–"
    if fmt == "delta_f":  # every ΔF carries its uncertainty (docs/design.md §5), even if infinite
        return f"{_format(value, '{:.2f}')} ± {_format(err, '{:.2f}')} kT"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("+inf" if value > 0 else "−inf")
    if fmt == "energy":  # reduced units, and kJ/mol when kT is known (docs/design.md §2)
        return f"{value:.2f} kT" + (f" ({value * kT:.1f} kJ/mol)" if kT else "")
    if fmt == "ess":  # a fraction that can be astronomically small: keep it readable
        return f"{value:.2%}" if value == 0 or value >= 1e-4 else f"{value:.1e}"
    return fmt.format(value)


def _cell(metrics: dict[str, Any], key: str | None, fmt: str, kT: float | None) -> str:
    if key is None:
        return "–"
    if fmt == "delta_f" and metrics.get(key + "_note"):
        return str(metrics[key + "_note"])  # no number where the data cannot give one
    err = metrics.get(key + "_err", math.nan) if fmt == "delta_f" else None
    return _format(metrics.get(key), fmt, kT, err)


def markdown_table(
    reference: dict[str, Any], models: dict[str, dict[str, Any]], kT: float | None = None
) -> str:
    """Rows = metrics, columns = MD then each model (docs/design.md §5 definitions); energies in kT
    and, given ``kT`` (kJ/mol), in kJ/mol; ΔF as "x ± y kT"."""
    header = ["metric", "MD (reference)", *models]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, ref_key, label, fmt in ROWS:
        cells = [label, _cell(reference, ref_key, fmt, kT)]
        cells += [_cell(m, key, fmt, kT) for m in models.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _tau_warning(reference: dict[str, Any]) -> str:
    tau = reference.get("tau_phi_frames")
    if reference.get("tau_phi_note"):
        return f" ({reference['tau_phi_note']}: no τ, no rate, no BG value)"
    if tau is None:
        return ""
    if not (isinstance(tau, float) and math.isfinite(tau)):
        return (" (τ could not be estimated: no change of φ basin, or series too short for "
                "an autocorrelation window)")  # fmt: skip
    if not reference.get("tau_phi_reliable", True):
        return " (replicas shorter than 50 τ: τ is likely underestimated, MD flattered)"
    return ""


def bg_value_lines(reference: dict[str, Any], models: dict[str, dict[str, Any]]) -> list[str]:
    """The headline: each run's BG value with its ingredients."""
    md = reference.get("independent_samples_per_second", math.nan)
    f = _format
    lines = [
        "## BG value",
        "",
        "BG effective samples per wall second (reverse ESS · N / sampling seconds, the seconds "
        "covering sampling, energies and weights) divided by MD independent samples per wall "
        "second (frames / τ of the φ>0 indicator, τ = 1 + 2Σρ, over the MD seconds of those "
        "frames = frames · steps per frame / total steps per second of the dataset's run).",
        "",
        f"- MD: τ = {f(reference.get('tau_phi_frames'), '{:.1f}')} frames = "
        f"{f(reference.get('tau_phi_ps'), '{:.1f}')} ps, "
        f"{f(reference.get('independent_samples'), '{:,.0f}')} independent samples in "
        f"{f(reference.get('md_seconds'), '{:,.1f}')} s "
        f"({f(reference.get('seconds_per_frame'), '{:.3g}')} s/frame) → "
        f"{f(md, '{:.3g}')} independent samples / s" + _tau_warning(reference),
    ]
    for name, m in models.items():
        lines.append(
            f"- `{name}`: reverse ESS {f(m.get('reverse_ess'), 'ess')} · "
            f"{f(m.get('n_samples'), '{:,.0f}')} samples / "
            f"{f(m.get('sampling_seconds'), '{:.1f}')} s = "
            f"{f(m.get('bg_effective_samples_per_second'), '{:.3g}')} effective samples / s → "
            f"**BG value {f(m.get('bg_value'), '{:.3g}')}**"
        )
    return lines


def _jsonable(value: Any) -> Any:
    """JSON has no inf/NaN: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def metrics_json_text(data: dict[str, Any]) -> str:
    """metrics.json's text: every metric, non-finite values as strings, so that any JSON reader
    accepts it."""
    return json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n"


def report_md_text(
    reference: dict[str, Any],
    models: dict[str, dict[str, Any]],
    info: dict[str, Any],
    figures: list[str],
    sections: list[str] | None = None,
) -> str:
    """report.md's text: what was compared, the metrics table, the figures, and how to read them.
    figures: paths of the PNGs relative to the report; sections: more lines (the per-residue
    ones, :func:`residue_report_lines`) placed before the figures."""
    lines = [
        "# p4bg analysis report",
        "",
        f"Reference: `{info['reference']}` ({info['split']} split, {reference['n']:,} frames, "
        f"T = {info['temperature_K']:g} K, kT = {info['kT_kJ_per_mol']:.4f} kJ/mol). "
        f"Low-energy threshold of the MD column and energies.png: max u of the training frames "
        f"= {info['u_train_max']:.2f} kT ({info.get('u_train_max_source', 'training split')}); "
        "each run's own threshold is in the table.",
        "",
    ]
    if "delta_f_source" in reference:
        frames = (f"its frames alone: {reference['delta_f_frames_note']}"
                  if reference.get("delta_f_frames_note") else
                  f"its frames alone give {reference['delta_f_frames']:.3f} ± "
                  f"{reference['delta_f_frames_err']:.3f} kT")  # fmt: skip
        lines += [f"The reference's ΔF is {reference['delta_f']:.3f} ± "
                  f"{reference['delta_f_err']:.3f} kT from {reference['delta_f_source']}, "
                  f"recorded with the dataset; {frames}.", ""]  # fmt: skip
    for name, meta in info.get("runs", {}).items():
        lines.append(f"- `{name}`: {meta}")
    notes = info.get("notes", [])
    if notes:
        lines += ["", *[f"> Note: {n}" for n in notes]]
    lines += ["", *bg_value_lines(reference, models)]
    lines += [
        "",
        "## Metrics",
        "",
        markdown_table(reference, models, info["kT_kJ_per_mol"]),
        "",
        "Definitions (docs/design.md §5): log w = −u − log q; reverse ESS = Kish ESS / N of the "
        "samples; 'clipped top 1e-4' = the same after setting the ceil(1e-4·N) largest weights "
        "to the smallest of them (TA-BG's convention); forward ESS = 1/(mean w · mean 1/w) on "
        "the MD frames; log Ẑ reverse ≤ log Z ≤ log Ẑ forward in expectation, so a clearly "
        "negative gap means log q is not a normalised density of the samples; KL = "
        "Σ p log((p+ε)/(q+ε)) ΔφΔψ with p = MD, q = model; the MD column's KL is the floor "
        "(first vs second half of the reference frames); 'at the floor's size' compares the "
        "model with as many samples as the floor has (the KL grows as samples get fewer); "
        "ΔF = −ln(P(φ>0)/P(φ<0)) ± one standard error: for MD the larger of block averaging "
        "(Flyvbjerg–Petersen, per replica) and the spread between replicas, for samples the "
        "delta method with the (importance) weights, ≈ sqrt(p(1−p)/n_eff)/(p(1−p)). "
        "Failed samples count in N with weight 0.",
        "",
    ]
    lines += sections or []
    lines += [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _value(m: dict[str, Any], key: str, note_key: str | None = None) -> str:
    if note_key and m.get(note_key):
        return "n/m"
    value, err = m.get(key), m.get(f"{key}_err")
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "–"
    return f"{value:.2f} ± {err:.2f}" if isinstance(err, int | float) else f"{value:.3f}"


def _tv(m: dict[str, Any], key: str) -> str:
    """A total variation, or '–' where it is missing (metrics from before it) or not finite."""
    value = m.get(key)
    return f"{value:.3f}" if isinstance(value, int | float) and math.isfinite(value) else "–"


def residue_report_lines(residues: dict[str, Any], tica: dict[str, Any] | None) -> list[str]:
    """The per-residue section of report.md: a table of every residue's Ramachandran KL (raw,
    reweighted, floor) and ΔF(φ>0 vs φ<0) (MD, each model reweighted), and the joint view's
    KL on the TICA plane; 'n/m' marks a ΔF that is not measurable (too few transitions or
    effective samples; metrics.json says which)."""
    if not residues:
        return []
    names = list(next(iter(residues.values()))["models"])
    header = ["residue", "KL floor", "TV floor", "ΔF reference (kT)"]
    for name in names:
        header += [f"{name} KL raw", f"{name} KL rew.", f"{name} TV rew.",
                   f"{name} ΔF rew. (kT)"]  # fmt: skip
    lines = ["## Per residue", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]  # fmt: skip
    for label, entry in residues.items():
        ref = entry["reference"]
        row = [label, f"{ref['kl_rama_floor']:.3f}", _tv(ref, "tv_rama_floor"),
               _value(ref, "delta_f", "delta_f_note")]  # fmt: skip
        for name in names:
            m = entry["models"][name]
            row += [f"{m['kl_rama']:.3f}", f"{m['kl_rama_reweighted']:.3f}",
                    _tv(m, "tv_rama_reweighted"),
                    _value(m, "delta_f_reweighted", "delta_f_reweighted_note")]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "KL, TV (total variation, 64 × 64) and ΔF as in the metrics table, for each "
              "residue's own φ and ψ; the floors compare the halves of the reference frames. "
              "The reference ΔF is the frames' own unless a source is named here:"]  # fmt: skip
    sources = [f"- {label}: {entry['reference']['delta_f_source']} (the frames' own: "
               f"{_value(entry['reference'], 'delta_f_frames', 'delta_f_frames_note')} kT)"
               for label, entry in residues.items()
               if entry["reference"].get("delta_f_source")]  # fmt: skip
    lines += sources or ["- none"]
    if tica:
        lines += ["", "## Joint view: TICA", "",
                  f"The first two time-lagged independent components of (cos, sin) of every φ "
                  f"and ψ, fitted on the reference's time series at a lag of {tica['lag_frames']} "
                  f"frames (autocorrelations {', '.join(f'{v:.3f}' for v in tica['eigenvalues'])})"
                  f"; KL on a {tica['bins']} × {tica['bins']} grid over the reference's range: "
                  f"floor {tica['kl_floor']:.3f}."]  # fmt: skip
        for name, m in tica["models"].items():
            lines.append(f"- `{name}`: KL {m['kl']:.3f} raw, {m['kl_reweighted']:.3f} reweighted")
    return [*lines, ""]
