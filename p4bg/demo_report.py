"""The demo's report: gather the generator's samples, the same-cost 300 K MD and the shipped
reference as arrays, let ``analysis.demo`` measure and draw them, and write the results.

Everything here is reading files and writing them atomically; the numbers (and the rules for
what is "not measurable here") are in :mod:`analysis.demo`, the figures in
:mod:`analysis.demo_plots`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from analysis.demo import BGSamples, MDRun, Reference, demo_metrics, demo_report_md
from analysis.demo_plots import (
    demo_panels,
    plot_energy_histograms,
    plot_free_energy_phi_bands,
    plot_ramachandran_compare,
    plot_training_curve,
    validation_trend,
)
from analysis.geometry import dihedral
from analysis.report import metrics_json_text
from p4bg.config import ConfigError
from p4bg.data import complete_chunks, read_chunk
from p4bg.files import quiet_c_stdio, write_atomic
from p4bg.runs import read_config
from p4bg.systems import load_system
from p4bg.units import kT

__all__ = [
    "energy_evaluations",
    "generator_evaluations",
    "load_reference",
    "md_evaluations",
    "read_md",
    "read_training_curve",
    "write_demo_report",
]

TEMPERATURE = 300.0


def load_reference(system_name: str = "alanine_dipeptide") -> Reference:
    """The 300 K reference shipped with the system (reference_300K.npz and .json)."""
    folder = load_system(system_name).path
    npz, meta_path = folder / "reference_300K.npz", folder / "reference_300K.json"
    if not npz.is_file() or not meta_path.is_file():
        raise ConfigError(
            f"{folder}: no reference_300K.npz/.json; make them with "
            "`python benchmarks/make_demo_reference.py DATASET`"
        )
    meta = json.loads(meta_path.read_text())
    with np.load(npz) as data:
        cuts = np.cumsum(data["segment_lengths"])[:-1]
        phi = np.split(data["phi"].astype(np.float64), cuts)
        psi = np.split(data["psi"].astype(np.float64), cuts)
    source = (
        f"ΔF from {meta['delta_f_method']}; Ramachandran map from {meta['frames']:,} frames "
        f"of {meta['frames_method']}"
    )
    return Reference(phi, psi, float(meta["delta_f"]), float(meta["delta_f_err"]), source)


def read_md(folder: Path, cpu_seconds: float | None) -> MDRun:
    """The same-cost 300 K MD: every finished chunk of its one replica, as one time series."""
    meta = json.loads((folder / "metadata.json").read_text())
    system = load_system(meta["system"])
    replica = folder / "replica_00"
    xyz, u = [], []
    with quiet_c_stdio():
        for i in range(complete_chunks(replica)):
            frames, energies, _, _ = read_chunk(replica, i)
            xyz.append(frames.astype(np.float64))
            u.append(energies / kT(TEMPERATURE))
    if not xyz:
        raise ConfigError(f"{folder}: the 300 K MD saved no chunk; rerun the demo")
    x = np.concatenate(xyz)
    return MDRun(
        [dihedral(x, system.phi_atoms)],
        [dihedral(x, system.psi_atoms)],
        [np.concatenate(u)],
        float(meta["save_every_ps"]),
        cpu_seconds,
    )


def read_training_curve(runs: list[Path]) -> dict[str, np.ndarray]:
    """The metrics.csv columns of the runs, one after the other (steps continued), with the
    phase and annealing temperature kept (the training figure shades and marks them)."""
    rows: list[dict[str, str]] = []
    offset = 0
    for run in runs:
        with (run / "metrics.csv").open() as f:
            part = list(csv.DictReader(f))
        for r in part:
            rows.append({**r, "step": str(int(r["step"]) + offset)})
        offset += int(part[-1]["step"]) if part else 0

    def column(key: str) -> np.ndarray:
        return np.array([float(r[key]) if r.get(key) else np.nan for r in rows])

    out = {k: column(k) for k in ("step", "nll", "val_nll", "val_ess", "anneal_temperature")}
    out["phase"] = np.array([r.get("phase", "") for r in rows])
    return out


def _conformations(run: Path, log_w: np.ndarray, out: Path, n: int = 10) -> Path:
    """The ``n`` samples of largest weight in each φ basin, as a multi-model PDB."""
    import mdtraj

    phi = np.load(run / "samples.npz")["phi"]
    order = np.argsort(-np.nan_to_num(log_w, nan=-np.inf))
    picks = [i for i in order if phi[i] < 0][: n // 2] + [i for i in order if phi[i] > 0][: n // 2]
    dcd, top = str(run / "samples.dcd"), str(run / "samples.pdb")
    with quiet_c_stdio():  # the picked frames only, not the whole file
        frames = mdtraj.join([mdtraj.load_frame(dcd, int(i), top=top) for i in sorted(picks)])
    return write_atomic(out, lambda tmp: frames.save_pdb(str(tmp)))


def md_evaluations(folder: Path) -> int:
    """Force evaluations of an MD dataset: its saved frames' steps and every replica's
    equilibration (one evaluation per step), times the temperatures of a replica-exchange
    ladder (p4bg.remd: every temperature integrates)."""
    meta = json.loads((folder / "metadata.json").read_text())
    frames = 0
    for r in meta["replicas"]:
        replica = folder / r["folder"]
        frames += sum(len(np.load(replica / f"chunk_{i:05d}.npz")["energies"])
                      for i in range(complete_chunks(replica)))  # fmt: skip
    equilibration = round(float(meta["equilibration_ps"]) * 1000.0 / float(meta["timestep_fs"]))
    ladder = len(meta.get("temperatures_K", [0]))
    return (frames * int(meta["steps_per_frame"]) + equilibration * len(meta["replicas"])) * ladder


def generator_evaluations(data: Path, runs: list[Path], n_samples: int) -> dict[str, int]:
    """What a generator spent in target-energy evaluations (docs/design.md §5, "Cost"): the MD
    of its training data ``data``, the annealing draws and validation samples of its training
    ``runs``, and its ``n_samples`` final samples."""
    counts = {"600 K MD": md_evaluations(data)}
    validation = annealing = mixed = 0
    for run in runs:
        config, _ = read_config(run)
        with (run / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))
        last = rows[-1] if rows else {}
        if last.get("evaluations_anneal"):  # counted by the trainer, every phase
            mixed += int(last["evaluations_mixed"])
            annealing += int(last["evaluations_anneal"])
            validation += int(last["evaluations_validation"])
        else:  # a run from before the counts: its configuration's arithmetic
            validation += sum(1 for r in rows if r.get("val_nll")) * config.val_samples
            annealing += config.anneal_steps * config.anneal_samples
            mixed += config.mixed_steps * (config.kl_batch_size or config.batch_size)
    counts.update(annealing=annealing, validation=validation, sampling=n_samples)
    if mixed:
        counts["energy phase (KL term)"] = mixed
    counts["generator, all"] = sum(counts.values())
    return counts


def energy_evaluations(out: Path, n_samples: int) -> dict[str, int]:
    """What each part of the demo spent in target-energy evaluations, and the same-cost MD's."""
    counts = generator_evaluations(out / "data_600K", [out / "bg600", out / "bg300"], n_samples)
    counts["300 K MD, same CPU seconds"] = md_evaluations(out / "md300")
    return counts


