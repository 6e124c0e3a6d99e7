"""Score generated ensembles against MD, and draw the figures.

examples:
  python -m p4bg.analyze runs/spline300 --reference data/alanine_dipeptide_300K_remd45 --split all
  python -m p4bg.analyze runs/quick runs/swap --reference data/alanine_dipeptide_600K
  python -m p4bg.analyze --reference data/alanine_dipeptide_600K --out report_md   # MD alone

Each run needs samples from p4bg.sample. The reference is an MD dataset: by default its held-out
test frames; --split all takes every frame, for a reference simulated independently of the
training data (the honest comparison; a free energy recorded with it by p4bg.umbrella or
p4bg.remd replaces the frames' own). Samples must be weighted at the reference's temperature.

Writes RUN/report/ for the first run (or --out): report.md (a table per model: reverse and
forward ESS, energy shift, ΔF(φ>0 vs φ<0) raw and reweighted with errors, Ramachandran KL against
the MD-vs-MD floor, chirality, BG value), metrics.json (every number, with sample counts),
energies.png, ramachandran.png, free_energy_phi.png and training.png. Definitions: docs/design.md
§5. Needs no GPU; the model's log q of the MD frames (forward ESS) runs on --device.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.geometry import dihedral
from analysis.metrics import ensemble_metrics, reference_metrics
from analysis.plots import (
    AngleSet,
    plot_energies,
    plot_free_energy_phi,
    plot_ramachandran,
    plot_training,
)
from analysis.report import metrics_json_text, report_md_text, residue_report_lines
from analysis.timeseries import replica_segments
from p4bg.cli import Parser, option, parse
from p4bg.cli import build_parser as build_cli_parser
from p4bg.config import ENERGIES, ConfigError
from p4bg.data import DatasetError, load_dataset, load_metadata, training_frames
from p4bg.energy import UnsupportedForceError, make_energy
from p4bg.files import write_atomic
from p4bg.residue_report import per_residue, reference_free_energy
from p4bg.runs import CONFIG, load_run, read_config, read_samples, read_training_metrics
from p4bg.systems import SystemConfigError, load_system

__all__ = [
    "AnalyzeOptions",
    "Reference",
    "analyze",
    "build_parser",
    "load_reference",
    "main",
    "replica_segments",
    "training_threshold",
]


ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test", "all")
PROG = "python -m p4bg.analyze"


class Reference:
    """MD frames of one split (or ``all``): xyz [frames, atoms, 3] nm float64, u (kT), φ/ψ
    (radians), L-form; ``segments`` (positions of each replica's contiguous time series),
    ``ps_per_frame`` and the MD wall ``seconds_per_frame`` (total production steps over total
    steps per second of the simulation, all its workers together; None if not recorded)."""

    def __init__(self, path: str | Path, split: str, system_name: str | None) -> None:
        meta = load_metadata(path)
        data = load_dataset(path)
        if split not in SPLITS:
            raise ConfigError(f"--split must be one of {list(SPLITS)}, got {split!r}")
        self.path, self.split, self.meta = str(path), split, meta
        self.system = load_system(system_name or meta["system"])
        self.temperature = float(meta["temperature_K"])
        self.kT = float(meta["kT_kJ_per_mol"])
        idx = np.arange(len(data.xyz)) if split == "all" else data.split[split]
        self.xyz = data.xyz[idx].astype(np.float64).reshape(len(idx), -1, 3)
        self.u = data.energies[idx] / self.kT
        # the fallback threshold, for runs whose training data is not here
        self.u_train_max = float(np.max(data.energies[data.split["train"]]) / self.kT)
        self.phi = dihedral(self.xyz, self.system.phi_atoms)
        self.psi = dihedral(self.xyz, self.system.psi_atoms)
        self.is_l = self.system.is_l(self.xyz)
        self.segments = replica_segments([int(r["frames"]) for r in meta["replicas"]], idx)
        self.ps_per_frame = meta.get("save_every_ps")
        steps, rate = meta.get("steps_per_frame"), meta.get("steps_per_second_total")
        # replica exchange (p4bg.remd): a frame at the lowest temperature costs the MD steps of
        # every temperature of the ladder (its steps_per_second_total counts them all)
        self.n_temperatures = len(meta.get("temperatures_K", [self.temperature]))
        steps = steps * self.n_temperatures if steps else steps
        ok = isinstance(rate, int | float) and rate > 0 and steps
        self.seconds_per_frame = float(steps) / float(rate) if ok else None
        total_steps = sum(int(r["frames"]) for r in meta["replicas"]) * int(steps or 0)
        self.timing = {
            "md_steps_per_frame": steps, "md_steps_per_second_total": rate,
            "md_workers": meta.get("workers"), "md_wall_seconds_recorded": meta.get("wall_seconds"),
            "md_total_production_steps": total_steps,
            "md_total_production_seconds": total_steps / float(rate) if ok else None,
            "md_seconds_per_frame": self.seconds_per_frame,
        }  # fmt: skip


def _resolve_dataset(name: str) -> Path | None:
    """The dataset folder a run's ``data`` setting names: as given if absolute, else relative
    to the working directory or to the project root; None if neither holds a dataset."""
    path = Path(name)
    for candidate in [path] if path.is_absolute() else [Path.cwd() / path, ROOT / path]:
        if (candidate / "metadata.json").is_file():
            return candidate
    return None


def training_threshold(run: Path, ref: Reference, cache: dict[Any, float]) -> dict[str, Any]:
    """Maximum u (kT, at the reference's temperature) of the run's training frames: the train
    split of the dataset named by ``data`` in ``run/config.toml``, cut by its ``train_fraction``
    and ``train_stride`` as the training did; when that is missing or
    unreadable, the reference's train split, with a note saying so."""
    name, why, fraction, stride = None, "", 1.0, 1
    config = run / CONFIG
    try:
        if config.is_file():
            settings, _ = read_config(run)
            name, fraction, stride = settings.data, settings.train_fraction, settings.train_stride
    except ConfigError as err:
        why = f"{config} cannot be read ({err})"
    path = _resolve_dataset(str(name)) if name else None
    if path is not None:
        try:
            same = path.resolve() == Path(ref.path).resolve()
            key = (path.resolve(), fraction, stride)
            if same and (fraction, stride) == (1.0, 1):  # its train split gave ref.u_train_max
                cache[key] = ref.u_train_max * ref.kT
            if key not in cache:  # energies only: no relabelling of hydrogens needed
                data = load_dataset(path, canonicalize=False)
                frames = training_frames(data.split["train"], fraction, stride)
                cache[key] = float(np.max(data.energies[frames]))
            return {
                "value": cache[key] / ref.kT,
                "source": "training data",
                "dataset": str(name),
                "note": f"{run.name}: the reference {ref.path} is its own training dataset, not "
                "an independent MD run (docs/design.md §5)"
                if same
                else None,
            }  # fmt: skip
        except DatasetError as err:
            why = f"its training data {name} cannot be loaded ({err})"
    elif not why:
        why = (f"its training data {name!r} is not here" if name
               else f"{config} is missing or names no data")  # fmt: skip
    return {
        "value": ref.u_train_max,
        "source": "reference train split (fallback)",
        "dataset": str(name) if name else None,
        "note": f"{run.name}: {why}; its low-energy threshold is the maximum u of the "
        f"reference's train split instead",
    }


def load_reference(path: str | Path, split: str = "test", system: str | None = None) -> Reference:
    return Reference(path, split, system)


def perturbed_energies(
    reference: Reference, noise: float, seed: int, n_workers: int, energy: str = "auto"
) -> np.ndarray:
    """u (kT) of the MD frames with N(0, noise²) nm added to every coordinate (paper Fig. 7);
    ``energy``: auto | openmm | torch (p4bg.energy.make_energy)."""
    rng = np.random.default_rng(seed)
    xyz = reference.xyz + rng.normal(0.0, noise, size=reference.xyz.shape)
    with make_energy(energy, reference.system, n_workers=n_workers,
                     temperature=reference.temperature) as target:  # fmt: skip
        u, _ = target.evaluate(xyz.reshape(len(xyz), -1), forces=False)
    return u


def model_log_q(
    run: Path,
    xyz: np.ndarray,
    device: str,
    prior_scale: float = 1.0,
    batch: int = 4096,
    checkpoint: str = "last",
    expected_step: int | None = None,
) -> np.ndarray:
    """log q of MD frames under the run's model (float64 numpy), for the forward ESS; with the
    prior scale and checkpoint the samples were drawn with, so that q is the density that made
    them."""
    loaded = load_run(run, device, checkpoint)
    if expected_step is not None and loaded.step != expected_step:
        name = "checkpoint.pt" if checkpoint == "last" else "best.pt"
        raise ConfigError(
            f"{run}: the samples came from step {expected_step} but {name} now holds step "
            f"{loaded.step}; the forward metrics would mix two models. Resample with "
            f"`python -m p4bg.sample {run} --overwrite`"
        )
    bg = loaded.bg.tempered(prior_scale)
    param = next(bg.flow.parameters())
    out = []
    with torch.no_grad():
        for chunk in np.array_split(xyz.reshape(len(xyz), -1), max(1, len(xyz) // batch)):
            x = torch.from_numpy(chunk).to(param.device, param.dtype)
            out.append(bg.log_prob(x).double().cpu().numpy())
    return np.concatenate(out)


def analyze(
    runs: list[Path],
    reference_path: str | Path,
    out: Path,
    split: str = "test",
    noise: float = 0.004,
    seed: int = 0,
    device: str = "auto",
    n_workers: int = 2,
    energy: str = "auto",
    tica_lag_ps: float = 10.0,
) -> dict[str, Any]:
    """Gather the arrays, compute the metrics (analysis.metrics), write the report; returns
    the content of metrics.json."""
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"runs must have distinct folder names (they label the report): {names}")
    ref = load_reference(reference_path, split)
    read = {  # fail early, before the OpenMM work
        run.name: read_samples(run, ref.system.name, ref.temperature) for run in runs
    }
    samples = {name: arrays for name, (arrays, _) in read.items()}
    ref_arrays = {"u": ref.u, "phi": ref.phi, "psi": ref.psi}
    notes: list[str] = []
    cache: dict[Any, float] = {}
    thresholds = {run.name: training_threshold(run, ref, cache) for run in runs}
    for t in thresholds.values():
        if t["note"]:
            notes.append(t["note"])
    if thresholds:  # the MD column and energies.png use the first run's threshold
        first = next(iter(thresholds))
        u_train_max = thresholds[first]["value"]
        threshold_source = f"of `{first}`: {thresholds[first]['source']}"
        if len({t["value"] for t in thresholds.values()}) > 1:
            notes.append(f"the runs have different training data; the MD column and "
                         f"energies.png use the threshold of {first}")  # fmt: skip
    else:
        u_train_max, threshold_source = ref.u_train_max, "the reference's train split"
    if ref.seconds_per_frame is None:
        notes.append(f"{reference_path}/metadata.json records no steps_per_second_total; no "
                     "MD wall time, so no BG value")  # fmt: skip
    for note in notes:
        print(f"p4bg.analyze: note: {note}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    u_noisy = perturbed_energies(ref, noise, seed, n_workers, energy)
    reference = reference_metrics(ref.u, ref.phi, ref.psi, ref.is_l, u_train_max, ref.segments,
                                  ref.ps_per_frame, ref.seconds_per_frame)  # fmt: skip
    estimate = reference_free_energy(ref.meta) if split == "all" else None
    if estimate is not None:
        # a free-energy estimate recorded with the dataset (umbrella sampling, or MBAR over
        # a replica-exchange ladder) replaces the one from the frames (kept as delta_f_frames)
        reference["delta_f_frames"] = reference["delta_f"]
        reference["delta_f_frames_err"] = reference["delta_f_err"]
        reference["delta_f_frames_note"] = reference.pop("delta_f_note", None)
        reference["delta_f"], reference["delta_f_err"], reference["delta_f_source"] = estimate
    noisy_label = f"MD + {noise:g} nm noise"
    reference["perturbed"] = {
        "noise_nm": noise,
        "mean_u": float(np.mean(u_noisy)),
        "median_u": float(np.median(u_noisy)),
        "low_energy_fraction": float(np.mean(u_noisy < u_train_max)),
    }
    models: dict[str, dict[str, Any]] = {}
    run_info: dict[str, str] = {}
    for run in runs:
        s = samples[run.name]
        meta = read[run.name][1]
        scale = float(meta.get("prior_scale", 1.0))
        seconds = meta.get("wall_seconds", meta.get("seconds"))
        log_w_ref = -ref.u - model_log_q(
            run, ref.xyz, device, scale, checkpoint=meta.get("checkpoint", "last"),
            expected_step=meta.get("checkpoint_step"),
        )  # fmt: skip
        threshold = thresholds[run.name]
        models[run.name] = ensemble_metrics(
            s["u"], s["log_w"], s["phi"], s["psi"], s["is_l"], s["finite"], ref_arrays,
            threshold["value"], log_w_ref, seconds, reference["independent_samples_per_second"],
        )  # fmt: skip
        models[run.name]["u_train_max_source"] = threshold["source"]
        models[run.name]["u_train_max_dataset"] = threshold["dataset"]
        models[run.name]["sampling_device"] = meta.get("device")
        models[run.name]["temperature_K"] = float(meta["temperature_K"])
        # the frames the model learned from (samples from before target_temperature: the same)
        models[run.name]["data_temperature_K"] = float(meta.get("data_temperature_K",
                                                                meta["temperature_K"]))  # fmt: skip
        # samples from before the `energy` option were scored by the OpenMM workers
        models[run.name]["sample_energy"] = meta.get("energy", "openmm")
        run_info[run.name] = (
            f"{run}, {len(s['u']):,} samples"
            + (f", prior scale τ = {scale:g}" if scale != 1 else "")
            + (f", sampled on {meta['device']}" if meta.get("device") else "")
            + f", energies by {models[run.name]['sample_energy']}"
            + f" at {models[run.name]['temperature_K']:g} K (trained on "
            + f"{models[run.name]['data_temperature_K']:g} K data)"
            + f"; threshold from {threshold['source']}"
            + (f" ({threshold['dataset']})" if threshold["dataset"] else "")
        )
    energies = {"MD": ref.u, noisy_label: u_noisy} | {k: v["u"] for k, v in samples.items()}
    # Ramachandran grid: MD and every model's raw map in the first row, the reweighted maps
    # under their raw ones.
    raw: list[AngleSet | None] = [AngleSet(f"MD ({split}, {len(ref.u):,} frames)", ref.phi,
                                           ref.psi)]  # fmt: skip
    reweighted: list[AngleSet | None] = [None]
    curves = [AngleSet("MD", ref.phi, ref.psi)]
    for name, s in samples.items():
        raw.append(AngleSet(f"{name} (raw)", s["phi"], s["psi"]))
        curves.append(AngleSet(f"{name} (raw)", s["phi"], s["psi"]))
        if np.isneginf(np.nan_to_num(s["log_w"], nan=-np.inf)).all():
            reweighted.append(None)  # no sample has weight
            continue
        reweighted.append(AngleSet(f"{name} (reweighted)", s["phi"], s["psi"], s["log_w"]))
        curves.append(AngleSet(f"{name} (reweighted)", s["phi"], s["psi"], s["log_w"]))
    panels = raw + reweighted if samples else raw
    figures = [
        write_atomic(
            out / "energies.png", lambda tmp: plot_energies(tmp, energies, u_train_max)
        ).name,
        write_atomic(
            out / "ramachandran.png", lambda tmp: plot_ramachandran(tmp, panels, columns=len(raw))
        ).name,
        write_atomic(
            out / "free_energy_phi.png", lambda tmp: plot_free_energy_phi(tmp, curves)
        ).name,
    ]
    residues, tica, residue_figures = per_residue(
        ref, runs, samples, out, tica_lag_ps, recorded=split == "all"
    )
    figures += residue_figures
    training = {run.name: read_training_metrics(run) for run in runs}
    training = {k: v for k, v in training.items() if v is not None}
    if training:
        figures.append(
            write_atomic(out / "training.png", lambda tmp: plot_training(tmp, training)).name
        )
    info = {
        "reference": str(reference_path), "split": split, "temperature_K": ref.temperature,
        "kT_kJ_per_mol": ref.kT, "u_train_max": u_train_max,
        "u_train_max_source": threshold_source, "runs": run_info, "noise_nm": noise,
        "seed": seed, "figures": figures, "notes": notes, "md_timing": ref.timing,
        "n_replica_series": len(ref.segments), "perturbed_energy": energy,
    }  # fmt: skip
    result = {"info": info, "reference": reference, "models": models}
    if residues:
        result["residues"], result["tica"] = residues, tica
    write_atomic(out / "metrics.json", metrics_json_text(result))
    sections = residue_report_lines(residues, tica)
    write_atomic(out / "report.md", report_md_text(reference, models, info, figures, sections))
    return result


@dataclass(kw_only=True)
class AnalyzeOptions:
    """The options of ``python -m p4bg.analyze``."""

    runs: list[Path] = option([], "run folders holding samples.npz", positional=True)
    reference: str = option(help="MD dataset folder from p4bg.simulate (data/NAME_600K)")
    split: str = option("test", "reference frames: train|val|test|all; 'all' for a reference "
                        "dataset simulated apart from the training data",
                        choices=SPLITS)  # fmt: skip
    out: Path | None = option(None, "report folder (default: RUN/report of the first run)")
    noise: float = option(0.004, "noise on MD positions for the perturbed set (nm)")
    seed: int = option(0, "seed of that noise")
    device: str = option("auto", "for log q of MD frames")
    energy: str = option("auto", "energy of the perturbed MD frames: torch (TorchEnergy), openmm "
                         "(worker processes), auto (torch where the System allows)",
                         choices=ENERGIES)  # fmt: skip
    n_workers: int = option(2, "OpenMM energy workers")
    tica_lag_ps: float = option(10.0, "lag of the TICA joint view (peptides of 2+ residues), ps")


def build_parser() -> Parser:
    """The parser of ``python -m p4bg.analyze`` (made from :class:`AnalyzeOptions`)."""
    return build_cli_parser(AnalyzeOptions, PROG, __doc__ or "")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(AnalyzeOptions, argv, PROG, __doc__ or "")
        out = args.out or (args.runs[0] / "report" if args.runs else None)
        if out is None:
            raise ConfigError("without runs, say where the report goes with --out")
        if not args.noise >= 0:
            raise ConfigError(f"--noise must be >= 0 nm, got {args.noise}")
        if not args.tica_lag_ps > 0:
            raise ConfigError(f"--tica-lag-ps must be > 0, got {args.tica_lag_ps}")
        result = analyze(args.runs, args.reference, out, args.split, args.noise, args.seed,
                         args.device, args.n_workers, args.energy, args.tica_lag_ps)  # fmt: skip
    except (ConfigError, DatasetError, SystemConfigError, UnsupportedForceError) as err:
        print(f"p4bg.analyze: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"report in {out}/: report.md, metrics.json, {', '.join(result['info']['figures'])}")
    ref = result["reference"]
    source = f" ({ref['delta_f_source']})" if "delta_f_source" in ref else ""
    tau = (f"τ(φ>0) {ref['tau_phi_ps']:.1f} ps, {ref['independent_samples_per_second']:.3g} "
           "independent samples/s") if not ref.get("tau_phi_note") else (
           f"τ(φ>0) {ref['tau_phi_note']}")  # fmt: skip
    delta_f = (f"ΔF {ref['delta_f_note']}" if ref.get("delta_f_note") else
               f"ΔF {ref['delta_f']:.2f} ± {ref['delta_f_err']:.2f} kT{source}")  # fmt: skip
    print(f"  MD: {delta_f}, {tau}")
    for name, m in result["models"].items():
        delta_f = (
            m["delta_f_reweighted_note"]
            if m.get("delta_f_reweighted_note")
            else f"{m['delta_f_reweighted']:.2f} ± {m['delta_f_reweighted_err']:.2f} kT"
        )
        value = (
            f"{m['bg_value']:.3g}"
            if math.isfinite(m["bg_value"])
            else "not measurable here (MD's τ is not)"
        )
        print(f"  {name}: shift {m['energy_shift_finite']:+.2f} kT (finite), reverse ESS "
              f"{m['reverse_ess']:.2%} (clipped top 1e-4: {m['reverse_ess_clipped']:.2%}), "
              f"forward ESS {m['forward_ess']:.2%}, log Z gap {m['log_z_gap']:+.3f}, ΔF "
              f"reweighted {delta_f}, Rama KL {m['kl_rama']:.3f} raw / "
              f"{m['kl_rama_reweighted']:.3f} reweighted; at the floor's size "
              f"{m['kl_rama_matched']:.3f} / {m['kl_rama_reweighted_matched']:.3f} "
              f"(floor {ref['kl_rama_floor']:.3f}); BG value {value}")  # fmt: skip


if __name__ == "__main__":
    main()
