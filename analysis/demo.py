"""Numbers and report of the demo (issue 28): a Boltzmann generator against plain MD given the
same CPU seconds, both against a shipped reference, at the target temperature.

Each quantity is a :class:`Measurement`: a value ± standard error, or no value and a note on why
the data at hand cannot give one ("not measurable here: ..."). The rules:

- **MD ΔF(φ>0 vs φ<0)** needs ≥ :data:`MIN_TRANSITIONS` committed basin changes each way
  (:func:`committed_transitions`). P(φ>0) then averages k dwell times, with a relative error
  of about √(2/k) (Poisson visits, exponential dwells): ±0.45 kT at k = 10, already more than
  the 0.3 kT asked of the BG; with fewer, blocking finds no plateau and the error cannot be
  estimated. With no visit the data bound only the rate of entry, < 3/T (95 %, "rule of three"
  over T ns), not ΔF = that rate × the unmeasured time per visit: the note gives the rate bound.
- **MD τ of the φ>0 indicator** needs the same, a Sokal window and segments ≥ 50 τ long.
- **BG ΔF** needs a Kish count ``(Σ_B w)² / Σ_B w²`` ≥ :data:`MIN_BASIN_ESS` in each basin B,
  the count its binomial error rests on: with fewer, P(φ>0) is uncertain by > 1/√10 ≈ 30 % and
  the delta-method error (which sees only the weights drawn) is unreliable.
- **Ramachandran KL** against the floor (the reference's first half vs its second) at the
  floor's size, p = the reference's first half: the BG's first n/2 samples reweighted among
  themselves (as analysis.summary); MD's frames thinned evenly to n/2 (all its time kept), or
  all of them when fewer.

Inputs: :class:`BGSamples`, :class:`MDRun`, :class:`Reference` (radians, kT, ps). Figures:
analysis.demo_plots. Text is returned, never written here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from analysis.metrics import (
    MIN_BASIN_ESS,
    basin_ess,
    delta_f_with_error,
    integrated_autocorrelation_time,
    md_delta_f,
    normalised_weights,
    ramachandran_kl,
    reverse_ess,
    reverse_ess_clipped,
)
from analysis.summary import split_halves
from analysis.timeseries import MIN_TRANSITIONS, TRANSITION_MARGIN, committed_transitions

__all__ = [
    "DELTA_F_TOLERANCE", "ESS_THRESHOLD", "KL_FLOOR_FACTOR", "MIN_BASIN_ESS", "MIN_TRANSITIONS",
    "TRANSITION_MARGIN", "BGSamples", "MDRun", "Measurement", "Reference", "basin_ess",
    "bg_delta_f", "committed_transitions", "demo_metrics", "demo_report_md",
    "md_delta_f_measurement", "md_tau_phi",
]  # fmt: skip

ESS_THRESHOLD = 0.10  # issue 28: reverse ESS ≥ 10 %
DELTA_F_TOLERANCE = 0.3  # issue 28: |ΔF − reference| ≤ 0.3 kT
KL_FLOOR_FACTOR = 2.0  # issue 28: Ramachandran KL ≤ 2 × floor
RULE_OF_THREE = -math.log(0.05)  # ≈ 3.0: 95 % upper bound of a Poisson mean after 0 events


@dataclass(frozen=True)
class Measurement:
    """A value with its standard error (None when it has none), or ``value=None`` and a note
    saying why it cannot be estimated from the data at hand. A note beside a value is a caveat."""

    value: float | None
    err: float | None = None
    note: str | None = None

    @classmethod
    def missing(cls, reason: str) -> Measurement:
        return cls(None, None, f"not measurable here: {reason}")

    @property
    def measured(self) -> bool:
        return self.value is not None and math.isfinite(self.value)

    def text(self, fmt: str = "{:.2f}", unit: str = "") -> str:
        """``"3.81 ± 0.09 kT"``, or the note when there is no value."""
        if not self.measured:
            return self.note or "not measurable here"
        out = fmt.format(self.value)
        if self.err is not None and math.isfinite(self.err):
            out += " ± " + fmt.replace("+", "").format(self.err)
        return out + (f" {unit}" if unit else "")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(p, np.float64) for p in parts]) if parts else np.zeros(0)


@dataclass(frozen=True)
class BGSamples:
    """The BG's samples at the target temperature, each array of shape (n,): phi, psi in radians;
    u in kT (+inf where the energy failed); log_w = −u − log q (−inf for failed samples, which
    stay in every count with weight 0). cpu_seconds: what the BG cost (training and sampling)."""

    phi: np.ndarray
    psi: np.ndarray
    u: np.ndarray
    log_w: np.ndarray
    cpu_seconds: float | None = None

    def __post_init__(self) -> None:
        n = len(self.phi)
        if n == 0 or any(len(a) != n for a in (self.psi, self.u, self.log_w)):
            lengths = [len(a) for a in (self.phi, self.psi, self.u, self.log_w)]
            raise ValueError(f"BGSamples: phi, psi, u, log_w need one length > 0, got {lengths}")


@dataclass(frozen=True)
class MDRun:
    """Plain MD at the target temperature as contiguous time series (one per replica or chunk
    run, in time order): lists of arrays phi, psi (radians) and u (kT) per segment, frames every
    ``dt_ps`` ps. cpu_seconds: what it cost."""

    phi: list[np.ndarray]
    psi: list[np.ndarray]
    u: list[np.ndarray]
    dt_ps: float
    cpu_seconds: float | None = None

    def __post_init__(self) -> None:
        lengths = [[len(p) for p in parts] for parts in (self.phi, self.psi, self.u)]
        if lengths[1:] != lengths[:1] * 2 or not self.dt_ps > 0:
            raise ValueError(f"MDRun: phi, psi, u need the same segment lengths, got {lengths}, "
                             f"and dt_ps > 0 ps, got {self.dt_ps}")  # fmt: skip

    @property
    def n_frames(self) -> int:
        return int(sum(len(p) for p in self.phi))

    @property
    def ns(self) -> float:
        """Simulated time of all segments together (each frame stands for dt_ps)."""
        return self.n_frames * self.dt_ps / 1000.0

    def all(self, name: str) -> np.ndarray:
        """One of phi, psi, u over all segments, shape (n_frames,)."""
        return _joined(getattr(self, name))

    def segment_indices(self) -> list[np.ndarray]:
        """Index arrays of each segment into :meth:`all`'s arrays (analysis.timeseries form)."""
        ends = np.cumsum([0, *[len(p) for p in self.phi]])
        return [np.arange(a, b) for a, b in itertools.pairwise(ends) if b > a]


