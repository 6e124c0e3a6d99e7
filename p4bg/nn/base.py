"""The bijection contract shared by every invertible layer in p4bg (docs/design.md §2).

Direction is fixed project-wide: ``forward`` maps latent -> configuration (z -> x) and
``inverse`` maps configuration -> latent (x -> z). Both return ``(out, ladj)`` where
``ladj = log|det d out / d in|`` has shape ``[batch]``. With this single convention
``log q(x) = log p(z) + ladj_inverse(x)`` holds for any stack of layers, and no layer needs an
``inverse=`` flag.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class Bijection(nn.Module):
    """Base class of all invertible layers.

    Subclasses implement ``forward(x) -> (y, ladj)`` and ``inverse(y) -> (x, ladj)`` on
    inputs of shape ``[batch, dim]``; ``ladj`` has shape ``[batch]`` and the two ladj of a
    round trip sum to zero.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class Inverse(Bijection):
    """The inverse of a bijection: its ``forward`` is the wrapped layer's ``inverse``.

    Used to train a layer "through its inverse" (paper §4.2) or to reverse a block (the
    inverse Bent identity of App. G) without duplicating code.
    """

    def __init__(self, bijection: Bijection) -> None:
        super().__init__()
        self.bijection = bijection

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.bijection.inverse(x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.bijection(y)


class Sequential(Bijection):
    """Composition of bijections: ``forward`` runs them in order, ``inverse`` backwards.

    The log-determinants of the parts add up, because the Jacobian of a composition is the
    product of the parts' Jacobians.
    """

    def __init__(self, *layers: Bijection | Iterable[Bijection]) -> None:
        super().__init__()
        if len(layers) == 1 and not isinstance(layers[0], nn.Module):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            if not isinstance(layer, Bijection):
                raise TypeError(
                    f"Sequential: layer {i} is a {type(layer).__name__}, not a p4bg.nn.Bijection; "
                    "wrap it in a Bijection that returns (out, ladj)"
                )
        self.layers = nn.ModuleList(layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> Bijection:
        return self.layers[index]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ladj = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, step = layer(x)
            ladj = ladj + step
        return x, ladj

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        ladj = y.new_zeros(y.shape[0])
        for layer in reversed(self.layers):
            y, step = layer.inverse(y)
            ladj = ladj + step
        return y, ladj


def check_input(x: Tensor, dim: int, who: str) -> None:
    """Raise a clear error for input that is not ``[batch, dim]``."""
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(
            f"{who}: expected input of shape [batch, {dim}], got {list(x.shape)}; "
            "flatten configurations to [batch, dim] first"
        )
    if not torch.is_floating_point(x):
        raise TypeError(f"{who}: expected a floating-point tensor, got {x.dtype}")
