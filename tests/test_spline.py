"""Rational-quadratic spline coupling: the bijection properties in float64, zuko's spline as the
oracle, and the tail bound and bin edges."""

from __future__ import annotations

import pytest
import torch
from bijection_checks import check_bijection

from p4bg.flows import build_flow, count_parameters
from p4bg.nn import P4Inv, SplineCoupling, Swap, rational_quadratic_spline
from p4bg.nn.spline import _DERIVATIVE_SHIFT, MIN_BIN, MIN_DERIVATIVE


def random_spline(dim: int, hidden: int = 7, bins: int = 5, bound: float = 3.0, scale: float = 0.4):
    layer = SplineCoupling(dim, hidden, bins=bins, tail_bound=bound)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer


def random_params(shape: tuple[int, ...], bins: int, scale: float = 1.5):
    """Unconstrained widths, heights, derivatives with the bin axis first (the function's layout)."""
    return (scale * torch.randn(bins, *shape), scale * torch.randn(bins, *shape),
            scale * torch.randn(bins - 1, *shape))  # fmt: skip


@pytest.mark.parametrize("dim", [2, 5, 8])
def test_spline_coupling_is_a_bijection(dim):
    torch.manual_seed(dim)
    # points inside the spline's interval and in both tails
    x = 2.5 * torch.randn(6, dim)
    x[0, -1], x[1, -1] = 4.0, -3.5
    check_bijection(random_spline(dim), x)


def test_spline_coupling_bijection_in_the_tails_only():
    torch.manual_seed(1)
    x = torch.randn(4, 6)
    x[:, 3:] = torch.tensor([4.0, -5.0, 7.0])
    layer = random_spline(6)
    check_bijection(layer, x)
    y, ladj = layer(x)
    assert torch.equal(y, x) and torch.equal(ladj, torch.zeros(4))


def test_new_spline_coupling_is_the_identity():
    layer = SplineCoupling(6, hidden=5, bins=8, tail_bound=4.0)
    x = 3 * torch.randn(10, 6)
    y, ladj = layer(x)
    torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, torch.zeros(10), atol=1e-12, rtol=0)
    assert (
        abs(MIN_DERIVATIVE + torch.nn.functional.softplus(torch.tensor(_DERIVATIVE_SHIFT)) - 1)
        < 1e-15
    )


def test_spline_matches_zuko_monotonic_rqs():
    """zuko's MonotonicRQSTransform is a second implementation of the same spline (same knots,
    unit slopes at the ends, identity outside): fed the knots of ours it gives the same values,
    inverse and log-slopes."""
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(0)
    bins, bound = 6, 3.0
    w, h, d = random_params((400,), bins)
    x = 4.0 * torch.rand(400) * 2 - 4.0  # covers both tails
    y, log_slope = rational_quadratic_spline(x, w, h, d, bound)
    x_back, log_slope_inv = rational_quadratic_spline(y, w, h, d, bound, inverse=True)

    from p4bg.nn.spline import _knots

    ref = zuko.transforms.MonotonicRQSTransform(
        torch.zeros(400, bins), torch.zeros(400, bins), torch.zeros(400, bins - 1), bound=bound
    )
    ref.horizontal = _knots(w, bound)[1].T  # zuko's bin axis is the last
    ref.vertical = _knots(h, bound)[1].T
    slopes = MIN_DERIVATIVE + torch.nn.functional.softplus(d + _DERIVATIVE_SHIFT)
    ref.derivatives = torch.nn.functional.pad(slopes.T, (1, 1), value=1.0)
    y_ref, ladj_ref = ref.call_and_ladj(x)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(log_slope, ladj_ref, atol=1e-10, rtol=0)
    # the inverse: to the conditioning of these bins (slopes down to ~1e-3)
    torch.testing.assert_close(ref.inv(y), x_back, atol=1e-10, rtol=0)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(log_slope_inv, -log_slope, atol=1e-10, rtol=0)


