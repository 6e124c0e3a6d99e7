"""Flow builders: the paper's Boltzmann-generator flow (App. H, Fig. 9) and Bent-identity stacks
(App. G). Forward maps latent -> configuration, as every bijection in p4bg."""

from __future__ import annotations

from typing import Any

from torch import nn

from p4bg.nn import (
    BentIdentity,
    Inverse,
    P4Inv,
    RealNVPCoupling,
    Sequential,
    SplineCoupling,
    Swap,
)

__all__ = [
    "COUPLINGS",
    "MIXINGS",
    "build_bent_flow",
    "build_flow",
    "build_rnvp_2d",
    "count_parameters",
    "flow_from_config",
]


COUPLINGS = ("rnvp", "spline")
MIXINGS = ("p4inv", "swap")


def build_flow(
    kind: str = "p4inv",
    dim: int = 60,
    n_blocks: int = 25,
    hidden: int = 60,
    coupling: str = "rnvp",
    bins: int = 8,
    tail_bound: float = 5.0,
) -> Sequential:
    """``n_blocks`` blocks of coupling, mixing, coupling, mixing (paper Fig. 9).

    ``kind`` is the mixing. ``"swap"``: the fixed half swap (the baseline's fixed permutation).
    ``"p4inv"``: a ``dim``-dim P4Inv layer with bias, initialised to the reverse permutation
    (A_ij = δ_{i, n−1−j}), trained through rank-one perturbations.

    ``coupling``: ``"rnvp"`` (the paper's affine coupling: t and s conditioners with two hidden
    layers of ``hidden``) or ``"spline"`` (a rational-quadratic spline of ``bins`` pieces on
    ``[−tail_bound, tail_bound]``, identity outside; one conditioner with two hidden layers of
    ``hidden``).
    """
    if kind not in MIXINGS:
        raise ValueError(f"build_flow: kind (the mixing) must be 'p4inv' or 'swap', got {kind!r}")
    if coupling not in COUPLINGS:
        raise ValueError(f"build_flow: coupling must be 'rnvp' or 'spline', got {coupling!r}")
    if dim < 2 or n_blocks < 1 or hidden < 1:
        raise ValueError(
            "build_flow: need dim >= 2, n_blocks >= 1, hidden >= 1 "
            f"(got {dim}, {n_blocks}, {hidden})"
        )

    def mixing() -> nn.Module:
        return P4Inv(dim, bias=True, init="reverse") if kind == "p4inv" else Swap(dim)

    def coupling_layer() -> nn.Module:
        if coupling == "spline":
            return SplineCoupling(dim, hidden, bins=bins, tail_bound=tail_bound)
        return RealNVPCoupling(dim, hidden)

    layers = []
    for _ in range(n_blocks):
        layers += [coupling_layer(), mixing(), coupling_layer(), mixing()]
    return Sequential(layers)


def flow_from_config(config: Any, dim: int) -> Sequential:
    """The flow a training configuration (:class:`p4bg.config.TrainConfig`) describes."""
    return build_flow(config.mixing, dim, config.n_blocks, config.hidden, coupling=config.coupling,
                      bins=config.spline_bins, tail_bound=config.spline_tail_bound)  # fmt: skip


def build_bent_flow(dim: int = 2, n_blocks: int = 100) -> Sequential:
    """App. G: blocks of P4Inv (with bias), Bent identity, P4Inv, inverse Bent identity, with the
    P4Inv layers initialised to the identity."""
    layers = []
    for _ in range(n_blocks):
        layers += [
            P4Inv(dim, bias=True),
            BentIdentity(),
            P4Inv(dim, bias=True),
            Inverse(BentIdentity()),
        ]
    return Sequential(layers)


def build_rnvp_2d(dim: int = 2, n_layers: int = 5, hidden: int = 6) -> Sequential:
    """App. G's RealNVP baseline for the 2-D densities: ``n_layers`` layers of (coupling, swap,
    coupling, swap), conditioners with two hidden layers of ``hidden`` tanh units for both t and
    s: 1,230 parameters at the defaults, like the 1,200 of the P4Inv/Bent stack."""
    layers = []
    for _ in range(n_layers):
        for _ in range(2):
            layers += [RealNVPCoupling(dim, hidden, t_activation=nn.Tanh), Swap(dim)]
    return Sequential(layers)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters by kind: ``rnvp`` (affine coupling conditioners and scales),
    ``spline`` (spline coupling conditioners), ``p4inv`` (u, v, bias of P4Inv layers), ``other``
    and ``total``."""

    def trainable(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    total = trainable(model)
    rnvp = sum(trainable(m) for m in model.modules() if isinstance(m, RealNVPCoupling))
    spline = sum(trainable(m) for m in model.modules() if isinstance(m, SplineCoupling))
    p4inv = sum(trainable(m) for m in model.modules() if isinstance(m, P4Inv))
    other = total - rnvp - spline - p4inv
    return {"rnvp": rnvp, "spline": spline, "p4inv": p4inv, "other": other, "total": total}