@dataclass(frozen=True)
class Reference:
    """The shipped reference: frames at the target temperature as segments (phi, psi in radians;
    their first half against their second half is the KL floor) and a ΔF(φ>0 vs φ<0) in kT with
    its standard error, made by the method ``source`` describes; seconds it took, if known."""

    phi: list[np.ndarray]
    psi: list[np.ndarray]
    delta_f: float
    delta_f_err: float
    source: str
    seconds: float | None = None

    def all(self, name: str) -> np.ndarray:
        """phi or psi over all segments, shape (n_frames,)."""
        return _joined(getattr(self, name))


def _too_few_transitions(md: MDRun, margin: float, what: str, bound: bool) -> Measurement | None:
    """The "not measurable" of MD's ΔF and τ (module docstring), or None when there are enough
    committed transitions each way."""
    if md.n_frames == 0:
        return Measurement.missing("no MD frames")
    into, out = committed_transitions(md.phi, margin)
    if into == 0 and out == 0:
        side = "φ > 0" if np.mean(md.all("phi") > 0) < 0.5 else "φ < 0"
        why = (f"; that bounds the rate of entry (< {RULE_OF_THREE / md.ns:.3g} per ns, 95 %), "
               f"not {what}, since the time per visit is unknown") if bound else ""  # fmt: skip
        return Measurement.missing(f"no transition into {side} in {md.ns:.3g} ns of MD{why}")
    if min(into, out) < MIN_TRANSITIONS:
        return Measurement.missing(
            f"{into} transition{'s' * (into != 1)} into φ > 0 and {out} out of it in "
            f"{md.ns:.3g} ns of MD; {what} needs at least {MIN_TRANSITIONS} each way")  # fmt: skip
    return None