def test_spline_knots_slopes_and_bin_edges():
    """At every knot the spline takes the knot's value and slope, from the bin on either side;
    a point on a knot goes round trip with ladj summing to 0."""
    torch.manual_seed(2)
    bins, bound = 7, 2.0
    w, h, d = random_params((1,), bins)
    from p4bg.nn.spline import _knots

    _, knot_x = _knots(w, bound)
    _, knot_y = _knots(h, bound)
    slopes = torch.nn.functional.pad(
        MIN_DERIVATIVE + torch.nn.functional.softplus(d[:, 0] + _DERIVATIVE_SHIFT),
        (1, 1),
        value=1.0,
    )
    kx, ky, ks = knot_x[:, 0], knot_y[:, 0], slopes
    expand = [t.expand(-1, len(kx)) for t in (w, h, d)]
    y, log_slope = rational_quadratic_spline(kx, *expand, bound)
    torch.testing.assert_close(y, ky, atol=1e-13, rtol=0)
    torch.testing.assert_close(log_slope, ks.log(), atol=1e-10, rtol=0)
    # just left and right of each interior knot: continuous value and slope
    eps = 1e-11
    for side in (-eps, eps):
        yl, sl = rational_quadratic_spline(kx[1:-1] + side, *[t[:, 1:-1] for t in expand], bound)
        torch.testing.assert_close(yl, ky[1:-1] + side * ks[1:-1], atol=1e-12, rtol=0)
        torch.testing.assert_close(sl, ks[1:-1].log(), atol=1e-7, rtol=0)
    # inverse at the knots: the knots back, with the opposite log-slopes
    x_back, log_inv = rational_quadratic_spline(ky, *expand, bound, inverse=True)
    torch.testing.assert_close(x_back, kx, atol=1e-13, rtol=0)
    torch.testing.assert_close(log_inv, -ks.log(), atol=1e-10, rtol=0)


def test_spline_tail_bound_is_identity_with_linear_tails():
    torch.manual_seed(3)
    bins, bound = 5, 2.5
    w, h, d = random_params((8,), bins)
    x = torch.tensor([-1e6, -10.0, -2.5 - 1e-12, 2.5 + 1e-12, 3.0, 10.0, 1e6, 100.0])
    y, log_slope = rational_quadratic_spline(x, w, h, d, bound)
    assert torch.equal(y, x) and torch.equal(log_slope, torch.zeros(8))
    y, log_slope = rational_quadratic_spline(x, w, h, d, bound, inverse=True)
    assert torch.equal(y, x) and torch.equal(log_slope, torch.zeros(8))
    # at and just inside ±B: the end knots are fixed and the slope there is 1 (C¹ tails)
    edge = torch.tensor([-bound, bound, -bound + 1e-7, bound - 1e-7])
    w4, h4, d4 = (t[:, :4] for t in (w, h, d))
    y, log_slope = rational_quadratic_spline(edge, w4, h4, d4, bound)
    torch.testing.assert_close(y[:2], edge[:2], atol=1e-14, rtol=0)
    torch.testing.assert_close(y[2:], edge[2:], atol=1e-12, rtol=0)
    torch.testing.assert_close(log_slope, torch.zeros(4), atol=1e-5, rtol=0)
    # gradients at the bound and beyond are finite
    xg = torch.tensor([-bound, bound, 1e3, -1e3], requires_grad=True)
    wg, hg, dg = (t[:, :4].clone().requires_grad_() for t in (w, h, d))
    out, ls = rational_quadratic_spline(xg, wg, hg, dg, bound)
    (out.sum() + ls.sum()).backward()
    for g in (xg.grad, wg.grad, hg.grad, dg.grad):
        assert torch.isfinite(g).all()
    torch.testing.assert_close(xg.grad[2:], torch.ones(2))


