"""Baseline invertible linear layers, the yardsticks P4Inv is measured against (paper Fig. 2).

* :class:`DenseLinear` — a plain weight matrix; every call pays ``slogdet`` and, for the
  inverse, ``torch.linalg.inv``: O(n³) per call.
* :class:`LULinear` — ``W = P L U`` (Glow-style): ``ln|det W|`` is a sum over U's diagonal and the
  inverse is two triangular solves, O(n²) but sequential.

Both follow the bijection contract (forward = latent -> configuration, ``(out, ladj)``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from p4bg.nn.base import Bijection, check_input

__all__ = ["DenseLinear", "LULinear"]


class DenseLinear(Bijection):
    """``y = W x + b`` with W trained directly; inverse and log-det computed at every call.

    Args:
        dim: n. bias: learn b. weight: initial W, shape [n, n] (default the identity).
    """

    def __init__(
        self,
        dim: int,
        bias: bool = True,
        weight: Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        dtype = dtype or torch.get_default_dtype()
        if weight is None:
            weight = torch.eye(dim)
        elif weight.shape != (dim, dim):
            raise ValueError(
                f"DenseLinear: weight must have shape [{dim}, {dim}], got {list(weight.shape)}"
            )
        self.weight = nn.Parameter(weight.detach().to(device=device, dtype=dtype).clone())
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device)) if bias else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, self.dim, "DenseLinear.forward")
        y = x @ self.weight.T if self.bias is None else torch.addmm(self.bias, x, self.weight.T)
        return y, torch.linalg.slogdet(self.weight)[1].expand(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_input(y, self.dim, "DenseLinear.inverse")
        if self.bias is not None:
            y = y - self.bias
        x = y @ torch.linalg.inv(self.weight).T
        return x, -torch.linalg.slogdet(self.weight)[1].expand(y.shape[0])


class LULinear(Bijection):
    """``y = P L U x + b``: L unit lower-triangular, U upper-triangular with diagonal
    ``sign · exp(log_s)``, P a fixed permutation. Initialised to the identity.
    """

    def __init__(
        self,
        dim: int,
        bias: bool = True,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        kw = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        self.lower = nn.Parameter(torch.zeros(dim, dim, **kw))
        self.upper = nn.Parameter(torch.zeros(dim, dim, **kw))
        self.log_s = nn.Parameter(torch.zeros(dim, **kw))
        self.bias = nn.Parameter(torch.zeros(dim, **kw)) if bias else None
        self.register_buffer("sign_s", torch.ones(dim, **kw))
        self.register_buffer("perm", torch.arange(dim, device=device))
        self.register_buffer("perm_inv", torch.arange(dim, device=device))
        self.register_buffer("mask_lower", torch.tril(torch.ones(dim, dim, **kw), -1))
        self.register_buffer("eye", torch.eye(dim, **kw))

    def _factors(self) -> tuple[Tensor, Tensor]:
        L = self.lower * self.mask_lower + self.eye
        U = self.upper * self.mask_lower.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return L, U

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, self.dim, "LULinear.forward")
        L, U = self._factors()
        y = (x @ U.T @ L.T)[:, self.perm]
        if self.bias is not None:
            y = y + self.bias
        return y, self.log_s.sum().expand(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_input(y, self.dim, "LULinear.inverse")
        if self.bias is not None:
            y = y - self.bias
        L, U = self._factors()
        h = y[:, self.perm_inv].T  # [n, batch]: solve column-wise
        h = torch.linalg.solve_triangular(L, h, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(U, h, upper=True).T
        return x, -self.log_s.sum().expand(y.shape[0])