def md_delta_f_measurement(md: MDRun, margin: float = TRANSITION_MARGIN) -> Measurement:
    """ΔF(φ>0 vs φ<0) of the MD frames in kT ± the larger of the block-averaging and between-
    segment errors (analysis.metrics.md_delta_f), or not measurable (module docstring)."""
    missing = _too_few_transitions(md, margin, "ΔF", bound=True)
    if missing is not None:
        return missing
    result = md_delta_f(md.all("phi"), md.segment_indices())
    note = None
    if not result.get("blocking_converged", True):
        note = "block averaging found no plateau: the error is a lower bound"
    return Measurement(result["delta_f"], result["delta_f_err"], note)


def md_tau_phi(md: MDRun, margin: float = TRANSITION_MARGIN) -> Measurement:
    """Integrated autocorrelation time (1 + 2Σρ, pooled over the segments) of the φ>0 indicator
    in ps, or not measurable (module docstring)."""
    missing = _too_few_transitions(md, margin, "a correlation time", bound=False)
    if missing is not None:
        return missing
    series = [(np.asarray(p) > 0).astype(np.float64) for p in md.phi if len(p) >= 2]
    tau = integrated_autocorrelation_time(series)
    if not math.isfinite(tau):
        return Measurement.missing("the series are too short for an autocorrelation window")
    if md.n_frames / len(series) < 50 * tau:
        return Measurement.missing(f"segments shorter than 50 τ (τ ≳ {tau * md.dt_ps:.3g} ps): "
                                   "τ would be underestimated")  # fmt: skip
    return Measurement(tau * md.dt_ps)


def bg_delta_f(bg: BGSamples) -> Measurement:
    """Reweighted ΔF(φ>0 vs φ<0) of the BG in kT ± its delta-method error over the weights
    (analysis.metrics.delta_f_with_error), or not measurable (module docstring)."""
    try:
        w = normalised_weights(bg.log_w)
    except ValueError:
        return Measurement.missing("no BG sample has a finite weight")
    pos, neg = basin_ess(bg.phi, w)
    if min(pos, neg) < MIN_BASIN_ESS:
        n_pos = int(np.sum(np.asarray(bg.phi) > 0))
        return Measurement.missing(
            f"{min(pos, neg):.1f} effective samples in the {'φ > 0' if pos < neg else 'φ < 0'} "
            f"basin ({n_pos:,} of {len(bg.phi):,} samples have φ > 0); fewer than "
            f"{MIN_BASIN_ESS:g} give no error estimate")  # fmt: skip
    value, err = delta_f_with_error(bg.phi, w)
    return Measurement(value, err)


def _difference(a: Measurement, b: Measurement, what: str) -> Measurement:
    if not a.measured or not b.measured:
        return Measurement.missing(f"{what} is not measurable")
    # an unknown error stays unknown: it is not a zero
    err = None if a.err is None or b.err is None else math.hypot(a.err, b.err)
    return Measurement(a.value - b.value, err)  # type: ignore[operator]


def _kl(p_phi: np.ndarray, p_psi: np.ndarray, q_phi: np.ndarray, q_psi: np.ndarray,
        log_w: np.ndarray | None = None) -> Measurement:  # fmt: skip
    """Ramachandran KL(p ‖ q), q reweighted by log_w, or not measurable when p or q has no
    sample with finite angles and weight."""
    try:
        w = None if log_w is None else normalised_weights(log_w)
        return Measurement(ramachandran_kl(p_phi, p_psi, q_phi, q_psi, w))
    except ValueError:
        return Measurement.missing("no sample with finite angles and weight")


