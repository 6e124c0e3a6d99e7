"""metrics.json and report.md of an analysis: one table comparing MD and every model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["ROWS", "markdown_table", "write_metrics_json", "write_report_md"]

# (key in a model's metrics, key in the reference metrics or None, label, format)
ROWS: list[tuple[str, str | None, str, str]] = [
    ("n_samples", "n", "samples / frames", "{:,.0f}"),
    ("n_failed_energies", None, "failed energies (u = +inf)", "{:,.0f}"),
    ("n_nonfinite_positions", None, "non-finite positions", "{:,.0f}"),
    ("mean_u", "mean_u", "mean u", "energy"),
    ("median_u", "median_u", "median u", "energy"),
    ("energy_shift", None, "mean energy shift vs MD", "energy"),
    ("energy_shift_finite", None, "… over finite samples", "energy"),
    ("median_energy_shift", None, "median energy shift vs MD", "energy"),
    ("energy_shift_low", None, "mean shift of the low-energy samples vs MD", "energy"),
    ("low_energy_fraction", "low_energy_fraction", "low-energy fraction (u < max u train)",
     "{:.1%}"),
    ("reverse_ess", None, "reverse ESS", "ess"),
    ("forward_ess", None, "forward ESS (MD frames)", "ess"),
    ("forward_log_w_spread", None, "… max − median log w over MD frames (nats)", "{:.1f}"),
    ("forward_top_phi_positive", None, "… φ > 0 share of the 10 heaviest MD frames", "{:.0%}"),
    ("kl_rama", "kl_rama_floor", "Ramachandran KL 64×64, raw (MD: floor)", "{:.4f}"),
    ("kl_rama_reweighted", None, "Ramachandran KL, reweighted", "{:.4f}"),
    ("kl_rama_matched", "kl_rama_floor", "… at the floor's size (MD 1st half vs n_matched samples)",
     "{:.4f}"),
    ("kl_rama_reweighted_matched", None, "… reweighted, at the floor's size", "{:.4f}"),
    ("kl_phi", "kl_phi_floor", "φ KL 200 bins, raw (MD: floor)", "{:.4f}"),
    ("kl_phi_reweighted", None, "φ KL, reweighted", "{:.4f}"),
    ("kl_psi", "kl_psi_floor", "ψ KL 200 bins, raw (MD: floor)", "{:.4f}"),
    ("kl_psi_reweighted", None, "ψ KL, reweighted", "{:.4f}"),
    ("delta_f", "delta_f", "ΔF φ>0 vs φ<0, raw (kT)", "{:.2f}"),
    ("delta_f_reweighted", None, "ΔF, reweighted (kT)", "{:.2f}"),
    ("chirality_violations", "chirality_violations", "D-form share", "{:.2%}"),
]  # fmt: skip


def _format(value: Any, fmt: str, kT: float | None = None) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("+inf" if value > 0 else "−inf")
    if fmt == "energy":  # reduced units, and kJ/mol when kT is known (DESIGN.md §2)
        return f"{value:.2f} kT" + (f" ({value * kT:.1f} kJ/mol)" if kT else "")
    if fmt == "ess":  # a fraction that can be astronomically small: keep it readable
        return f"{value:.2%}" if value == 0 or value >= 1e-4 else f"{value:.1e}"
    return fmt.format(value)


def markdown_table(
    reference: dict[str, Any], models: dict[str, dict[str, Any]], kT: float | None = None
) -> str:
    """Rows = metrics, columns = MD then each model (DESIGN.md §5 definitions); energies in kT
    and, given ``kT`` (kJ/mol), in kJ/mol."""
    header = ["metric", "MD (reference)", *models]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, ref_key, label, fmt in ROWS:
        cells = [label, _format(reference.get(ref_key) if ref_key else None, fmt, kT)]
        cells += [_format(m.get(key), fmt, kT) for m in models.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    """JSON has no inf/NaN: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_metrics_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write every metric (non-finite values as strings, so that any JSON reader accepts it)."""
    path = Path(path)
    _atomic_write(path, json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")
    return path


def write_report_md(
    path: str | Path,
    reference: dict[str, Any],
    models: dict[str, dict[str, Any]],
    info: dict[str, Any],
    figures: list[str],
) -> Path:
    """report.md: what was compared, the metrics table, the figures, and how to read them."""
    path = Path(path)
    lines = [
        "# p4bg analysis report",
        "",
        f"Reference: `{info['reference']}` ({info['split']} split, {reference['n']:,} frames, "
        f"T = {info['temperature_K']:g} K, kT = {info['kT_kJ_per_mol']:.4f} kJ/mol). "
        f"Low-energy threshold: max u of the training frames = {info['u_train_max']:.2f} kT.",
        "",
    ]
    for name, meta in info.get("runs", {}).items():
        lines.append(f"- `{name}`: {meta}")
    lines += [
        "",
        markdown_table(reference, models, info["kT_kJ_per_mol"]),
        "",
        "Definitions (DESIGN.md §5): log w = −u − log q; reverse ESS = Kish ESS / N of the "
        "samples; forward ESS = 1/(mean w · mean 1/w) on the MD frames; KL = Σ p log((p+ε)/(q+ε)) "
        "ΔφΔψ with p = MD, q = model; the MD column's KL is the floor (first vs second half of "
        "the reference frames); 'at the floor's size' compares the model with as many samples "
        "as the floor has (the KL grows as samples get fewer); ΔF = −ln(P(φ>0)/P(φ<0)). "
        "Failed samples count in N with weight 0.",
        "",
    ]
    lines += [f"![{Path(f).stem}]({f})" for f in figures]
    _atomic_write(path, "\n".join(lines) + "\n")
    return path
