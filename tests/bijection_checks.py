"""Property checks every bijection must pass (engineering standard 2); reused by all layer tests."""

from __future__ import annotations

import torch
from torch.autograd.functional import jacobian

from p4bg.nn import Bijection


def check_bijection(layer: Bijection, x: torch.Tensor, atol: float = 1e-10) -> None:
    """Round trip, ladj vs autograd Jacobian, ladj_f + ladj_i = 0, batch == single, gradients.

    ``x``: a float64 batch in the layer's input space, shape [batch, dim].
    """
    y, ladj_f = layer(x)
    assert y.shape == x.shape and ladj_f.shape == (x.shape[0],)
    x_back, ladj_i = layer.inverse(y)
    assert ladj_i.shape == (x.shape[0],)
    torch.testing.assert_close(x_back, x, atol=atol, rtol=0)
    torch.testing.assert_close(ladj_f + ladj_i, torch.zeros_like(ladj_f), atol=atol, rtol=0)

    # ladj against the determinant of the autograd Jacobian, sample by sample, both directions.
    for i in range(min(3, x.shape[0])):
        jac_f = jacobian(lambda s: layer(s.unsqueeze(0))[0].squeeze(0), x[i])
        torch.testing.assert_close(
            torch.linalg.slogdet(jac_f)[1], ladj_f[i].detach(), atol=atol, rtol=1e-9
        )
        jac_i = jacobian(lambda s: layer.inverse(s.unsqueeze(0))[0].squeeze(0), y[i].detach())
        torch.testing.assert_close(
            torch.linalg.slogdet(jac_i)[1], ladj_i[i].detach(), atol=atol, rtol=1e-9
        )

    # Batched evaluation equals one sample at a time.
    for i in range(min(3, x.shape[0])):
        yi, li = layer(x[i : i + 1])
        torch.testing.assert_close(yi[0], y[i], atol=atol, rtol=1e-12)
        torch.testing.assert_close(li[0], ladj_f[i], atol=atol, rtol=1e-12)
        xi, lii = layer.inverse(y[i : i + 1].detach())
        torch.testing.assert_close(xi[0], x_back[i], atol=atol, rtol=1e-12)
        torch.testing.assert_close(lii[0], ladj_i[i], atol=atol, rtol=1e-12)

    # Every parameter receives a finite gradient from both directions.
    if not any(True for _ in layer.parameters()):
        return
    for direction in (layer.forward, layer.inverse):
        layer.zero_grad(set_to_none=True)
        out, ladj = direction(x)
        (out.square().sum() + ladj.sum()).backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None, f"{type(layer).__name__}.{name} got no gradient"
            assert torch.isfinite(p.grad).all(), (
                f"{type(layer).__name__}.{name}: non-finite gradient"
            )
    layer.zero_grad(set_to_none=True)
