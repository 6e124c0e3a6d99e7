"""What changes with the step: the phase, the learning rate, the energy weight and the annealing
temperature. Pure functions of the configuration and the (0-based) optimizer step, so that a
resumed run and a fresh one agree on every step without saving anything.

Phases (paper App. H, then TA-BG's annealing): ``nll_steps`` of maximum likelihood, then
``mixed_steps`` of ``(1 − w_e)·NLL + w_e·KL``, then ``anneal_steps`` of reweighted maximum
likelihood on the model's own samples through geometric temperature stages.
"""

from __future__ import annotations

import math

from p4bg.config import TrainConfig
from p4bg.units import Temperatures

__all__ = [
    "anneal_ladder",
    "anneal_refills",
    "anneal_temperature",
    "energy_weight",
    "learning_rate",
    "phase",
]


def phase(config: TrainConfig, step: int) -> str:
    """``"nll"``, ``"mixed"`` or ``"anneal"``: the phase optimizer step ``step`` belongs to."""
    if step < config.nll_steps:
        return "nll"
    return "mixed" if step < config.nll_steps + config.mixed_steps else "anneal"


def learning_rate(config: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step ``step``: per phase constant or cosine-decayed to
    ``lr × lr_final_factor``; a linear warm-up over the first ``warmup_steps``. With
    ``anneal_final_decay`` a constant annealing rate decays (cosine) over the last stage only."""
    decay = config.lr_schedule == "cosine"
    if step < config.nll_steps:
        base, start, length = config.nll_lr, 0, config.nll_steps
    elif step < config.nll_steps + config.mixed_steps:
        base, start, length = config.mixed_lr, config.nll_steps, config.mixed_steps
    else:
        base, start = config.anneal_lr, config.nll_steps + config.mixed_steps
        length = config.anneal_steps
        if config.anneal_final_decay and not decay:
            last = _stage_start(config, config.anneal_stages - 1)
            start, length, decay = last, start + length - last, step >= last
    lr = base
    if decay and length > 1:
        t = (step - start) / (length - 1)
        f = config.lr_final_factor
        lr = base * (f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * t)))
    if step < min(config.warmup_steps, config.nll_steps):
        lr *= (step + 1) / config.warmup_steps
    return lr


def energy_weight(config: TrainConfig, step: int) -> float:
    """w_e of the mixed loss ``(1 − w_e)·NLL + w_e·KL`` at ``step``: ``r / (1 + r)`` for
    ``r = energy_weight_ratio``, reached linearly over ``energy_ramp_steps`` mixed steps."""
    if not config.nll_steps <= step < config.nll_steps + config.mixed_steps:
        return 0.0
    w_e = config.energy_weight_ratio / (1.0 + config.energy_weight_ratio)
    if config.energy_ramp_steps > 0:
        w_e *= min(1.0, (step - config.nll_steps + 1) / config.energy_ramp_steps)
    return w_e


def anneal_temperature(config: TrainConfig, temperatures: Temperatures, step: int) -> float:
    """K of the annealing stage that ``step`` belongs to: stage s of S runs at
    T_data · (T_target/T_data)^((s+1)/S), so that the last one is the target."""
    start = config.nll_steps + config.mixed_steps
    stage = min(
        config.anneal_stages - 1, (step - start) * config.anneal_stages // config.anneal_steps
    )
    ratio = temperatures.target / temperatures.data
    return temperatures.data * ratio ** ((stage + 1) / config.anneal_stages)


def anneal_ladder(config: TrainConfig, temperatures: Temperatures) -> list[float]:
    """The annealing stages' temperatures, K, in order (the last is the target)."""
    steps = [_stage_start(config, k) for k in range(config.anneal_stages)]
    return [anneal_temperature(config, temperatures, s) for s in steps]


def anneal_refills(config: TrainConfig) -> int:
    """How many times the annealing phase draws afresh: at the start of every stage and every
    ``anneal_refill_every`` steps within it (each draw costs ``anneal_samples`` energies per
    process); ``anneal_steps`` when every step draws."""
    k = config.anneal_refill_every
    ends = [_stage_start(config, s) for s in range(1, config.anneal_stages)]
    ends.append(config.nll_steps + config.mixed_steps + config.anneal_steps)
    starts = [_stage_start(config, s) for s in range(config.anneal_stages)]
    return sum(-(-(end - start) // k) for start, end in zip(starts, ends, strict=True))


def _stage_start(config: TrainConfig, k: int) -> int:
    """The first optimizer step of annealing stage ``k`` (0-based): the first step that
    :func:`anneal_temperature` puts in it."""
    return (
        config.nll_steps + config.mixed_steps + -(-k * config.anneal_steps // config.anneal_stages)
    )
