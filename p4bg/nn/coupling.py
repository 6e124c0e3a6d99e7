"""RealNVP affine coupling and the fixed swap it is paired with (paper App. D, H, Fig. 9)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from p4bg.nn.base import Bijection, check_input

__all__ = ["RealNVPCoupling", "Swap", "mlp"]


def mlp(n_in: int, hidden: int, n_out: int, activation: type[nn.Module]) -> nn.Sequential:
    """Two hidden layers of ``hidden`` units (paper App. H)."""
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        activation(),
        nn.Linear(hidden, hidden),
        activation(),
        nn.Linear(hidden, n_out),
    )


class RealNVPCoupling(Bijection):
    """Affine coupling on a half split: the first ``dim // 2`` features condition the rest.

    forward (latent -> configuration): ``y1 = x1``, ``y2 = x2 · exp(s(x1)) + t(x1)``;
    ``ladj = Σ s(x1)``. ``t`` is an MLP with ReLU (``t_activation``; App. G's 2-D flows use tanh),
    ``s`` an MLP with tanh (App. H); the log-scale
    is bounded, ``s = α · tanh(s_raw)`` with a learnable scalar α (init 1), so one step can
    neither overflow ``exp`` nor collapse a dimension. Both output layers start at zero, so a new
    coupling is the identity.
    """

    def __init__(self, dim: int, hidden: int = 60, t_activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"RealNVPCoupling: dim must be >= 2, got {dim}")
        self.dim = dim
        self.n_cond = dim // 2
        n_out = dim - self.n_cond
        self.t = mlp(self.n_cond, hidden, n_out, t_activation)
        self.s = mlp(self.n_cond, hidden, n_out, nn.Tanh)
        self.scale = nn.Parameter(torch.ones(()))
        for net in (self.t, self.s):
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)

    def _shift_and_log_scale(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        return self.t(cond), self.scale * torch.tanh(self.s(cond))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, self.dim, "RealNVPCoupling.forward")
        x1, x2 = x[:, : self.n_cond], x[:, self.n_cond :]
        t, log_s = self._shift_and_log_scale(x1)
        y2 = torch.addcmul(t, x2, torch.exp(log_s))
        return torch.cat([x1, y2], dim=1), log_s.sum(1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_input(y, self.dim, "RealNVPCoupling.inverse")
        y1, y2 = y[:, : self.n_cond], y[:, self.n_cond :]
        t, log_s = self._shift_and_log_scale(y1)
        x2 = (y2 - t) * torch.exp(-log_s)
        return torch.cat([y1, x2], dim=1), -log_s.sum(1)


class Swap(Bijection):
    """Exchange the two halves ``[x1, x2] -> [x2, x1]`` (the baseline's mixing step); ladj 0."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.n_first = dim // 2

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, self.dim, "Swap.forward")
        # Forward puts the second part first so that the following coupling conditions on it.
        return torch.cat([x[:, self.n_first :], x[:, : self.n_first]], dim=1), x.new_zeros(
            x.shape[0]
        )

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_input(y, self.dim, "Swap.inverse")
        n_second = self.dim - self.n_first
        return torch.cat([y[:, n_second:], y[:, :n_second]], dim=1), y.new_zeros(y.shape[0])
