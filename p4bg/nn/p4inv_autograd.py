"""P4Inv's forward and inverse passes as single autograd nodes with hand-written backwards.

At the sizes of a Boltzmann generator's layers (n = 60, batches of hundreds) a training step is
bound by per-operation overhead, not arithmetic: one node replaces about a dozen. The backwards
are checked against autograd by gradcheck in float64 (tests/test_p4inv.py). A, Ainv and ln|det A|
enter as constants (the layer's buffers); u, v and the bias are the trained parameters.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["P4Forward", "P4Inverse"]


class P4Forward(torch.autograd.Function):
    """``y = A x + u (vᵀx) + b``, ``ladj = ln|1 + vᵀ Ainv u| + ln|det A|`` as one autograd node.

    Training steps are bound by per-operation overhead at these sizes; one node with a
    hand-written backward (checked by gradcheck) replaces about a dozen. A, Ainv, ln|det A| are
    constants (buffers). Shapes: x [B, n]; u, v, b [n]; returns y [B, n], ladj [B].
    """

    @staticmethod
    def forward(ctx, x, u, v, b, A, Ainv, logdet):
        xv = torch.mv(x, v)
        y = torch.mm(x, A.T) if b is None else torch.addmm(b, x, A.T)
        y = torch.addr(y, xv, u)
        a = torch.mv(Ainv, u)
        G = 1.0 + torch.dot(v, a)
        ladj = torch.log(torch.abs(G)) + logdet
        ctx.save_for_backward(x, xv, u, v, a, G, A, Ainv)
        ctx.has_bias = b is not None
        return y, ladj.expand(x.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gl):
        x, xv, u, v, a, G, A, Ainv = ctx.saved_tensors
        gyu = torch.mv(gy, u)  # uᵀ gy_i
        gx = torch.addr(torch.mm(gy, A), gyu, v)  # Aᵀ gy_i + v (uᵀ gy_i)
        gG = gl.sum() / G
        gu = torch.mv(gy.T, xv) + gG * torch.mv(Ainv.T, v)  # Σ gy_i (vᵀx_i) + ∂G/∂u
        gv = torch.mv(x.T, gyu) + gG * a  # Σ x_i (uᵀ gy_i) + ∂G/∂v
        gb = gy.sum(0) if ctx.has_bias else None
        return gx, gu, gv, gb, None, None, None


class P4Inverse(torch.autograd.Function):
    """``x = w − (Ainv u)(vᵀw)/G`` with ``w = Ainv (y − b)``, ``ladj = −ln|G| − ln|det A|``, as
    one autograd node (see :class:`P4Forward`). Shapes: y [B, n]; returns x [B, n], ladj [B]."""

    @staticmethod
    def forward(ctx, y, u, v, b, Ainv, logdet):
        # w = Ainv (y − b) = y Ainvᵀ − Ainv b: the bias costs a vector, not a [B, n] pass
        w = (
            torch.mm(y, Ainv.T)
            if b is None
            else torch.addmm(torch.mv(Ainv, b), y, Ainv.T, beta=-1.0)
        )
        a = torch.mv(Ainv, u)
        G = 1.0 + torch.dot(v, a)
        s = torch.mv(w, v)
        x = torch.addr(w, s / G, a, alpha=-1.0)
        ladj = -(torch.log(torch.abs(G)) + logdet)
        ctx.save_for_backward(w, s, v, a, G, Ainv)
        ctx.has_bias = b is not None
        return x, ladj.expand(y.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, gx, gl):
        w, s, v, a, G, Ainv = ctx.saved_tensors
        ga_x = torch.mv(gx, a)  # aᵀ gx_i
        gw = torch.addr(gx, ga_x / G, v, alpha=-1.0)  # through w and s = vᵀw
        gy = torch.mm(gw, Ainv)  # Ainvᵀ gw_i
        gG = torch.dot(ga_x, s) / (G * G) - gl.sum() / G
        ga = gG * v - torch.mv(gx.T, s) / G
        gu = torch.mv(Ainv.T, ga)
        gv = gG * a - torch.mv(w.T, ga_x) / G
        gb = -gy.sum(0) if ctx.has_bias else None
        return gy, gu, gv, gb, None, None