def _ratio(kl: Measurement, floor: Measurement) -> Measurement:
    if not kl.measured or not floor.measured or not floor.value > 0:  # type: ignore[operator]
        return Measurement.missing("no KL or no floor")
    return Measurement(kl.value / floor.value)  # type: ignore[operator]


def _check(name: str, m: Measurement, threshold: float, fmt: str, unit: str,
           at_least: bool = False) -> dict[str, Any]:  # fmt: skip
    """One acceptance check: m's value against the threshold (≥ or ≤), ``shown`` as text;
    failed when m has no value."""
    value = m.value if m.measured else None
    passed = value is not None and (value >= threshold if at_least else value <= threshold)
    return {"check": name, "value": value, "threshold": threshold, "passed": passed,
            "shown": m.text(fmt, unit), "note": m.note}  # fmt: skip


def demo_metrics(bg: BGSamples, md: MDRun, reference: Reference) -> dict[str, Any]:
    """Every number of the demo's report, JSON-ready (Measurements as ``{value, err, note}``;
    analysis.report.metrics_json_text writes non-finite ones): ``bg``, ``md``, ``reference``
    (ΔF, KL at the floor's size and ÷ floor, ESS, counts, CPU seconds, MD transitions and τ)
    and ``checks``, issue 28's acceptance checks with their thresholds and results."""
    ref_phi, ref_psi = reference.all("phi"), reference.all("psi")
    a, b = split_halves(len(ref_phi))
    n_half = b.stop - b.start
    floor = (_kl(ref_phi[a], ref_psi[a], ref_phi[b], ref_psi[b]) if len(ref_phi) >= 4
             else Measurement.missing(f"{len(ref_phi)} reference frames (need 4)"))  # fmt: skip
    ref_df = Measurement(reference.delta_f, reference.delta_f_err)

    # BG: its first n/2 samples (independent draws), reweighted among themselves
    m_bg = min(n_half, len(bg.phi))
    kl_bg = _kl(ref_phi[a], ref_psi[a], bg.phi[:m_bg], bg.psi[:m_bg], np.asarray(bg.log_w)[:m_bg])
    try:
        pos, neg = basin_ess(bg.phi, normalised_weights(bg.log_w))
    except ValueError:  # no finite weight at all
        pos = neg = 0.0
    ess = Measurement(reverse_ess(bg.log_w))
    df_bg = bg_delta_f(bg)

    # MD: frames thinned evenly to n/2 (all its simulated time kept), or all of them
    md_phi, md_psi = md.all("phi"), md.all("psi")
    m_md = min(n_half, md_phi.size)
    pick = np.linspace(0, md_phi.size - 1, m_md).round().astype(int)  # distinct: m_md ≤ size
    kl_md = _kl(ref_phi[a], ref_psi[a], md_phi[pick], md_psi[pick])
    df_md = md_delta_f_measurement(md)
    into, out = committed_transitions(md.phi)

    ratio_bg = _ratio(kl_bg, floor)
    diff_bg = _difference(df_bg, ref_df, "BG ΔF")
    off = Measurement(abs(diff_bg.value), diff_bg.err) if diff_bg.measured else diff_bg  # type: ignore[arg-type]
    checks = [_check(*spec) for spec in (
        (f"reverse ESS ≥ {ESS_THRESHOLD:.0%}", ess, ESS_THRESHOLD, "{:.1%}", "", True),
        (f"|ΔF − reference| ≤ {DELTA_F_TOLERANCE} kT", off, DELTA_F_TOLERANCE, "{:.2f}", "kT"),
        (f"Ramachandran KL ≤ {KL_FLOOR_FACTOR:g} × floor", ratio_bg, KL_FLOOR_FACTOR, "{:.2f}",
         "× floor"))]  # fmt: skip
    bg_out = {
        "n_samples": len(bg.phi), "cpu_seconds": bg.cpu_seconds,
        "n_failed_energies": int(np.sum(~np.isfinite(np.asarray(bg.u, dtype=np.float64)))),
        "reverse_ess": ess.value, "reverse_ess_clipped": reverse_ess_clipped(bg.log_w),
        "effective_samples_phi_positive": pos, "effective_samples_phi_negative": neg,
        "delta_f": df_bg.as_dict(), "delta_f_minus_reference": diff_bg.as_dict(),
        "n_matched": m_bg, "kl_rama": kl_bg.as_dict(), "kl_rama_over_floor": ratio_bg.as_dict(),
    }  # fmt: skip
    md_out = {
        "n_frames": md.n_frames, "n_segments": len(md.segment_indices()), "ns": md.ns,
        "dt_ps": md.dt_ps, "cpu_seconds": md.cpu_seconds,
        "frames_phi_positive": int(np.sum(md_phi > 0)),
        "transitions_into_phi_positive": into, "transitions_out_of_phi_positive": out,
        "delta_f": df_md.as_dict(),
        "delta_f_minus_reference": _difference(df_md, ref_df, "MD ΔF").as_dict(),
        "tau_phi_ps": md_tau_phi(md).as_dict(), "n_matched": len(pick),
        "kl_rama": kl_md.as_dict(), "kl_rama_over_floor": _ratio(kl_md, floor).as_dict(),
    }  # fmt: skip
    ref_out = {
        "delta_f": ref_df.as_dict(), "source": reference.source, "seconds": reference.seconds,
        "n_frames": len(ref_phi), "n_half": n_half, "kl_rama_floor": floor.as_dict(),
    }  # fmt: skip
    return {"bg": bg_out, "md": md_out, "reference": ref_out, "checks": checks,
            "all_checks_passed": all(c["passed"] for c in checks)}  # fmt: skip


