"""The run folder, and the one place that reads and writes it.

A run folder (``runs/NAME/``) is written by ``p4bg.train`` and read by ``p4bg.sample``,
``p4bg.analyze``, a resumed or fine-tuned training and the benchmarks::

    config.toml     the resolved configuration (TOML, every key of TrainConfig)
    checkpoint.pt   the last state: model, optimizer, schedules, random streams (resumable)
    best.pt         the model at the lowest validation NLL (not for resuming)
    metrics.csv     a row per logging step; train.log a line per event
    samples.*       p4bg.sample's output; report/ p4bg.analyze's

Configurations written by older versions are upgraded here, once, with a note for the log:
renamed keys (``flow`` is now ``mixing``), and keys added later whose default would change what
an old run computes (``energy``: runs from before it trained against the OpenMM workers;
``block_volume``: runs from before it had no orientation volume in log q). Which keys may differ
between a checkpoint and the run resuming it, and which must match for ``init``, is said here too.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from p4bg.config import ConfigError, TrainConfig, apply_overrides, load_toml, renamed
from p4bg.coordinates import MixedCoordinateTransform
from p4bg.distributed import pick_device
from p4bg.files import write_atomic
from p4bg.flows import flow_from_config
from p4bg.generator import BoltzmannGenerator
from p4bg.systems import MolecularSystem, load_system

__all__ = [
    "BEST",
    "CHECKPOINT",
    "CONFIG",
    "METRICS",
    "MODEL_KEYS",
    "RESUME_OVERRIDES",
    "LoadedRun",
    "changed_keys",
    "config_from_values",
    "load_run",
    "read_checkpoint",
    "read_config",
    "read_samples",
    "read_training_metrics",
    "save_checkpoint",
]

CONFIG, CHECKPOINT, BEST, METRICS = "config.toml", "checkpoint.pt", "best.pt", "metrics.csv"

#: Settings that do not change the computation and may differ when a run is resumed.
RESUME_OVERRIDES = frozenset({"device", "n_workers", "energy", "compile"})
#: The keys that define a model's shape: a run started from another (``init``) must match them.
MODEL_KEYS = ("system", "mixing", "coupling", "n_blocks", "hidden", "spline_bins",
              "spline_tail_bound")  # fmt: skip
#: Keys added after runs existed, and the value an old run without them had in effect.
LEGACY_DEFAULTS = {"energy": "openmm", "block_volume": False}
#: Optional columns of metrics.csv that the analysis plots when a run has them.
OPTIONAL_TRAINING_COLUMNS = ("val_ess", "val_ess_clipped", "val_nll_phi_pos", "val_nll_phi_neg")


def _upgraded(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Saved configuration values with renamed keys read under their new names and keys an old
    run lacks set to what it had in effect; with a note for each change."""
    values, notes = renamed(values)
    for key, value in LEGACY_DEFAULTS.items():
        if key not in values:
            values[key] = value
            notes.append(f"the run predates the config key '{key}'; it keeps {key} = {value!r}")
    return values, notes


def config_from_values(values: dict[str, Any], where: str) -> tuple[TrainConfig, list[str]]:
    """A saved configuration (``config.toml``'s or a checkpoint's ``config`` dict) as a
    :class:`TrainConfig`, with the notes of its upgrade (see the module docstring)."""
    values, notes = _upgraded(values)
    return apply_overrides(TrainConfig(), values, where), notes


def read_config(run: str | Path) -> tuple[TrainConfig, list[str]]:
    """``run/config.toml`` as a :class:`TrainConfig` (upgraded), and the upgrade's notes."""
    path = Path(run) / CONFIG
    if not path.is_file():
        raise ConfigError(f"{run}: no run there (no {CONFIG}); start it without --resume")
    return config_from_values(load_toml(path), str(path))


def changed_keys(saved: dict[str, Any], now: TrainConfig, ignore: frozenset[str]) -> list[str]:
    """Keys whose value in a checkpoint's configuration (``saved``, upgraded) differs from
    ``now``, leaving out ``ignore``. A key the checkpoint predates counts as its legacy value."""
    values, _ = _upgraded(dict(saved))
    default, current = asdict(TrainConfig()), asdict(now)
    return [k for k in current if k not in ignore and values.get(k, default[k]) != current[k]]


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save`` of ``state``, atomically: a kill never leaves half a checkpoint."""
    return write_atomic(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A checkpoint's state dict (on the CPU), with an error that names the file when it is
    missing, cannot be read, or lacks one of ``required``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated or foreign file
        raise ConfigError(f"{path}: cannot be read ({err}); resume or retrain the run") from err
    missing = [k for k in required if k not in state]
    if missing:
        raise ConfigError(f"{path}: not a p4bg.train checkpoint (missing {missing})")
    return state


class LoadedRun(NamedTuple):
    """A trained run, ready to sample: its configuration, system and generator (eval mode,
    no target energy: the caller gives it the energy it wants)."""

    config: TrainConfig
    system: MolecularSystem
    bg: BoltzmannGenerator
    step: int
    energy_platform: str


def load_run(run: str | Path, device: str = "auto", checkpoint: str = "last") -> LoadedRun:
    """Load ``run/checkpoint.pt`` (``checkpoint="last"``) or ``best.pt`` (``"best"``: the model
    at the lowest validation NLL) into a BoltzmannGenerator on ``device``.

    The configuration comes from the checkpoint (the one its weights belong to); the coordinate
    transform is rebuilt from its saved buffers, so the training data need not be present."""
    run = Path(run)
    if checkpoint not in ("last", "best"):
        raise ConfigError(f"--checkpoint must be 'last' or 'best', got {checkpoint!r}")
    path = run / (CHECKPOINT if checkpoint == "last" else BEST)
    if checkpoint == "best" and not path.is_file() and (run / CHECKPOINT).is_file():
        raise ConfigError(f"{run}: no best.pt (the run was trained before p4bg kept one, or has "
                          "not validated yet); use --checkpoint last")  # fmt: skip
    if not path.is_file():
        hint = "is it a run folder?" if not run.is_dir() else "has the training saved one yet?"
        raise ConfigError(f"{run}: no checkpoint.pt ({hint}); train with `python -m p4bg.train "
                          f"--out {run}`")  # fmt: skip
    state = read_checkpoint(path, ("config", "flow", "coordinates", "step"))
    config, _ = config_from_values(state["config"], str(path))
    system = load_system(config.system, config.temperature)  # the temperature it trained at
    try:
        coordinates = MixedCoordinateTransform.from_state_dict(
            system, state["coordinates"], block_volume=config.block_volume
        )
        flow = flow_from_config(config, coordinates.dim)
        flow.load_state_dict(state["flow"])
    except (ValueError, RuntimeError) as err:
        raise ConfigError(
            f"{path}: the saved model does not fit system {config.system!r} with "
            f"{config.coupling} couplings, {config.mixing} mixing, {config.n_blocks} blocks, "
            f"hidden {config.hidden} ({err}); "
            "was systems/ changed since training? Retrain the run"
        ) from err
    dtype = getattr(torch, config.dtype)
    dev = pick_device(device)
    bg = BoltzmannGenerator(flow.to(dev, dtype), coordinates.to(dev, dtype), None).eval()
    return LoadedRun(config, system, bg, int(state["step"]), state.get("energy_platform", "auto"))


def read_samples(
    run: Path, system: str, temperature: float
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays of ``run/samples.npz`` and the content of ``samples.json``, after checking
    that sampling finished and that the samples were weighted for the reference's system and
    temperature (K)."""
    path = run / "samples.npz"
    redo = f"`python -m p4bg.sample {run} --overwrite`"
    if not path.is_file():
        raise ConfigError(f"{run}: no samples.npz; make them with `python -m p4bg.sample {run}`")
    meta_path = run / "samples.json"
    if not meta_path.is_file():
        raise ConfigError(f"{meta_path} is missing; rerun {redo}")
    meta = json.loads(meta_path.read_text())
    if meta.get("status") != "complete":
        raise ConfigError(f"{meta_path}: sampling did not finish (status {meta.get('status')!r}); "
                          f"rerun {redo}")  # fmt: skip
    if meta.get("system", system) != system:
        raise ConfigError(f"{run}: samples of system {meta.get('system')!r}, reference of "
                          f"{system!r}")  # fmt: skip
    t = meta.get("temperature_K")
    if t is None or abs(float(t) - temperature) > 1e-6:
        raise ConfigError(f"{meta_path}: samples weighted at {t} K, the reference is at "
                          f"{temperature:g} K; give a reference at the samples' temperature, or "
                          f"weight them for this one: `python -m p4bg.sample {run} --overwrite "
                          f"--target-temperature {temperature:g}`")  # fmt: skip
    with np.load(path) as data:
        missing = [k for k in ("u", "log_q", "log_w", "phi", "psi") if k not in data]
        if missing:
            raise ConfigError(f"{path}: arrays {missing} are missing; rerun p4bg.sample")
        arrays = {k: data[k] for k in data.files}
    n = len(arrays["u"])
    arrays.setdefault("finite", np.isfinite(arrays["phi"]) & np.isfinite(arrays["psi"]))
    if "is_l" not in arrays:
        raise ConfigError(f"{path}: no is_l array (written by an older p4bg.sample); rerun it")
    bad = [k for k, v in arrays.items() if len(v) != n]
    if bad:
        raise ConfigError(f"{path}: arrays {bad} do not have {n} entries like u; rerun p4bg.sample")
    return arrays, meta


def read_training_metrics(run: Path) -> dict[str, np.ndarray] | None:
    """``step``, ``nll``, ``val_nll`` columns of ``run/metrics.csv`` (NaN where empty), and those
    of OPTIONAL_TRAINING_COLUMNS that the file has, or None when the run folder has no metrics
    (e.g. a copy holding only the checkpoint)."""
    path = run / METRICS
    if not path.is_file():
        return None
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None

    def column(key: str) -> np.ndarray:
        return np.array([float(r[key]) if r.get(key) else np.nan for r in rows])

    out = {"step": column("step"), "nll": column("nll"), "val_nll": column("val_nll")}
    return out | {k: column(k) for k in OPTIONAL_TRAINING_COLUMNS if k in rows[0]}
