"""P4Inv: an invertible linear layer trained through rank-one perturbations (paper §3, App. A/B).

The effective weight is ``W = A + u vᵀ``. ``A`` is frozen between merges and kept in float64
together with its inverse ``Ainv``, ``log|det A|`` and ``sign(det A)``; only the perturbation
``(u, v)`` (and the bias) are trained. Sherman–Morrison and the matrix determinant lemma give
``W⁻¹`` and ``det W`` from these in O(n²), so neither the forward nor the inverse pass ever
inverts or factorises a matrix. Every ``N`` optimizer steps the merge schedule
(:mod:`p4bg.nn.merge`) folds ``u vᵀ`` into ``A`` (a *merge*) and restarts the perturbation, which
is how the layer travels through GL(n).

Numerics that matter (docs/design.md §3):

* the determinant is never stored raw (it under/overflows); ``log|det|`` and its sign are;
* merges that would make the stored inverse ill-conditioned are skipped, except every
  ``force_every``-th attempt, which lets the matrix cross ``det = 0``; a merge with a zero or
  non-finite ``G = 1 + vᵀ Ainv u`` is never made;
* rounding errors that merges accumulate in ``Ainv`` are removed every ``correct_every`` merges
  by one residual-checked hyperpower step, with an exact float64 LU fallback.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from p4bg.nn.base import Bijection, check_input
from p4bg.nn.p4inv_autograd import P4Forward, P4Inverse

__all__ = [
    "MergeResult",
    "P4Inv",
    "p4inv_penalty",
]

# Buffers that stay float64 whatever the model dtype: precision here is what keeps the inverse
# exact over thousands of merges.
_FLOAT64_BUFFERS = ("A", "Ainv", "log_abs_det_A", "sign_A")

# Hyperpower coefficients of X⁰..X⁸ in V(120I − 393X + 735X² − 861X³ + 651X⁴ − 315X⁵ + 93X⁶
# − 15X⁷ + X⁸)/16 (Soleymani 2014): residual I − A V_new = E⁷ (3I + E)² / 16 with E = I − A V.
_HYPERPOWER = (120.0, -393.0, 735.0, -861.0, 651.0, -315.0, 93.0, -15.0, 1.0)


class MergeResult(enum.StrEnum):
    """What one merge attempt of one layer did."""

    ACCEPTED = "accepted"  # within the sanity bounds: merged
    FORCED = "forced"  # outside the bounds but forced: merged
    SKIPPED = "skipped"  # outside the bounds, not forced: perturbation kept, nothing merged
    REFUSED = "refused"  # G zero or non-finite: never merged, even when forced
    RESET_NONFINITE = "reset_nonfinite"  # u or v non-finite: perturbation reset, nothing merged

    @property
    def merged(self) -> bool:
        return self in (MergeResult.ACCEPTED, MergeResult.FORCED)


class P4Inv(Bijection):
    """Invertible affine layer ``y = (A + u vᵀ) x + b`` with O(n²) inverse and log-determinant.

    Args:
        dim: n, the number of features.
        bias: learn a bias ``b`` (trained directly, never perturbed).
        init: ``"identity"`` (A = I) or ``"reverse"`` (A_ij = δ_{i, n−1−j}, the reverse
            permutation that replaces a coordinate swap in the paper's Boltzmann generator).
        c_min, c_max: the penalty's bounds on ``ln|G|`` and ``ln|det W|`` (paper: −2, 15).
            Merges are accepted when ``ln|G| ≥ c_min − 4`` and
            ``c_min − 0.5 ≤ ln|det W| ≤ c_max + 0.5`` (App. A).
        dtype, device: of the parameters u, v, b — the model dtype. Inputs must have it;
            the float64 buffers keep their precision under ``.to()``, ``.float()`` etc.

    Shapes: ``forward(x)`` takes ``x`` of shape ``[batch, dim]`` and returns
    ``(y [batch, dim], ladj [batch])``; ``inverse`` likewise.
    """

    def __init__(
        self,
        dim: int,
        bias: bool = True,
        init: str = "identity",
        *,
        c_min: float = -2.0,
        c_max: float = 15.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"P4Inv: dim must be a positive int, got {dim!r}")
        if init not in ("identity", "reverse"):
            raise ValueError(f"P4Inv: init must be 'identity' or 'reverse', got {init!r}")
        if not c_min < c_max:
            raise ValueError(f"P4Inv: need c_min < c_max, got c_min={c_min}, c_max={c_max}")
        self.dim = dim
        self.init = init
        self.c_min = float(c_min)
        self.c_max = float(c_max)
        dtype = dtype or torch.get_default_dtype()

        eye = torch.eye(dim, dtype=torch.float64, device=device)
        A = eye if init == "identity" else eye.flip(1)
        # A permutation's inverse is its transpose (exact); reversing n items takes n//2 swaps.
        sign = 1.0 if init == "identity" or (dim // 2) % 2 == 0 else -1.0
        self.register_buffer("A", A.clone())
        self.register_buffer("Ainv", A.T.clone())
        self.register_buffer("log_abs_det_A", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("sign_A", torch.tensor(sign, dtype=torch.float64, device=device))
        self.register_buffer("n_merges", torch.zeros((), dtype=torch.int64, device=device))

        self.u = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))
        self.v = nn.Parameter(torch.randn(dim, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        # Model-dtype views of the float64 state, keyed by what they were computed from.
        self._cache: dict[tuple, tuple[tuple, object]] = {}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bias={self.bias is not None}, init={self.init!r}"

    # ------------------------------------------------------------------ dtype/device handling
    def _apply(self, fn, recurse=True):
        """Move the float64 buffers with the module but never change their dtype."""
        kept = {}
        for name in _FLOAT64_BUFFERS:
            kept[name] = self._buffers[name]
            self._buffers[name] = None  # nn.Module._apply skips None buffers
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in kept.items():
                device = fn(buf.new_empty(0)).device
                self._buffers[name] = buf.to(device=device, dtype=torch.float64)
            self._cache.clear()
        return self

    def _cached(self, key: tuple, sources: Iterable[Tensor], compute):
        """Return ``compute()``, recomputed only when a source tensor changed.

        In-place updates (optimizer steps, merges, ``load_state_dict``) bump a tensor's version
        counter; ``.to()`` gives a new storage. Both invalidate the entry. Writing through
        ``.data`` bypasses the version counter: use ``with torch.no_grad(): t.copy_(...)``.
        """
        if torch.compiler.is_compiling():  # a compiled graph casts in place, no cache needed
            return compute()
        if torch.is_inference_mode_enabled():  # inference tensors cannot serve autograd later
            return compute()
        stamp = tuple((t._version, t.data_ptr()) for t in sources)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = compute()
        self._cache[key] = (stamp, value)
        return value

    def _buffer_as(self, name: str, like: Tensor) -> Tensor:
        """A float64 buffer in the model dtype, cast once per change rather than per call."""
        buf = self._buffers[name]
        if buf.dtype == like.dtype and buf.device == like.device:
            return buf
        return self._cached(
            (name, like.dtype, like.device), (buf,), lambda: buf.to(like.device, like.dtype)
        )

    def _det_terms(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(Ainv u, G, ln|det W|)`` in the model dtype, differentiable in u and v.

        Under ``torch.no_grad`` (or with frozen u, v) they are cached until u, v or the
        stored inverse change, so inference costs one matrix–vector product per call.
        """

        def compute() -> tuple[Tensor, Tensor, Tensor]:
            Ainv = self._buffer_as("Ainv", like)
            Ainv_u = torch.mv(Ainv, self.u)
            G = 1.0 + torch.dot(self.v, Ainv_u)
            ladj = torch.log(torch.abs(G)) + self._buffer_as("log_abs_det_A", like)
            return Ainv_u, G, ladj

        grad = torch.is_grad_enabled() and (self.u.requires_grad or self.v.requires_grad)
        if grad or like.device.type != "cpu" or torch.is_inference_mode_enabled():
            return compute()  # on accelerators a value check would cost a host sync
        # Fused optimizers update u and v without bumping their version counters, so the cache
        # is validated by value: an O(n) comparison saves an O(n²) product.
        key = ("det_terms", like.dtype)
        hit = self._cache.get(key)
        stamp = (self.Ainv._version, self.Ainv.data_ptr(), self.log_abs_det_A._version)
        if (
            hit is not None
            and hit[0][0] == stamp
            and torch.equal(hit[0][1], self.u)
            and torch.equal(hit[0][2], self.v)
        ):
            value = hit[1]
        else:
            with torch.no_grad():
                value = compute()
            self._cache[key] = ((stamp, self.u.detach().clone(), self.v.detach().clone()), value)
        return tuple(t.clone() for t in value)  # callers may modify what they get

    def _check(self, x: Tensor, who: str) -> None:
        check_input(x, self.dim, who)
        if torch.is_autocast_enabled(x.device.type):
            raise RuntimeError(
                f"{who}: P4Inv does not run under torch.autocast (its rank-one terms need one "
                "dtype); wrap the call in torch.autocast(device_type, enabled=False)"
            )
        if x.dtype != self.v.dtype:
            raise TypeError(
                f"{who}: input dtype {x.dtype} differs from the layer's {self.v.dtype}; "
                f"cast the input or the model (model.to({x.dtype}))"
            )

    # ---------------------------------------------------------------------------- the bijection
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``y = A x + u (vᵀx) + b``; ``ladj = ln|G| + ln|det A|`` (the same for every sample)."""
        self._check(x, "P4Inv.forward")
        A = self._buffer_as("A", x)
        if torch.is_grad_enabled():  # one autograd node with a hand-written backward
            Ainv = self._buffer_as("Ainv", x)
            logdet = self._buffer_as("log_abs_det_A", x)
            return P4Forward.apply(x, self.u, self.v, self.bias, A, Ainv, logdet)
        y = torch.mm(x, A.T) if self.bias is None else torch.addmm(self.bias, x, A.T)
        y = torch.addr(y, torch.mv(x, self.v), self.u)
        _, _, ladj = self._det_terms(x)
        return y, ladj.expand(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Sherman–Morrison: ``w = Ainv (y − b)``, ``x = w − (Ainv u)(vᵀw)/G``."""
        self._check(y, "P4Inv.inverse")
        Ainv = self._buffer_as("Ainv", y)
        if torch.is_grad_enabled():
            logdet = self._buffer_as("log_abs_det_A", y)
            return P4Inverse.apply(y, self.u, self.v, self.bias, Ainv, logdet)
        if self.bias is not None:
            y = y - self.bias
        w = torch.mm(y, Ainv.T)
        Ainv_u, G, ladj = self._det_terms(y)
        x = torch.addr(w, torch.mv(w, self.v) / G, Ainv_u, alpha=-1.0)
        return x, (-ladj).expand(y.shape[0])

    # ------------------------------------------------------------------------- float64 views
    @torch.no_grad()
    def weight(self) -> Tensor:
        """The effective weight ``W = A + u vᵀ`` (float64, shape [n, n])."""
        return self.A + torch.outer(self.u.double(), self.v.double())

    @torch.no_grad()
    def weight_inverse(self) -> Tensor:
        """``W⁻¹`` by Sherman–Morrison from the stored inverse (float64, shape [n, n])."""
        u, v = self.u.double(), self.v.double()
        Ainv_u = self.Ainv @ u
        G = 1.0 + v @ Ainv_u
        return self.Ainv - torch.outer(Ainv_u, v @ self.Ainv) / G

    @torch.no_grad()
    def log_abs_det(self) -> float:
        """``ln|det W|`` from the determinant lemma (no factorisation)."""
        G = 1.0 + self.v.double() @ (self.Ainv @ self.u.double())
        return float(self.log_abs_det_A + torch.log(torch.abs(G)))

    @torch.no_grad()
    def det_sign(self) -> float:
        """``sign(det W)`` (±1, or 0 when G is exactly 0)."""
        G = 1.0 + self.v.double() @ (self.Ainv @ self.u.double())
        return float(self.sign_A * torch.sign(G))

    @torch.no_grad()
    def inverse_residual(self) -> float:
        """``max |I − A·Ainv|``: how far the stored inverse has drifted (O(n³), for logging)."""
        return float(self.inverse_residual_tensor())

    @torch.no_grad()
    def inverse_residual_tensor(self) -> Tensor:
        """:meth:`inverse_residual` as a 0-dim float64 tensor on the layer's device."""
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.A.device)
        return (eye - self.A @ self.Ainv).abs().max()

    # ------------------------------------------------------------------------------- penalty
    def penalty(self) -> Tensor:
        """``φ(ln|G|) + φ(ln|det W|)`` with ``φ(t) = ReLU(c_min − t)² + ReLU(t − c_max)²``.

        Added to the loss (times a weight Cp) it keeps the perturbation away from
        ``det W = 0``, where merges would be skipped (App. A). Scalar, model dtype.
        """
        _, G, ladj = self._det_terms(self.v)
        log_g = torch.log(torch.abs(G))
        return _barrier(log_g, self.c_min, self.c_max) + _barrier(ladj, self.c_min, self.c_max)

    # --------------------------------------------------------------------------------- merge
    @torch.no_grad()
    def reset_perturbation(self, generator: torch.Generator | None = None) -> None:
        """``u = 0``, ``v ~ N(0, I)``: W becomes A again (paper §3.2). ``generator`` (a CPU
        ``torch.Generator``) gives the draws their own random stream, so that other consumers
        of random numbers (validation, sampling) cannot change the training trajectory."""
        self.u.zero_()
        if generator is None:
            self.v.normal_()
        else:
            draw = torch.randn(self.dim, generator=generator, dtype=self.v.dtype,
                               device=generator.device)  # fmt: skip
            self.v.copy_(draw)

    @torch.no_grad()
    def merge_check(self) -> Tensor:
        """What a merge decision needs, as one float64 tensor on the layer's device:
        ``[u and v finite (1/0), G = 1 + vᵀ Ainv u, ln|det A|, merges so far]``. Computed
        without leaving the device, so that :class:`P4Merger` reads all layers' checks with
        one synchronisation (:meth:`merge_step` does it for one layer)."""
        u, v = self.u.double(), self.v.double()
        finite = torch.isfinite(u).all() & torch.isfinite(v).all()
        G = 1.0 + v @ (self.Ainv @ u)
        return torch.stack([finite.double(), G, self.log_abs_det_A.double().reshape(()),
                            self.n_merges.double().reshape(())])  # fmt: skip

    @torch.no_grad()
    def merge_step(
        self,
        force: bool = False,
        generator: torch.Generator | None = None,
        check: list[float] | None = None,
        decision: MergeResult | None = None,
    ) -> MergeResult:
        """Try to fold ``u vᵀ`` into ``A``, and say what happened (see :class:`MergeResult`).
        ``generator``: the random stream of the new ``v`` (see :meth:`reset_perturbation`).
        ``check``: :meth:`merge_check` already read to the host (default: read it now).
        ``decision``: :meth:`merge_decision` taken elsewhere (by rank 0 for all ranks)."""
        check = self.merge_check().tolist() if check is None else check
        result = self.merge_decision(check, force) if decision is None else decision
        if result is MergeResult.RESET_NONFINITE:
            self.reset_perturbation(generator)
        if not result.merged:
            return result
        _, G, log_abs_det, _ = check
        log_det = log_abs_det + math.log(abs(G))
        u, v = self.u.double(), self.v.double()
        Ainv_u = self.Ainv @ u
        vT_Ainv = v @ self.Ainv
        self.A.addr_(u, v)
        self.Ainv.addr_(Ainv_u, vT_Ainv, alpha=-1.0 / G)
        self.log_abs_det_A.fill_(log_det)
        self.sign_A.mul_(math.copysign(1.0, G))
        self.n_merges.add_(1)
        self.reset_perturbation(generator)
        return result

    def merge_decision(self, check: list[float], force: bool = False) -> MergeResult:
        """What a merge attempt with :meth:`merge_check`'s values ``check`` does (App. A): a
        pure function of them, so that one process can decide for all (:class:`P4Merger`)."""
        finite, G, log_abs_det, _ = check
        if not finite:
            return MergeResult.RESET_NONFINITE
        if not math.isfinite(G) or G == 0.0:
            return MergeResult.REFUSED
        log_g = math.log(abs(G))
        log_det = log_abs_det + log_g
        sane = log_g >= self.c_min - 4.0 and self.c_min - 0.5 <= log_det <= self.c_max + 0.5
        if sane:
            return MergeResult.ACCEPTED
        return MergeResult.FORCED if force else MergeResult.SKIPPED

    def merge(self, force: bool = False) -> bool:
        """Merge if the update is sane (or ``force``); return whether it merged (contract)."""
        return self.merge_step(force).merged

    @torch.no_grad()
    def correct_inverse(self, threshold: float = 1e-6) -> tuple[bool, float]:
        """One 7th-order hyperpower step on ``Ainv``, checked; exact LU recompute if it fails.

        The iteration only contracts while ``E = I − A Ainv`` is small, so the residual is
        measured before and after; if it did not shrink (beyond rounding) or stays above
        ``threshold``, ``Ainv``, ``ln|det A|`` and the sign are recomputed exactly by float64 LU.
        Returns ``(fell_back, residual_after)``.
        """
        A, V = self.A, self.Ainv
        eye = torch.eye(self.dim, dtype=A.dtype, device=A.device)
        X = A @ V
        before = float((eye - X).abs().max())
        P = _HYPERPOWER[-1] * X + _HYPERPOWER[-2] * eye
        for c in reversed(_HYPERPOWER[:-2]):
            P = torch.addmm(eye, X, P, beta=c)  # X @ P + c I
        V_new = V @ P / 16.0
        after = float((eye - A @ V_new).abs().max())
        rounding = 100.0 * self.dim * torch.finfo(torch.float64).eps
        if math.isfinite(after) and after <= threshold and after <= max(before, rounding):
            self.Ainv.copy_(V_new)
            return False, after
        inv, info = torch.linalg.inv_ex(A)
        if int(info) != 0:  # A itself is singular: nothing exact to fall back to
            return True, float("inf")
        sign, logabsdet = torch.linalg.slogdet(A)
        self.Ainv.copy_(inv)
        self.log_abs_det_A.copy_(logabsdet)
        self.sign_A.copy_(sign)
        return True, float((eye - A @ inv).abs().max())


def _barrier(t: Tensor, lo: float, hi: float) -> Tensor:
    return torch.relu(lo - t).square() + torch.relu(t - hi).square()


def p4inv_penalty(model: nn.Module) -> Tensor:
    """Sum of :meth:`P4Inv.penalty` over every P4Inv layer of ``model`` (0 if none)."""
    terms = [m.penalty() for m in model.modules() if isinstance(m, P4Inv)]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


# ------------------------------------------------------------------------ the merge schedule