def _count(n: int, word: str) -> str:
    """``"1 segment"``, ``"2 segments"``."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _m(d: dict[str, Any], fmt: str = "{:.2f}", unit: str = "") -> str:
    return Measurement(d["value"], d.get("err"), d.get("note")).text(fmt, unit)


def _seconds(s: float | None, what: str = "") -> str:
    return "–" if s is None else f"{s:,.0f} s = {s / 60:.1f} min" + (f", {what}" if what else "")


def _kl_cell(col: dict[str, Any]) -> str:
    if col["kl_rama"]["value"] is None:
        return _m(col["kl_rama"])
    ratio = col["kl_rama_over_floor"]
    tail = f" ({ratio['value']:.2f} × floor)" if ratio["value"] is not None else ""
    return f"{col['kl_rama']['value']:.3f}{tail}, {col['n_matched']:,} samples"


def demo_report_md(
    metrics: dict[str, Any], figures: dict[str, str], info: dict[str, Any] | None = None
) -> str:
    """The demo's report.md text: the BG | MD (same CPU seconds) | reference table, how the
    reference was made, issue 28's acceptance checks, the figures and short definitions.

    metrics: :func:`demo_metrics`'s dict; figures: caption -> path relative to the report, in
    order; info (optional): ``temperature_K``, ``kT_kJ_per_mol``, ``command``, ``recipe`` (how
    the BG was made), ``training`` (analysis.demo_plots.validation_trend's dict), ``notes``."""
    info = info or {}
    bg, md, ref = metrics["bg"], metrics["md"], metrics["reference"]
    temp, kt = info.get("temperature_K"), info.get("kT_kJ_per_mol")
    at = f" at {temp:g} K" if temp else ""
    lines = [f"# p4bg demo: a Boltzmann generator{at} against MD of the same cost", ""]
    if info.get("command"):
        lines += [f"Made by `{info['command']}`." + (f" kT = {kt:.4f} kJ/mol." if kt else ""), ""]
    if info.get("recipe"):
        lines += [f"The BG: {info['recipe']}", ""]
    dash = "–"
    ess_clipped = bg["reverse_ess_clipped"]
    rows = [
        ("ΔF(φ > 0 vs φ < 0)", _m(bg["delta_f"], unit="kT") + " (reweighted)",
         _m(md["delta_f"], unit="kT"), _m(ref["delta_f"], unit="kT")),
        ("ΔF − reference", _m(bg["delta_f_minus_reference"], "{:+.2f}", "kT"),
         _m(md["delta_f_minus_reference"], "{:+.2f}", "kT")
         if md["delta_f"]["value"] is not None else dash, dash),
        ("Ramachandran KL to the reference (÷ floor)", _kl_cell(bg), _kl_cell(md),
         f"floor {_m(ref['kl_rama_floor'], '{:.3f}')} (half vs half, {ref['n_half']:,} frames)"),
        ("reverse ESS", f"{bg['reverse_ess']:.1%} (clipped top 1e-4: {ess_clipped:.1%})",
         "– (unweighted frames)", dash),
        ("in φ > 0", f"{bg['effective_samples_phi_positive']:,.0f} effective samples",
         f"{md['frames_phi_positive']:,} of {md['n_frames']:,} frames; "
         f"{_count(md['transitions_into_phi_positive'], 'transition')} in, "
         f"{md['transitions_out_of_phi_positive']} out", dash),
        ("τ of the φ > 0 indicator", dash, _m(md["tau_phi_ps"], "{:.3g}", "ps"), dash),
        ("samples / frames", f"{bg['n_samples']:,} samples ({bg['n_failed_energies']:,} failed "
         "energies)", f"{md['n_frames']:,} frames in {_count(md['n_segments'], 'segment')}, "
         f"{md['ns']:.3g} ns every {md['dt_ps']:g} ps", f"{ref['n_frames']:,} frames"),
        ("CPU seconds", _seconds(bg["cpu_seconds"], "600 K MD + training + sampling"),
         _seconds(md["cpu_seconds"]), _seconds(ref["seconds"], "shipped, not rerun")),
    ]  # fmt: skip
    lines += ["| | BG | MD, same CPU seconds | reference |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    ref_df = _m(ref["delta_f"], unit="kT")
    lines += ["", f"The reference: {ref['source']} (ΔF {ref_df}, one standard error). It is "
              "shipped with p4bg, not recomputed by the demo.", ""]  # fmt: skip
    lines += ["## Acceptance (issue 28)", ""]
    for c in metrics["checks"]:
        mark = "✓" if c["passed"] else "✗"
        lines.append(f"- {mark} {c['check']}: {c['shown']}")
    trend = info.get("training")
    if trend:
        verdict = "climbs: the model overfits" if trend["rise"] > 0.5 else "does not climb"
        lines += ["", f"Validation NLL before annealing: minimum {trend['min']:.2f} at step "
                  f"{trend['step_min']:,.0f}, last {trend['last']:.2f} (+{trend['rise']:.2f} "
                  f"nats): it {verdict}."]  # fmt: skip
    lines += ["", *[f"> Note: {n}" for n in info.get("notes", [])], "", "## Figures", ""]
    lines += [f"**{caption}**\n\n![{caption}]({path})\n" for caption, path in figures.items()]
    lines += ["## Definitions", "",
        "docs/design.md §5 has them all. log w = −u − log q, u = U/kT. Reverse ESS: Kish ESS / N "
        "(failed samples: weight 0). ΔF = −ln(P(φ > 0)/P(φ < 0)) ± one standard error: the delta "
        "method over the weights (BG), the larger of block averaging and the spread between "
        "segments (MD). Ramachandran KL = Σ p ln((p+ε)/(q+ε)) ΔφΔψ, 64 × 64 bins, p = the "
        "reference's first half, q = BG (reweighted) or MD at as many samples; the floor, its "
        "first half against its second, is what a perfect sampler would still show. A "
        f"transition goes from one φ basin's core to the other's (±{TRANSITION_MARGIN:g} rad off "
        f"φ = 0 and ±π). MD's ΔF and τ need ≥ {MIN_TRANSITIONS} each way, the BG's ΔF ≥ "
        f"{MIN_BASIN_ESS:g} effective samples per basin: with less, the error cannot be "
        "estimated and no value is printed."]  # fmt: skip
    return "\n".join(lines) + "\n"