def write_demo_report(out: Path, state: dict[str, Any]) -> Path:
    """report.md, metrics.json, four figures and conformations.pdb in ``out/report``."""
    report = out / "report"
    report.mkdir(exist_ok=True)
    bg_run = out / "bg300"
    with np.load(bg_run / "samples.npz") as s:
        arrays = {k: s[k] for k in ("phi", "psi", "u", "log_w")}
    bg_cpu = sum(p["cpu_s"] for p in state["phases"].values()) or None
    bg = BGSamples(arrays["phi"], arrays["psi"], arrays["u"], arrays["log_w"], bg_cpu)
    md = read_md(out / "md300", state.get("md300", {}).get("cpu_s"))
    reference = load_reference()
    metrics = demo_metrics(bg, md, reference)
    curve = read_training_curve([out / "bg600", bg_run])
    figures = {
        "Ramachandran maps at 300 K: the generator reweighted, MD of the same cost, the "
        "reference": write_atomic(
            report / "ramachandran.png",
            lambda tmp: plot_ramachandran_compare(tmp, demo_panels(bg, md, reference)),
        ).name,
        "Free energy along φ with error bands": write_atomic(
            report / "free_energy_phi.png",
            lambda tmp: plot_free_energy_phi_bands(tmp, bg, md, reference, metrics),
        ).name,
        "Energies of the samples (raw and reweighted) and of MD": write_atomic(
            report / "energies.png", lambda tmp: plot_energy_histograms(tmp, bg, md)
        ).name,
        "Training: NLL, validation NLL and validation reverse ESS": write_atomic(
            report / "training.png", lambda tmp: plot_training_curve(tmp, curve)
        ).name,
    }
    pdb = _conformations(bg_run, arrays["log_w"], report / "conformations.pdb")
    info = {
        "temperature_K": TEMPERATURE,
        "kT_kJ_per_mol": kT(TEMPERATURE),
        "command": "make demo (python -m p4bg.demo)",
        "recipe": "600 K MD (4 ns) -> spline + P4Inv flow by maximum likelihood (preset demo600) "
        "-> annealed to 300 K on its own reweighted samples (preset demo300) -> "
        f"{len(arrays['u']):,} samples",
        "training": validation_trend(curve),
        "notes": [
            f"{pdb.name}: the highest-weight samples of each φ basin, for a viewer",
            "energy evaluations: "
            + ", ".join(f"{k} {v:,}" for k, v in energy_evaluations(out, len(arrays["u"])).items()),
        ],
        "phases": state["phases"],
    }
    write_atomic(report / "metrics.json", metrics_json_text({**metrics, "info": info}))
    write_atomic(report / "report.md", demo_report_md(metrics, figures, info))
    return report
