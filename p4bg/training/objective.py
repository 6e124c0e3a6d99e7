"""One training step's loss, as one module call.

DistributedDataParallel sees the parameters' gradients through the hooks of one ``forward``, so
the whole loss lives in :class:`Objective`: the NLL of data frames through the inverse and,
given prior draws, the energy term through the forward. The annealing phase feeds the same
NLL with batches resampled from the model's own samples (:func:`annealing_log_weights`,
:func:`resample`): TA-BG's reweighted maximum likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from p4bg.config import TrainConfig
from p4bg.distributed import SINGLE, World, all_sum
from p4bg.generator import BoltzmannGenerator
from p4bg.nn import p4inv_penalty

__all__ = ["AnnealBuffer", "Objective", "annealing_log_weights", "resample"]


class Objective(torch.nn.Module):
    """``forward(x, z=None, w_e=0)``: x [batch, 66] nm, data frames; z [kl_batch, 60], prior
    draws (the mixed phase). Returns (loss, nll, kl, u of the samples in kT or None):
    ``(1 − w_e)·NLL + w_e·KL`` (+ the P4Inv penalty), means over this process's batch; across
    processes DDP averages the gradients, i.e. those of the means over the global batch.

    ``nll``, ``nll_and_generate``: the generator's passes, compiled or not."""

    def __init__(self, bg: BoltzmannGenerator, config: TrainConfig,
                 nll: Callable[[Tensor], Tensor], nll_and_generate: Callable[..., Any],
                 world: World = SINGLE) -> None:  # fmt: skip
        super().__init__()
        self.bg, self.world = bg, world
        self.nll, self.nll_and_generate = nll, nll_and_generate
        self.high, self.max_energy = config.energy_high, config.energy_max
        self.penalty = config.penalty

    def forward(self, x: Tensor, z: Tensor | None = None,
                w_e: float = 0.0) -> tuple[Any, ...]:  # fmt: skip
        if z is None:
            nll = self.nll(x)
            kl, u, loss = torch.zeros((), device=x.device), None, nll
        else:
            nll, samples, log_q = self.nll_and_generate(x, z)
            # the mean over the global batch's successful evaluations, whatever rank they fell
            # on: this rank's sum over their global count, times the number of processes,
            # whose gradients DDP averages (one process: the masked mean of reverse_kl_of)
            total, count, u = self.bg.reverse_kl_parts(samples, log_q, self.high,
                                                       self.max_energy)  # fmt: skip
            kl = total * self.world.size / all_sum(count, self.world)
            loss = (1.0 - w_e) * nll + w_e * kl
        if self.penalty > 0:
            loss = loss + self.penalty * p4inv_penalty(self.bg.flow)
        return loss, nll, kl, u


def annealing_log_weights(u_target: Tensor, log_q: Tensor, target: float,
                          temperature: float) -> Tensor:  # fmt: skip
    """Log importance weights of model samples for the Boltzmann density at ``temperature`` K.

    u_target: reduced energies at the ``target`` temperature (kT_target), shape (n,); log_q:
    the samples' model log-density, shape (n,). At T the reduced energy is u_target·T_target/T,
    so ``log w = −u_target·(T_target/T) − log q`` (float64). A failed evaluation (u = +inf) or a
    NaN gets weight 0 (log w = −inf), never a finite stand-in."""
    u = u_target.double() * (target / temperature)
    # neginf too: nan_to_num's default would turn the −inf of a failed sample into −1.8e308,
    # a finite weight that a batch of nothing but failures would then resample uniformly
    return torch.nan_to_num(-u - log_q.double(), nan=-math.inf, posinf=-math.inf,
                            neginf=-math.inf)  # fmt: skip


def resample(log_w: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` indices drawn with replacement in proportion to ``exp(log_w)`` (shape (m,)); the
    weights' Kish ESS as a fraction of m; and whether the weights were usable (0-dim bool: not
    all zero, all finite). Unusable weights draw uniformly (multinomial needs valid weights),
    and the caller must discard that batch. No host synchronisation."""
    w = torch.softmax(log_w, 0)
    ess = 1.0 / (w.square().sum() * len(w))
    ok = torch.isfinite(w).all() & (w.sum() > 0)
    w = torch.where(ok, w, torch.ones_like(w))
    idx = torch.multinomial(w, n, replacement=True, generator=generator)
    return idx, ess, ok


@dataclass
class AnnealBuffer:
    """The annealing phase's draws of the model: positions x [n, 3·atoms] nm, their reduced
    energies u at the target temperature [n] kT (+inf: failed), their log q under the model
    that drew them [n], the stage temperature (K) and the step they were drawn at. The weights
    ``exp(−u·T_target/T − log q)`` take them to the Boltzmann density at T whatever the model
    has become since, so a buffer stays a valid importance sample for the steps that reuse it;
    what reuse costs is that those steps fit the same effective draws (their gradient errors
    are correlated, not averaged)."""

    x: torch.Tensor
    u: torch.Tensor
    log_q: torch.Tensor
    temperature: float
    step: int

    def state_dict(self) -> dict[str, Any]:
        return {"x": self.x.cpu(), "u": self.u.cpu(), "log_q": self.log_q.cpu(),
                "temperature": self.temperature, "step": self.step}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> AnnealBuffer:
        return cls(state["x"].to(device), state["u"].to(device), state["log_q"].to(device),
                   float(state["temperature"]), int(state["step"]))  # fmt: skip
