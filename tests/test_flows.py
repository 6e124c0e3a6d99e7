"""Coupling, swap, Bent identity and the paper's flows: the bijection properties in float64."""

from __future__ import annotations

import pytest
import torch
from bijection_checks import check_bijection

from p4bg.flows import build_bent_flow, build_flow, count_parameters
from p4bg.nn import BentIdentity, Inverse, P4Inv, RealNVPCoupling, Sequential, Swap


def randomise(model: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Move every parameter (and P4Inv's perturbation) off its identity initialisation."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


@pytest.mark.parametrize("dim", [2, 5, 8])
def test_coupling_and_swap_are_bijections(dim):
    x = torch.randn(6, dim)
    check_bijection(randomise(RealNVPCoupling(dim, hidden=7)), x)
    check_bijection(Swap(dim), x)


def test_new_coupling_is_identity_and_log_scale_is_bounded():
    layer = RealNVPCoupling(6, hidden=5)
    x = torch.randn(4, 6)
    y, ladj = layer(x)
    torch.testing.assert_close(y, x)
    assert (ladj == 0).all()
    with torch.no_grad():
        layer.s[-1].bias.fill_(1e6)
    _, ladj = layer(x)
    assert torch.isfinite(ladj).all() and (ladj <= 3 * float(layer.scale.detach()) + 1e-9).all()


def test_swap_puts_the_second_half_first():
    x = torch.arange(5.0).unsqueeze(0)
    assert Swap(5)(x)[0].tolist() == [[2.0, 3.0, 4.0, 0.0, 1.0]]


def test_bent_identity():
    check_bijection(BentIdentity(), 3 * torch.randn(5, 4))
    x = torch.cat([torch.linspace(-1e6, 1e6, 2001), torch.linspace(-10, 10, 2001)]).unsqueeze(0)
    y, _ = BentIdentity()(x)
    x_back, _ = BentIdentity().inverse(y)
    torch.testing.assert_close(x_back, x, rtol=1e-12, atol=1e-12)
    assert (y[0, 1:2001] > y[0, :2000]).all()  # strictly increasing


@pytest.mark.parametrize("kind", ["p4inv", "swap"])
def test_small_paper_flow_is_a_bijection(kind):
    flow = randomise(build_flow(kind, dim=6, n_blocks=2, hidden=5))
    check_bijection(flow, torch.randn(4, 6), atol=1e-9)
    mixing = [m for m in flow if not isinstance(m, RealNVPCoupling)]
    assert (
        all(isinstance(m, P4Inv if kind == "p4inv" else Swap) for m in mixing) and len(mixing) == 4
    )


def test_bent_flow_is_a_bijection():
    flow = randomise(build_bent_flow(dim=2, n_blocks=3))
    assert isinstance(flow[1], BentIdentity) and isinstance(flow[3], Inverse)
    check_bijection(flow, torch.randn(5, 2), atol=1e-9)


def test_parameter_counts_of_the_paper_models():
    assert count_parameters(build_flow("p4inv")) == {
        "rnvp": 735_050,
        "spline": 0,
        "p4inv": 9_000,
        "other": 0,
        "total": 744_050,
    }
    assert count_parameters(build_flow("swap")) == {
        "rnvp": 735_050,
        "spline": 0,
        "p4inv": 0,
        "other": 0,
        "total": 735_050,
    }
    assert count_parameters(build_bent_flow())["p4inv"] == 1_200
    p4 = build_flow("p4inv", n_blocks=1)
    assert torch.equal(p4[1].A, torch.eye(60).flip(1))  # reverse-permutation init


def test_paper_flow_round_trip_at_full_size():
    flow = randomise(build_flow("p4inv"), scale=0.02)
    x = torch.randn(16, 60)
    z, ladj_i = flow.inverse(x)
    x_back, ladj_f = flow(z)
    torch.testing.assert_close(x_back, x, atol=1e-9, rtol=0)
    torch.testing.assert_close(ladj_f + ladj_i, torch.zeros(16), atol=1e-9, rtol=0)


def test_builder_arguments():
    with pytest.raises(ValueError, match="kind"):
        build_flow("glow")
    with pytest.raises(ValueError, match="n_blocks"):
        build_flow(n_blocks=0)
    assert isinstance(build_flow(n_blocks=1), Sequential)
