"""Validation during training: what a run is judged by while it trains.

Two views: the NLL of held-out MD frames (all, and the φ > 0 and φ < 0 frames apart: a model
that loses a basin shows it there first), and fresh samples from the model drawn as
``p4bg.sample`` will draw them (prior N(0, τ²I), τ = ``sample_prior_scale``), weighted by the
target energy: reverse ESS (unclipped, and with the top 1e-4 of the weights clipped), the log Z
sandwich and the mean sample energy. Annealed models are judged by their samples, since the
data's NLL ranks models of the data's temperature only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from analysis.metrics import (
    CLIP_FRACTION,
    log_z_forward,
    log_z_reverse,
    reverse_ess,
    reverse_ess_clipped,
)
from p4bg.config import TrainConfig
from p4bg.generator import BoltzmannGenerator
from p4bg.training.streams import Streams
from p4bg.units import Temperatures

__all__ = ["ValidationSet", "validate", "validation_line"]


@dataclass
class ValidationSet:
    """Held-out MD frames: x [frames, 66] nm on the training device and dtype; u [frames] their
    reduced energies at the target temperature (kT, float64, CPU); phi_pos [frames] bool."""

    x: Tensor
    u: Tensor
    phi_pos: Tensor


@torch.no_grad()
def validate(
    bg: BoltzmannGenerator,
    val: ValidationSet,
    energy: Any,
    streams: Streams,
    config: TrainConfig,
    temperatures: Temperatures,
) -> tuple[dict[str, float], int]:
    """One validation: (the row of metrics, the number of failed energy evaluations)."""
    log_q = torch.cat([bg.log_prob(c) for c in torch.split(val.x, 4096)]).double()
    log_q = log_q.cpu()
    pos = val.phi_pos
    row = {
        "val_nll": float(-log_q.mean()),
        "val_nll_phi_pos": float(-log_q[pos].mean()) if pos.any() else float("nan"),
        "val_nll_phi_neg": float(-log_q[~pos].mean()) if (~pos).any() else float("nan"),
    }
    if temperatures.same:
        row["val_logz_forward"] = log_z_forward((-val.u - log_q).numpy())
    else:  # the data are not a sample of the target at another temperature
        row["val_logz_forward"] = float("nan")
    n = config.val_samples or config.sample_batch
    before = energy.stats.failures
    tempered = bg.tempered(config.sample_prior_scale)  # as p4bg.sample will draw them
    u_s, lq_s = [], []
    for chunk in range(0, n, 4096):
        z = streams.prior(min(4096, n - chunk), bg.dim, "validation", tempered.prior_scale,
                          val.x.dtype, val.x.device)  # fmt: skip
        x, lq = tempered.generate(z)
        u_s.append(energy(x).double().cpu())
        lq_s.append(lq.double().cpu())
    u, lq = torch.cat(u_s), torch.cat(lq_s)
    failures = energy.stats.failures - before
    finite = torch.isfinite(u)
    row["mean_u"] = float(u[finite].mean()) if finite.any() else float("nan")
    row["val_failures"] = failures
    if config.val_samples:
        log_w = (-u - lq).numpy()
        row["val_ess"] = reverse_ess(log_w)
        # clipping the top 1e-4 needs >= 10,000 samples to touch more than the largest
        # weight, which it would set to itself: below that the column stays empty
        if len(log_w) * CLIP_FRACTION > 1:
            row["val_ess_clipped"] = reverse_ess_clipped(log_w)
        row["val_logz_reverse"] = log_z_reverse(log_w)
    return row, failures


def validation_line(row: dict[str, Any], step: int, best: dict[str, float],
                    config: TrainConfig, temperatures: Temperatures) -> str:  # fmt: skip
    """One train.log line per validation; only the measured quantities appear."""
    text = (f"step {step} {row['phase']}: loss {row['loss']:.4f}, val NLL "
            f"{row['val_nll']:.4f} (phi>0 {row['val_nll_phi_pos']:.2f}, phi<0 "
            f"{row['val_nll_phi_neg']:.2f}"
            + (f"; best {best['val_nll']:.4f} at {best['step']}"
               if math.isfinite(best["val_nll"]) else "")
            + ")")  # fmt: skip
    if "val_ess" in row:
        n = config.val_samples
        text += (f", reverse ESS {100 * row['val_ess']:.3g}% of {n:,} samples at "
                 f"{temperatures.target:g} K")  # fmt: skip
        if "val_ess_clipped" in row:
            text += f" (clipped top 1e-4: {100 * row['val_ess_clipped']:.3g}%)"
        gap = row["val_logz_forward"] - row["val_logz_reverse"]
        if math.isfinite(gap):
            text += f", log Z gap {gap:.3f}"
    if row["phase"] == "anneal":
        text += (f", annealing at {row['anneal_temperature']:.0f} K (batch ESS "
                 f"{100 * row['anneal_ess']:.3g}%)")  # fmt: skip
    return text + f", mean u {row['mean_u']:.2f} kT, failed energies {row['val_failures']}"
