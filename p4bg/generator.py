"""The Boltzmann generator: prior N(0, I), flow, coordinate transform and target energy.

Direction (docs/design.md §2): latent ``z`` --flow--> ``y`` --coordinates--> configuration ``x``.
``log q(x) = log p(z) + ladj_inverse(x)``; log-weights ``log w = −u(x) − log q(x)`` (§5).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from p4bg.nn import Bijection

__all__ = ["BoltzmannGenerator", "Samples", "linlogcut"]


def linlogcut(u: Tensor, high: float = 1e3, max: float = 1e9) -> Tensor:
    """Regularised energy for the KL loss: ``u`` below ``high``, ``high + log(1 + u − high)``
    above, capped at ``max``. One clashing sample (u ~ 1e10) then moves the loss by a few units
    instead of dominating the gradient; ``+inf`` (a failed evaluation) maps to ``max`` with
    zero gradient.
    """
    if not high < max:
        raise ValueError(f"linlogcut: need high < max, got high={high}, max={max}")
    excess = torch.clamp(u - high, min=0.0)
    soft = torch.where(u > high, high + torch.log1p(excess), u)
    return torch.clamp(soft, max=max)


class Samples(NamedTuple):
    """Generated configurations and their weights.

    x: positions [n, 66] nm; z: prior draws [n, 60]; log_q: model log-density of x;
    u: reduced target energy (kT), +inf where the evaluation failed; log_w = −u − log_q.
    """

    x: Tensor
    z: Tensor
    log_q: Tensor
    u: Tensor
    log_w: Tensor


class BoltzmannGenerator(nn.Module):
    """Flow + coordinate transform + standard-normal prior, with a target energy ``u(x)`` (kT).

    Args:
        flow: a bijection on the latent space (forward = prior side -> coordinate side).
        coordinates: a bijection latent -> Cartesian (e.g. MixedCoordinateTransform).
        target: callable ``x [batch, 66] nm -> u [batch] kT``, differentiable (OpenMMEnergy), or
            None for likelihood-only use.
        prior_scale: standard deviation τ of the prior N(0, τ²I). Training uses 1; τ < 1 draws
            from a "cooler" model whose density is still exact, so its samples can be reweighted.
    """

    def __init__(
        self,
        flow: Bijection,
        coordinates: Bijection,
        target: Callable[[Tensor], Tensor] | None,
        prior_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not prior_scale > 0:
            raise ValueError(f"BoltzmannGenerator: prior_scale must be > 0, got {prior_scale}")
        self.flow = flow
        self.coordinates = coordinates
        self.target = target
        self.dim = int(coordinates.dim)
        self.prior_scale = float(prior_scale)

    def tempered(self, prior_scale: float) -> BoltzmannGenerator:
        """The same model with the prior N(0, τ²I), τ = ``prior_scale``: flow, coordinates and
        target are shared, not copied, and this generator is left as it is (``self`` when τ is
        already its own)."""
        if float(prior_scale) == self.prior_scale:
            return self
        return BoltzmannGenerator(self.flow, self.coordinates, self.target, prior_scale)

    def log_prior(self, z: Tensor) -> Tensor:
        """log N(z; 0, τ²I), shape [batch]."""
        tau = self.prior_scale
        return -0.5 * (z / tau).square().sum(1) - self.dim * (
            0.5 * math.log(2 * math.pi) + math.log(tau)
        )

    def prior_sample(
        self, n: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        ref = next(self.flow.parameters(), None)
        device = device or (ref.device if ref is not None else None)
        dtype = dtype or (ref.dtype if ref is not None else torch.get_default_dtype())
        return self.prior_scale * torch.randn(n, self.dim, device=device, dtype=dtype)

    def generate(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``z`` -> (x [batch, 66] nm, log q(x) [batch])."""
        y, ladj_flow = self.flow(z)
        x, ladj_coords = self.coordinates(y)
        return x, self.log_prior(z) - ladj_flow - ladj_coords

    def log_prob(self, x: Tensor) -> Tensor:
        """log q(x) of configurations ``x`` [batch, 66] nm, shape [batch]."""
        y, ladj_coords = self.coordinates.inverse(x)
        z, ladj_flow = self.flow.inverse(y)
        return self.log_prior(z) + ladj_coords + ladj_flow

    def nll(self, x: Tensor) -> Tensor:
        """Mean negative log-likelihood of ``x`` (the maximum-likelihood loss J_l)."""
        return -self.log_prob(x).mean()

    def reverse_kl(
        self,
        n: int,
        high: float = 1e3,
        max_energy: float = 1e9,
        z: Tensor | None = None,
        generate: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Energy-based loss J_e = E_z[u_cut(x) + log q(x)] (the reverse KL up to log Z), with the
        target energy regularised by :func:`linlogcut`. Returns (loss, raw u of the samples).

        ``z``: prior draws to use (from the caller's own random stream); default: ``n`` fresh
        ones. ``generate``: a stand-in for :meth:`generate` (e.g. its ``torch.compile``-d
        version; the target energy is called outside it). Samples whose energy evaluation
        failed (u = +inf) carry no gradient, so they are left out of the mean instead of adding
        linlogcut's cap (1e9) to the loss; the caller counts them. If every evaluation failed
        the loss is NaN (and the step is skipped).
        """
        if self.target is None:
            raise RuntimeError("BoltzmannGenerator.reverse_kl: no target energy was given")
        x, log_q = (generate or self.generate)(self.prior_sample(n) if z is None else z)
        return self.reverse_kl_of(x, log_q, high, max_energy)

    def reverse_kl_of(
        self, x: Tensor, log_q: Tensor, high: float = 1e3, max_energy: float = 1e9
    ) -> tuple[Tensor, Tensor]:
        """:meth:`reverse_kl` of samples already generated: ``x`` [batch, 66] nm with their
        ``log_q`` [batch]; returns (loss, raw u of the samples, kT)."""
        total, count, u = self.reverse_kl_parts(x, log_q, high, max_energy)
        # a masked mean, not terms[ok]: no host synchronisation; every evaluation failed → 0/0
        return total / count, u

    def reverse_kl_parts(
        self, x: Tensor, log_q: Tensor, high: float = 1e3, max_energy: float = 1e9
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The sum of :meth:`reverse_kl_of`'s terms over the samples whose energy evaluation
        succeeded, their count, and the raw u (kT, [batch], +inf where it failed): the pieces
        of its mean, for a mean over the samples of several processes (sums and counts add).
        ``x`` [batch, 66] nm, ``log_q`` [batch]."""
        if self.target is None:
            raise RuntimeError("BoltzmannGenerator.reverse_kl: no target energy was given")
        u = self.target(x)
        ok = torch.isfinite(u)  # a non-finite log q stays in: the loss is NaN, the step skipped
        terms = linlogcut(u, high, max_energy) + log_q
        return torch.where(ok, terms, 0.0).sum(), ok.sum(), u.detach()

    def nll_and_generate(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The two flow passes of a mixed training step: (:meth:`nll` of data ``x``, and
        :meth:`generate` of prior draws ``z``: samples [batch, 66] nm and their log q).

        One call, so that ``torch.compile`` makes the step one graph: one guard check over the
        parameters, one backward that sums both passes' gradients in its own kernels."""
        return self.nll(x), *self.generate(z)

    @torch.no_grad()
    def sample(self, n: int, with_energy: bool = True) -> Samples:
        """Draw ``n`` configurations with log q, and (``with_energy``) u and log-weights."""
        z = self.prior_sample(n)
        x, log_q = self.generate(z)
        if with_energy:
            if self.target is None:
                raise RuntimeError(
                    "BoltzmannGenerator.sample: no target energy; pass with_energy=False"
                )
            u = self.target(x)
        else:
            u = torch.full_like(log_q, float("nan"))  # not evaluated, by request
        return Samples(x, z, log_q, u, -u - log_q)