def test_spline_round_trip_error_is_bounded_by_its_conditioning():
    """With extreme bins and slopes (down to 1e-7) the inverse is ill-conditioned, and the round
    trip's error is that of the conditioning, not more."""
    torch.manual_seed(6)
    n, bins, bound = 100_000, 5, 3.0
    w, h, d = random_params((n,), bins, scale=6.0)
    x = 2 * bound * torch.rand(n) - bound
    y, log_slope = rational_quadratic_spline(x, w, h, d, bound)
    x_back, log_inv = rational_quadratic_spline(y, w, h, d, bound, inverse=True)
    err = (x_back - x).abs()
    assert err.max() < 1e-8  # where dx/dy reaches 1e7
    assert err[log_slope.exp() >= 1e-2].max() < 1e-11  # where the inverse is well conditioned
    assert torch.isfinite(log_inv).all()


def test_spline_is_monotonic_and_accurate_in_float32():
    torch.manual_seed(4)
    w, h, d = (t.float() for t in random_params((1,), 8, scale=1.0))
    x = torch.linspace(-6, 6, 20_001, dtype=torch.float32)
    expand = [t.expand(-1, len(x)) for t in (w, h, d)]
    y, log_slope = rational_quadratic_spline(x, *expand, 5.0)
    assert (y[1:] >= y[:-1]).all() and torch.isfinite(log_slope).all()
    x_back, log_inv = rational_quadratic_spline(y, *expand, 5.0, inverse=True)
    assert (x_back - x).abs().max() < 2e-5
    assert (log_inv + log_slope).abs().max() < 1e-3


def test_spline_coupling_rejects_bad_settings():
    with pytest.raises(ValueError, match="bins"):
        SplineCoupling(4, bins=1)
    with pytest.raises(ValueError, match="tail_bound"):
        SplineCoupling(4, tail_bound=0.0)
    with pytest.raises(ValueError, match=r"shape \[batch, 4\]"):
        SplineCoupling(4)(torch.zeros(3, 5))
    assert MIN_BIN * 8 < 1


@pytest.mark.parametrize("mixing", ["p4inv", "swap"])
def test_small_spline_flow_is_a_bijection(mixing):
    torch.manual_seed(5)
    flow = build_flow(
        mixing, dim=6, n_blocks=2, hidden=5, coupling="spline", bins=4, tail_bound=3.0
    )
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    check_bijection(flow, 1.5 * torch.randn(4, 6), atol=1e-9)
    kinds = [type(m) for m in flow]
    mix = P4Inv if mixing == "p4inv" else Swap
    assert kinds == [SplineCoupling, mix, SplineCoupling, mix] * 2


def test_parameter_counts_of_the_four_combinations():
    for coupling in ("rnvp", "spline"):
        for mixing in ("p4inv", "swap"):
            counts = count_parameters(
                build_flow(mixing, 60, n_blocks=2, hidden=32, coupling=coupling, bins=8)
            )
            coupling_params = 4 * ((30 * 32 + 32) + (32 * 32 + 32) + (32 * 30 * 23 + 30 * 23))
            if coupling == "rnvp":
                coupling_params = 4 * (2 * ((30 * 32 + 32) + (32 * 32 + 32) + (32 * 30 + 30)) + 1)
            assert counts[coupling] == coupling_params
            assert counts["p4inv"] == (4 * 180 if mixing == "p4inv" else 0)
            assert counts["total"] == coupling_params + counts["p4inv"]


def test_spline_flow_traces_without_graph_breaks():
    """torch.compile (``compile=true``) sees the spline flow's inverse pass as one graph."""
    flow = build_flow("p4inv", 8, n_blocks=1, hidden=6, coupling="spline", bins=4)

    def nll(x):
        z, ladj = flow.inverse(x)
        return (0.5 * z.square().sum(1) - ladj).mean()

    explanation = torch._dynamo.explain(nll)(torch.randn(5, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons
