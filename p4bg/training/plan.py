"""The plan printout: what a run will do, said before it starts (and by ``--dry-run``).

It reads only the built parts and the configuration; it starts nothing (the target energy is
resolved by name, so that a System TorchEnergy cannot evaluate fails here, before any training).
"""

from __future__ import annotations

from p4bg.config import ConfigError, TrainConfig
from p4bg.energy import TorchEnergy, UnsupportedForceError
from p4bg.flows import count_parameters
from p4bg.systems import MolecularSystem
from p4bg.training.build import RunParts
from p4bg.training.schedules import anneal_ladder

__all__ = ["describe", "energy_plan"]


def energy_plan(config: TrainConfig, system: MolecularSystem, device: object) -> str:
    """What ``config.energy`` will resolve to, without starting any worker; ConfigError when
    ``energy = "torch"`` and TorchEnergy cannot evaluate the System."""
    if config.energy == "openmm":
        return f"OpenMM workers ({config.n_workers})"
    try:
        TorchEnergy(system)
    except UnsupportedForceError as err:
        if config.energy == "torch":
            raise ConfigError(str(err)) from None
        return f"OpenMM workers ({config.n_workers}): {err}"
    return f"TorchEnergy on {device}"


def describe(parts: RunParts, n_train: int, n_val: int) -> str:
    """The plan, a few lines: model, parameters, data, schedule, validation, merges, output."""
    cfg, world, temps = parts.config, parts.world, parts.temperatures
    counts = count_parameters(parts.flow)
    p4 = sum(1 for _ in parts.merger.layers)
    spline = (f", {cfg.spline_bins} bins on [-{cfg.spline_tail_bound:g}, "
              f"{cfg.spline_tail_bound:g}]" if cfg.coupling == "spline" else "")  # fmt: skip
    schedule = f"plan: {cfg.nll_steps:,} NLL steps at lr {cfg.nll_lr:g}"
    schedule += (f", then {cfg.mixed_steps:,} mixed steps at lr {cfg.mixed_lr:g}"
                 if cfg.mixed_steps else " and no energy phase")  # fmt: skip
    schedule += (f" ({cfg.lr_schedule}"
                 + (f" to x{cfg.lr_final_factor:g}" if cfg.lr_schedule == "cosine" else "")
                 + (f", warm-up {cfg.warmup_steps}" if cfg.warmup_steps else "") + ")")  # fmt: skip
    if cfg.mixed_steps:
        schedule += f"; w_e/w_l = {cfg.energy_weight_ratio:g}"
        if cfg.energy_ramp_steps:
            schedule += f" reached over {cfg.energy_ramp_steps:,} steps"
    schedule += f"; batch {cfg.batch_size}"
    if world.distributed:
        schedule += f" per process x {world.size} processes = {cfg.batch_size * world.size}"
    if cfg.mixed_steps:
        schedule += f", KL batch {cfg.kl_batch_size or cfg.batch_size}"
    schedule += f"; AdamW weight decay {cfg.weight_decay:g}" if cfg.weight_decay else "; Adam"
    if cfg.mixed_fresh_optimizer and cfg.mixed_steps:
        schedule += ", moments cleared at the mixed phase"
    if cfg.max_grad_norm:
        schedule += f"; grad clip {cfg.max_grad_norm:g}"
    target = f"target energy at {temps.target:g} K"
    if cfg.anneal_steps:
        target += (f"; then {cfg.anneal_steps:,} annealing steps at lr {cfg.anneal_lr:g} "
                   "through " + ", ".join(f"{t:.0f}" for t in anneal_ladder(cfg, temps))
                   + f" K ({cfg.anneal_samples:,} samples reweighted per batch")  # fmt: skip
        if cfg.anneal_refill_every > 1:
            target += (f", drawn afresh every {cfg.anneal_refill_every} steps and at every "
                       "stage")  # fmt: skip
        target += ")"
    if cfg.init:
        target += f"; starts from the model of {cfg.init}"
    lines = [
        f"flow: {cfg.n_blocks} blocks x ({cfg.coupling} coupling, {cfg.mixing} mixing, "
        f"{cfg.coupling} coupling, {cfg.mixing} mixing), hidden {cfg.hidden}{spline}, latent "
        f"dim {parts.coordinates.dim}",
        f"parameters: {'spline' if cfg.coupling == 'spline' else 'RNVP'} "
        f"{counts[cfg.coupling]:,}, P4Inv {counts['p4inv']:,} ({p4} layers), "
        f"total {counts['total']:,}",
        f"data {cfg.data} at {cfg.temperature:g} K: {n_train:,} train frames "
        f"(first {cfg.train_fraction:g} of each replica, every {cfg.train_stride}), "
        f"{n_val:,} val frames; device {parts.device}",
        schedule,
        target,
        f"validation every {cfg.val_every} steps: NLL by basin"
        + (f", reverse ESS of {cfg.val_samples:,} samples" if cfg.val_samples else "")
        + "; best model (lowest NLL, before any annealing) kept in best.pt",
        f"merges every {cfg.merge_every} steps, forced every {cfg.force_every}, "
        f"corrected every {cfg.correct_every} merges, penalty {cfg.penalty:g}",
        f"target energy: {cfg.energy} -> {energy_plan(cfg, parts.system, parts.device)}",
        f"output {cfg.out}: config.toml, checkpoint.pt every {cfg.checkpoint_every}, "
        "metrics.csv, train.log",
    ]
    return "\n".join(lines)
