"""Elementwise Bent identity, the smooth bijection of R stacked with P4Inv layers (paper §3.4)."""

from __future__ import annotations

import torch
from torch import Tensor

from p4bg.nn.base import Bijection

__all__ = ["BentIdentity"]


class BentIdentity(Bijection):
    """``B(x) = (√(x² + 1) − 1)/2 + x``, elementwise; a diffeomorphism of R with slopes in
    (1/2, 3/2) and a closed-form inverse ``B⁻¹(y) = (2(2y + 1) − √((2y + 1)² + 3))/3``.

    ``ladj = Σ log(1 + x / (2√(x² + 1)))``. No parameters.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        root = torch.sqrt(x * x + 1.0)
        y = 0.5 * (root - 1.0) + x
        return y, torch.log1p(0.5 * x / root).sum(1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        # Solve (√(x²+1) − 1)/2 + x = y: with c = 2y + 1, √(x²+1) = c − 2x, so
        # 3x² − 4cx + c² − 1 = 0; the root with √(x²+1) > 0 is x = (2c − √(c² + 3))/3.
        c = 2.0 * y + 1.0
        x = (2.0 * c - torch.sqrt(c * c + 3.0)) / 3.0
        root = torch.sqrt(x * x + 1.0)
        return x, -torch.log1p(0.5 * x / root).sum(1)
