"""Many independent 2-D flows trained as one: the engine of the paper's Fig. 6/8 schedule
(benchmarks/densities_2d.py, issue "The paper's Fig. 6 and 8 at the paper's own schedule").

The App. G models are tiny (1,200 parameters) and deep (400 layers of 2 × 2), so a training
step of one model costs ~60 ms here in per-operation overhead, not arithmetic: the paper's
8 × 20,000 steps for 3 models × 8 densities × 3 seeds would take days. Here every model of one
kind (all densities, all seeds) is a slice of stacked tensors, so each operation serves them all:

* :class:`P4InvStack`: M stacks of App. G's blocks (P4Inv, Bent, P4Inv, inverse Bent), with the
  P4Inv state of every layer of every model in one tensor: W = A + u vᵀ and its Sherman–Morrison
  inverse are formed for all 200 layers of all models in one operation per step, and each
  layer's log-determinant ln|1 + vᵀA⁻¹u| + ln|det A| (the same for every sample) is summed
  outside the loop over layers. Merges, forced merges, inverse corrections and the LU fallback
  follow :class:`p4bg.nn.P4Inv` and :class:`p4bg.nn.P4Merger` decision for decision, per model
  and per layer (tests/test_density_stack.py checks them against those classes in float64).
* :class:`RNVPStack`: M copies of ``p4bg.flows.build_rnvp_2d`` on stacked parameters, its
  couplings written out for the stack (t and s as one block-diagonal network).
* :class:`StackedAdam`: Adam with a step count per parameter element, so that one layer of
  one model can forget its optimizer state at a merge (as P4Merger's reset does) and one model
  can skip a step with a non-finite loss while the others take it. torch.optim.Adam has one
  step count per tensor, which is why it does not fit here.

No library does this (zuko and nflows have no rank-one linear layers, torch.func cannot vmap
P4Inv's autograd nodes and caches), hence this module. Everything here is float64-exact
against the one-model classes up to rounding; the models' dtype is the caller's.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from p4bg.flows import build_bent_flow, build_rnvp_2d
from p4bg.nn import P4Inv
from p4bg.nn.p4inv import _HYPERPOWER

__all__ = ["P4InvStack", "RNVPStack", "StackStats", "StackedAdam", "standard_normal_log_prob"]

LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) of 2-D points: z [..., 2] -> [...]."""
    return -0.5 * z.square().sum(-1) - LOG_2PI


# --------------------------------------------------------------------------------- optimizer
class StackedAdam:
    """Adam (torch.optim.Adam's update, no weight decay, no amsgrad) with a step count per
    element of every parameter.

    ``step(active)``: ``active`` [M] bool says which models take the step (the others keep
    parameters and state); a parameter's first dimension is the model. ``reset(param, mask)``
    returns the elements under ``mask`` to a fresh optimizer's state (step 0).
    """

    def __init__(self, params: list[Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.betas, self.eps = float(lr), betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        # float64 step counts: 1 − β₂ᵗ in float32 loses 5e-5 of itself to cancellation
        self.steps = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]

    @torch.no_grad()
    def step(self, active: Tensor) -> None:
        beta1, beta2 = self.betas
        for p, m, v, t in zip(self.params, self.exp_avg, self.exp_avg_sq, self.steps, strict=True):
            if p.grad is None:
                continue
            on = active.reshape(-1, *([1] * (p.dim() - 1))).expand_as(p)
            g = torch.where(on, p.grad, torch.zeros_like(p.grad))
            t.add_(on.to(t.dtype))
            m.copy_(torch.where(on, m.lerp(g, 1 - beta1), m))
            v.copy_(torch.where(on, v * beta2 + (1 - beta2) * g * g, v))
            step = t.clamp(min=1)
            step_size = (self.lr / (1 - beta1**step)).to(p.dtype)
            bias2_sqrt = torch.sqrt(1 - beta2**step).to(p.dtype)
            denom = v.sqrt() / bias2_sqrt + self.eps
            update = m / denom * step_size
            p.sub_(torch.where(on, update, torch.zeros_like(update)))

    @torch.no_grad()
    def reset(self, param: Tensor, mask: Tensor) -> None:
        """Forget the state of ``param``'s elements under ``mask`` (broadcast to its shape)."""
        i = next(k for k, p in enumerate(self.params) if p is param)
        mask = mask.expand_as(param) if mask.shape != param.shape else mask
        for state in (self.exp_avg[i], self.exp_avg_sq[i], self.steps[i]):
            state.masked_fill_(mask, 0)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq,
                "steps": self.steps}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.lr = float(state["lr"])
        for mine, theirs in ((self.exp_avg, state["exp_avg"]),
                             (self.exp_avg_sq, state["exp_avg_sq"]),
                             (self.steps, state["steps"])):  # fmt: skip
            for a, b in zip(mine, theirs, strict=True):
                a.copy_(b)


# ------------------------------------------------------------------------------- P4Inv stack
class _Program(torch.autograd.Function):
    """A stack's layers after their weights are formed, as one autograd node.

    ``program``: ("A", l) the affine map x ↦ x Wt[:, l] + shift[:, l]; ("B",) the Bent
    identity; ("C",) its inverse (always after an "A"). x [M, B, 2], Wt [M, L, 2, 2], shift
    [M, L, 2]. Returns the output [M, B, 2] and the Bent layers' log-determinant per point
    [M, B]: Σ ln B'(input of B) − Σ ln B'(output of C).

    Why by hand: a step is bound by the number of operations, not by arithmetic. Inside, the
    points are [2, M, B] (coordinate first) and the weights [2, M, 1] columns, so that an affine
    layer is two multiply-adds over both coordinates (a batched product of 2 × 2 matrices is a
    library call per model, several times slower) and a Bent layer five elementwise
    operations. The backward multiplies by factors computed for all layers at once before its
    loop (B'(x), 1/B'(y) and the log-determinant's derivatives times its incoming gradient):
    per block 6 operations against autograd's ~40; the weights' gradients come after the loop
    from buffers the forward wrote the Bent layers' inputs and outputs into.
    """

    @staticmethod
    def forward(ctx, x, Wt, shift, program):
        M, B = x.shape[:2]
        L = Wt.shape[1]
        n_b = sum(op[0] == "B" for op in program)
        n_c = sum(op[0] == "C" for op in program)
        rows = Wt.permute(1, 2, 3, 0).unsqueeze(-1).contiguous()  # [L, i, j, M, 1]
        sh_t = shift.permute(1, 2, 0).unsqueeze(-1).contiguous()  # [L, j, M, 1]
        # views made once (indexing a tensor per use costs an operation each time);
        # an affine map followed by C gives c = 2a + 1 at once
        r, r2 = _views(rows, 2), _views(2.0 * rows, 2)
        sh, sh2 = _views(sh_t, 1), _views(2.0 * sh_t + 1.0, 1)
        # the Bent layers' inputs, the inverse ones' outputs, and √(x² + 1) of both
        b_in, b_root = x.new_empty(n_b, 2, M, B), x.new_empty(n_b, 2, M, B)
        b_out = x.new_empty(n_b, 2, M, B)
        c_out, c_root = x.new_empty(n_c, 2, M, B), x.new_empty(n_c, 2, M, B)
        b_in_v, b_root_v, b_out_v, c_out_v, c_root_v = (
            list(t.unbind(0)) for t in (b_in, b_root, b_out, c_out, c_root))  # fmt: skip
        xs = x.permute(2, 0, 1).contiguous()
        affine: list[tuple[int, str, int]] = []  # program order: (layer, input kind, its row)
        where = ("x", 0)
        kb = kc = 0
        i = 0
        while i < len(program):
            op = program[i]
            following = program[i + 1][0] if i + 1 < len(program) else None
            if op[0] == "A":
                layer = op[1]
                affine.append((layer, *where))
                rr, ss = (r2, sh2) if following == "C" else (r, sh)
                x0, x1 = xs.unbind(0)
                if following == "B":
                    y = b_in_v[kb].copy_(ss[layer]).addcmul_(x0, rr[layer][0])
                else:
                    y = torch.addcmul(ss[layer], x0, rr[layer][0])
                xs = y.addcmul_(x1, rr[layer][1])
                where = ("a", 0)
                if following == "C":  # xs holds c = 2a + 1: B⁻¹(a) = (2c − √(c² + 3))/3
                    c = xs
                    root = (c * c).add_(3.0).sqrt_()
                    xs = torch.add(c, root, alpha=-0.5, out=c_out_v[kc]).mul_(2.0 / 3.0)
                    torch.add(c, xs, alpha=-2.0, out=c_root_v[kc])  # √(y² + 1) = c − 2y
                    where = ("c", kc)
                    kc += 1
                    i += 1
            elif op[0] == "B":
                if i == 0 or program[i - 1][0] != "A":  # its input is not in b_in yet
                    b_in_v[kb].copy_(xs)
                a = b_in_v[kb]
                root = torch.sqrt((a * a).add_(1.0), out=b_root_v[kb])
                xs = torch.add(a, root, alpha=0.5, out=b_out_v[kb]).sub_(0.5)
                where = ("b", kb)
                kb += 1
            else:
                raise ValueError(f"_Program: a C must follow an A, at {i}")
            i += 1
        if sorted(a[0] for a in affine) != list(range(L)) or any(a[1] == "a" for a in affine):
            raise ValueError("_Program: every layer once, its input a Bent layer's or x")
        ladj = _log_slope(b_in, b_root) - _log_slope(c_out, c_root)
        ctx.program, ctx.affine = program, affine
        ctx.save_for_backward(x, Wt, b_in, b_root, b_out, c_out, c_root)
        return xs.permute(1, 2, 0), ladj

    @staticmethod
    def backward(ctx, g, gl):
        x, Wt, b_in, b_root, b_out, c_out, c_root = ctx.saved_tensors
        program, affine = ctx.program, ctx.affine
        M, B = g.shape[:2]
        L = Wt.shape[1]
        cols = _views(Wt.permute(1, 3, 2, 0).unsqueeze(-1).contiguous(), 2)  # [L, j, i, M, 1]
        gl = g.new_zeros(M, B) if gl is None else gl
        # B: g_in = g·B'(a) + gl·(ln B')'(a); C: g_in = (g − gl·(ln B')'(y))/B'(y), with
        # B'(x) = 1 + x/(2s) and (ln B')'(x) = 1/(2 s³ B'(x)), s = √(x² + 1)
        slope_b = torch.div(b_in, b_root).mul_(0.5).add_(1.0)
        add_b = b_root.pow(3).mul_(slope_b).reciprocal_().mul_(0.5 * gl)
        factor_c = torch.div(c_out, c_root).mul_(0.5).add_(1.0).reciprocal_()
        add_c = c_root.pow(3).reciprocal_().mul_(factor_c).mul_(factor_c).mul_(-0.5 * gl)
        slope_b, add_b = list(slope_b.unbind(0)), list(add_b.unbind(0))
        factor_c, add_c = list(factor_c.unbind(0)), list(add_c.unbind(0))
        G = g.new_empty(L, 2, M, B)  # the gradient at each affine layer's output, program order
        G_v = list(G.unbind(0))
        gs = g.permute(2, 0, 1).contiguous()
        ka, kb, kc = L, len(b_in), len(c_out)
        for i in reversed(range(len(program))):
            op = program[i]
            if op[0] == "A":
                ka -= 1
                layer = op[1]
                if gs.data_ptr() != G_v[ka].data_ptr():
                    G_v[ka].copy_(gs)
                g0, g1 = gs.unbind(0)
                gs = torch.addcmul(g0 * cols[layer][0], g1, cols[layer][1])
                continue
            if op[0] == "B":
                kb -= 1
                factor, add = slope_b[kb], add_b[kb]
            else:
                kc -= 1
                factor, add = factor_c[kc], add_c[kc]
            if i > 0 and program[i - 1][0] == "A":  # straight into that layer's slot
                gs = torch.addcmul(add, gs, factor, out=G_v[ka - 1])
            else:
                gs = torch.addcmul(add, gs, factor)
        # the weights' gradients: Σ over points of (input of a layer) ⊗ (gradient at its
        # output). In program order a kind's inputs and gradients sit at evenly spaced rows
        # of their buffers, so each kind is one product of views.
        gWt = g.new_zeros(M, L, 2, 2)
        for kind, buffer in (("b", b_out), ("c", c_out), ("x", x.permute(2, 0, 1)[None])):
            at = [k for k, a in enumerate(affine) if a[1] == kind]
            if not at:
                continue
            rows_in = [affine[k][2] for k in at]
            Xk, Gk = _rows(buffer, rows_in), _rows(G, at)
            product = (Xk.unsqueeze(2) * Gk.unsqueeze(1)).sum(-1)  # [n, i, j, M]
            gWt[:, [affine[k][0] for k in at]] = product.permute(3, 0, 1, 2)
        gshift = g.new_zeros(M, L, 2)
        gshift[:, [a[0] for a in affine]] = G.sum(-1).permute(2, 0, 1)
        return gs.permute(1, 2, 0), gWt, gshift, None


def _rows(t: Tensor, index: list[int]) -> Tensor:
    """t[index], a view when the rows are evenly spaced and increasing (a copy otherwise)."""
    steps = {b - a for a, b in itertools.pairwise(index)}
    if len(steps) <= 1 and (not steps or steps.pop() > 0):
        step = index[1] - index[0] if len(index) > 1 else 1
        return t[index[0] : index[-1] + 1 : step]
    return t[index]


def _views(t: Tensor, depth: int) -> list:
    """Nested lists (``depth`` levels) of the views of t along its leading dimensions, made by
    one unbind of a flat view (an unbind per level would cost an operation per entry)."""
    lead = t.shape[:depth]
    flat = list(t.reshape(-1, *t.shape[depth:]).unbind(0))
    for size in reversed(lead[1:]):
        flat = [flat[k : k + size] for k in range(0, len(flat), size)]
    return flat


def _log_slope(x: Tensor, root: Tensor) -> Tensor:
    """Σ ln B'(x) over the layers and coordinates of x [n, 2, M, B], root = √(x² + 1): [M, B]."""
    return torch.log1p(torch.div(x, root).mul_(0.5)).sum((0, 1))


def _forward_program(n_blocks: int) -> tuple:
    """The stack's forward: per block A(2k), B, A(2k + 1), C."""
    return tuple(op for k in range(n_blocks)
                 for op in (("A", 2 * k), ("B",), ("A", 2 * k + 1), ("C",)))  # fmt: skip


def _inverse_program(n_blocks: int) -> tuple:
    """The stack's inverse: blocks backwards, each B (inverse of C), A(2k + 1) (with W⁻¹),
    C (inverse of B), A(2k)."""
    return tuple(op for k in reversed(range(n_blocks))
                 for op in (("B",), ("A", 2 * k + 1), ("C",), ("A", 2 * k)))  # fmt: skip


@dataclass
class StackStats:
    """Merge counts of every model of a stack over a run (each field [M]), as
    :class:`p4bg.nn.MergeStats` counts them for one model."""

    attempts: Tensor
    accepted: Tensor
    forced: Tensor
    skipped: Tensor
    refused: Tensor
    nonfinite_resets: Tensor
    corrections: Tensor
    fallbacks: Tensor
    max_residual: Tensor  # float64, the largest |I − A·A⁻¹| at any merge event (NaN: none yet)

    @classmethod
    def zeros(cls, m: int) -> StackStats:
        z = [torch.zeros(m, dtype=torch.int64) for _ in range(8)]
        return cls(*z, max_residual=torch.full((m,), math.nan, dtype=torch.float64))

    def as_lists(self) -> dict[str, list]:
        return {k: v.tolist() for k, v in self.__dict__.items()}

    @classmethod
    def from_lists(cls, d: dict[str, list]) -> StackStats:
        out = {k: torch.tensor(v) for k, v in d.items()}
        out["max_residual"] = out["max_residual"].double()
        return cls(**out)


# what a P4Inv layer holds: its trained perturbation and bias, and its float64 state
_P4_STATE = ("u", "v", "bias", "A", "Ainv", "log_abs_det_A", "sign_A", "n_merges")


class P4InvStack(nn.Module):
    """M independent App. G stacks of ``n_blocks`` blocks (P4Inv, Bent, P4Inv, inverse Bent) on
    2-D points, as tensors with the model first.

    Parameters (model dtype): u, v, bias [M, 2·n_blocks, 2]. Float64 buffers: A, Ainv
    [M, L, 2, 2], log_abs_det_A, sign_A [M, L]; n_merges [M, L] int64. ``via_inverse`` False is
    densities_2d's "P4Inv" (``Inverse(stack)``: data -> latent applies each layer's W x + b),
    True its "P4Inv via inv" (data -> latent applies W⁻¹(x − b)). Either way :meth:`log_prob`
    is the density of data and :meth:`sample` maps latent points to data.
    """

    c_min, c_max = -2.0, 15.0

    def __init__(self, m: int, n_blocks: int = 100, via_inverse: bool = False,
                 dtype: torch.dtype | None = None) -> None:  # fmt: skip
        super().__init__()
        dtype = dtype or torch.get_default_dtype()
        n = 2 * n_blocks
        self.m, self.n_blocks, self.n_layers, self.via_inverse = m, n_blocks, n, via_inverse
        eye = torch.eye(2, dtype=torch.float64).expand(m, n, 2, 2)
        self.register_buffer("A", eye.clone())
        self.register_buffer("Ainv", eye.clone())
        self.register_buffer("log_abs_det_A", torch.zeros(m, n, dtype=torch.float64))
        self.register_buffer("sign_A", torch.ones(m, n, dtype=torch.float64))
        self.register_buffer("n_merges", torch.zeros(m, n, dtype=torch.int64))
        self.u = nn.Parameter(torch.zeros(m, n, 2, dtype=dtype))
        self.v = nn.Parameter(torch.randn(m, n, 2, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(m, n, 2, dtype=dtype))

    @classmethod
    def from_models(cls, models: list[nn.Module], via_inverse: bool) -> P4InvStack:
        """A stack holding the P4Inv state of ``build_bent_flow`` models (for tests)."""
        layers = [[x for x in model.modules() if isinstance(x, P4Inv)] for model in models]
        stack = cls(len(models), len(layers[0]) // 2, via_inverse, layers[0][0].u.dtype)
        with torch.no_grad():
            for name in _P4_STATE:
                value = torch.stack([torch.stack([getattr(x, name) for x in ls]) for ls in layers])
                getattr(stack, name).copy_(value)
        return stack

    def load_into(self, k: int, model: nn.Module) -> None:
        """Copy model ``k``'s state into a ``build_bent_flow`` model (for tests and figures)."""
        layers = [x for x in model.modules() if isinstance(x, P4Inv)]
        with torch.no_grad():
            for i, layer in enumerate(layers):
                for name in _P4_STATE:
                    getattr(layer, name).copy_(getattr(self, name)[k, i])

    def to_model(self, k: int) -> nn.Module:
        model = build_bent_flow(2, self.n_blocks).to(self.u.dtype)
        self.load_into(k, model)
        return model

    # ---------------------------------------------------------------------------- passes
    def _weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """(W [M, L, 2, 2], W⁻¹, ln|det W| [M, L]) in the model dtype, differentiable in u, v."""
        dtype = self.u.dtype
        A, Ainv = self.A.to(dtype), self.Ainv.to(dtype)
        Ainv_u = torch.einsum("mlij,mlj->mli", Ainv, self.u)
        G = 1.0 + (self.v * Ainv_u).sum(-1)
        ladj = torch.log(torch.abs(G)) + self.log_abs_det_A.to(dtype)
        W = A + self.u.unsqueeze(-1) * self.v.unsqueeze(-2)
        vT_Ainv = torch.einsum("mlj,mlji->mli", self.v, Ainv)
        W_inv = Ainv - Ainv_u.unsqueeze(-1) * vT_Ainv.unsqueeze(-2) / G[..., None, None]
        return W, W_inv, ladj

    def _stack_forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The stack's forward (layers in order, P4Inv as W x + b): x [M, B, 2]."""
        W, _, ladj = self._weights()
        y, bent = _Program.apply(x, W.transpose(-1, -2), self.bias,
                                 _forward_program(self.n_blocks))  # fmt: skip
        return y, ladj.sum(1)[:, None] + bent

    def _stack_inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """The stack's inverse (layers backwards, P4Inv as W⁻¹(y − b))."""
        _, W_inv, ladj = self._weights()
        # W⁻¹(y − b) = y W⁻ᵀ − W⁻¹ b: the bias costs one product for all layers
        shift = -torch.einsum("mlij,mlj->mli", W_inv, self.bias)
        x, bent = _Program.apply(y, W_inv.transpose(-1, -2), shift,
                                 _inverse_program(self.n_blocks))  # fmt: skip
        return x, -ladj.sum(1)[:, None] + bent

    def log_prob(self, x: Tensor) -> Tensor:
        """log q(x) of data points x [M, B, 2] under each model: [M, B]."""
        z, ladj = self._stack_inverse(x) if self.via_inverse else self._stack_forward(x)
        return standard_normal_log_prob(z) + ladj

    @torch.no_grad()
    def sample(self, z: Tensor) -> Tensor:
        """Latent points z [M, B, 2] -> data points."""
        return (self._stack_forward(z) if self.via_inverse else self._stack_inverse(z))[0]

    # ---------------------------------------------------------------------------- merges
    @torch.no_grad()
    def merge(
        self,
        event: Tensor,
        force: Tensor,
        optimizer: StackedAdam | None,
        stats: StackStats,
        generators: list[torch.Generator] | None = None,
        correct_every: int = 50,
        threshold: float = 1e-6,
    ) -> Tensor:
        """One merge event for the models under ``event`` [M] bool, forced where ``force``
        [M]: every layer of those models decides as :meth:`P4Inv.merge_decision` does, merged
        layers fold u vᵀ into A (and its inverse and determinant), take u = 0 and a fresh v
        (from ``generators[m]``, one draw of [L, 2] per model per event) and forget their
        optimizer state; every ``correct_every``-th merge of a layer corrects its inverse.
        Updates ``stats``; returns the layers that took a fresh v, [M, L] bool."""
        u, v = self.u.double(), self.v.double()
        finite = torch.isfinite(u).all(-1) & torch.isfinite(v).all(-1)
        Ainv_u = torch.einsum("mlij,mlj->mli", self.Ainv, u)
        G = 1.0 + (v * Ainv_u).sum(-1)
        ok_G = torch.isfinite(G) & (G != 0)
        log_g = torch.log(torch.abs(torch.where(ok_G, G, torch.ones_like(G))))
        log_det = self.log_abs_det_A + log_g
        sane = (log_g >= self.c_min - 4.0) & (log_det >= self.c_min - 0.5) & (
            log_det <= self.c_max + 0.5)  # fmt: skip
        on = event[:, None].expand_as(G)
        nonfinite = on & ~finite
        refused = on & finite & ~ok_G
        accepted = on & finite & ok_G & sane
        forced = on & finite & ok_G & ~sane & force[:, None]
        skipped = on & finite & ok_G & ~sane & ~force[:, None]
        merged = accepted | forced
        # fold u vᵀ into A where merged (the others' updates are multiplied by 0)
        # (torch.where, not a product with 0: a non-finite u must not reach A)
        w = merged[..., None, None]
        vT_Ainv = torch.einsum("mlj,mlji->mli", v, self.Ainv)
        safe_G = torch.where(merged, G, torch.ones_like(G))[..., None, None]
        outer = Ainv_u.unsqueeze(-1) * vT_Ainv.unsqueeze(-2)
        self.A.copy_(torch.where(w, self.A + u.unsqueeze(-1) * v.unsqueeze(-2), self.A))
        self.Ainv.copy_(torch.where(w, self.Ainv - outer / safe_G, self.Ainv))
        self.log_abs_det_A.copy_(torch.where(merged, log_det, self.log_abs_det_A))
        self.sign_A.mul_(torch.where(merged, torch.sign(G), torch.ones_like(G)))
        self.n_merges.add_(merged.long())
        fresh = merged | nonfinite
        if fresh.any():
            self.u.masked_fill_(fresh[..., None].expand_as(self.u), 0.0)
            for k in torch.nonzero(fresh.any(1)).flatten().tolist():
                g = None if generators is None else generators[k]
                draw = torch.randn(self.n_layers, 2, generator=g, dtype=self.v.dtype)
                self.v[k] = torch.where(fresh[k, :, None], draw, self.v[k])
            if optimizer is not None:
                mask = fresh[..., None].expand_as(self.u)
                optimizer.reset(self.u, mask)
                optimizer.reset(self.v, mask)
        if correct_every:
            due = merged & (self.n_merges % correct_every == 0)
            if due.any():
                fell = self._correct(due, threshold)
                stats.corrections += due.sum(1)
                stats.fallbacks += fell.sum(1)
        for name, mask in (("accepted", accepted), ("forced", forced), ("skipped", skipped),
                           ("refused", refused), ("nonfinite_resets", nonfinite)):  # fmt: skip
            getattr(stats, name).add_(mask.sum(1))
        stats.attempts.add_(on.sum(1))
        residual = self.inverse_residuals().amax(1)
        stats.max_residual.copy_(torch.where(
            event, torch.fmax(stats.max_residual, residual), stats.max_residual))  # fmt: skip
        return fresh

    @torch.no_grad()
    def inverse_residuals(self) -> Tensor:
        """max |I − A·Ainv| of every layer: [M, L] float64."""
        eye = torch.eye(2, dtype=torch.float64)
        return (eye - self.A @ self.Ainv).abs().amax((-1, -2))

    @torch.no_grad()
    def _correct(self, due: Tensor, threshold: float) -> Tensor:
        """:meth:`P4Inv.correct_inverse` on the layers under ``due`` [M, L]: one hyperpower
        step kept where it shrank the residual below ``threshold``, float64 LU otherwise.
        Returns where it fell back to LU, [M, L] bool."""
        idx = torch.nonzero(due, as_tuple=True)
        A, V = self.A[idx], self.Ainv[idx]
        eye = torch.eye(2, dtype=torch.float64).expand_as(A)
        X = A @ V
        before = (eye - X).abs().amax((-1, -2))
        P = _HYPERPOWER[-1] * X + _HYPERPOWER[-2] * eye
        for c in reversed(_HYPERPOWER[:-2]):
            P = torch.baddbmm(eye, X, P, beta=c)
        V_new = V @ P / 16.0
        after = (eye - A @ V_new).abs().amax((-1, -2))
        rounding = 100.0 * 2 * torch.finfo(torch.float64).eps
        shrank = after <= torch.clamp(before, min=rounding)
        keep = torch.isfinite(after) & (after <= threshold) & shrank
        fell = ~keep
        new_inv = V_new.clone()
        if fell.any():
            inv, info = torch.linalg.inv_ex(A[fell])
            sign, logabsdet = torch.linalg.slogdet(A[fell])
            good = info == 0  # a singular A has nothing exact to fall back to: left as it was
            sub = new_inv[fell]
            sub[good] = inv[good]
            sub[~good] = V[fell][~good]
            new_inv[fell] = sub
            fidx = tuple(i[fell] for i in idx)
            self.log_abs_det_A[fidx] = torch.where(good, logabsdet, self.log_abs_det_A[fidx])
            self.sign_A[fidx] = torch.where(good, sign, self.sign_A[fidx])
        self.Ainv[idx] = new_inv
        out = torch.zeros_like(due)
        out[idx] = fell
        return out


# -------------------------------------------------------------------------------- RNVP stack
class RNVPStack(nn.Module):
    """M independent ``build_rnvp_2d`` models (App. G's RealNVP baseline: 10 affine couplings on
    2-D points, each conditioned on one coordinate by two tanh MLPs of 2 × 6 units, with swaps
    between them), their parameters stacked with the model first under the module's own names.

    The couplings are written out for the stack rather than run through ``torch.func.vmap``
    (a first version did, at about 1.6× the time a step): each coupling's t and s networks run
    as one network of 12 units with block-diagonal weights, each layer one batched product,
    and a swap is a renaming of the two coordinates. Checked against the modules in
    tests/test_density_stack.py.
    """

    def __init__(self, m: int, models: list[nn.Module] | None = None) -> None:
        super().__init__()
        models = models or [build_rnvp_2d() for _ in range(m)]
        if len(models) != m:
            raise ValueError(f"RNVPStack: {len(models)} models for m = {m}")
        self.m = m
        self.names = [name for name, _ in models[0].named_parameters()]
        self.flat = nn.ParameterList([
            nn.Parameter(torch.stack([dict(x.named_parameters())[n].detach() for x in models]))
            for n in self.names])  # fmt: skip
        self.couplings = sorted({int(n.split(".")[1]) for n in self.names})

    def _nets(self) -> list[tuple[Tensor, ...]]:
        """Per coupling: (W1ᵀ [M, 1, 12], b1 [M, 1, 12], W2ᵀ [M, 12, 12] block-diagonal, b2,
        W3ᵀ [M, 12, 2] (t's output, then s's), b3 [M, 1, 2], scale [M, 1, 1])."""
        p = dict(zip(self.names, self.flat, strict=True))

        def get(c: list[int], name: str) -> Tensor:  # [C, M, ...] over the couplings
            return torch.stack([p[f"layers.{k}.{name}"] for k in c])

        c = self.couplings

        def block_diagonal(t: Tensor, s: Tensor) -> Tensor:  # [.., a, b], [.., c, d]
            top = torch.cat([t, t.new_zeros(*t.shape[:-1], s.shape[-1])], -1)
            bottom = torch.cat([s.new_zeros(*s.shape[:-1], t.shape[-1]), s], -1)
            return torch.cat([top, bottom], -2)

        w1 = torch.cat([get(c, "t.0.weight"), get(c, "s.0.weight")], 2).transpose(-1, -2)
        b1 = torch.cat([get(c, "t.0.bias"), get(c, "s.0.bias")], 2).unsqueeze(2)
        w2 = block_diagonal(get(c, "t.2.weight"), get(c, "s.2.weight")).transpose(-1, -2)
        b2 = torch.cat([get(c, "t.2.bias"), get(c, "s.2.bias")], 2).unsqueeze(2)
        w3 = block_diagonal(get(c, "t.4.weight"), get(c, "s.4.weight")).transpose(-1, -2)
        b3 = torch.cat([get(c, "t.4.bias"), get(c, "s.4.bias")], 2).unsqueeze(2)
        scale = get(c, "scale")[..., None, None]
        return list(zip(*(t.unbind(0) for t in (w1, b1, w2, b2, w3, b3, scale)), strict=True))

    @staticmethod
    def _shift_log_scale(net: tuple[Tensor, ...], cond: Tensor) -> tuple[Tensor, Tensor]:
        w1, b1, w2, b2, w3, b3, scale = net
        h = torch.tanh(torch.baddbmm(b1, cond, w1))
        h = torch.tanh(torch.baddbmm(b2, h, w2))
        out = torch.baddbmm(b3, h, w3)
        return out[..., :1], scale * torch.tanh(out[..., 1:])

    def log_prob(self, x: Tensor) -> Tensor:
        """log q(x) of data points x [M, B, 2] under each model: [M, B]."""
        # the layers backwards: swap⁻¹ (a renaming), then coupling⁻¹ with the first coordinate
        # as condition: x₂ ← (x₂ − t) e^{−log s}
        first, second = x[..., :1], x[..., 1:]
        ladj = x.new_zeros((*x.shape[:2], 1))
        for net in reversed(self._nets()):
            first, second = second, first
            t, log_s = self._shift_log_scale(net, first)
            second = (second - t) * torch.exp(-log_s)
            ladj = ladj - log_s
        z = torch.cat([first, second], -1)
        return standard_normal_log_prob(z) + ladj.squeeze(-1)

    @torch.no_grad()
    def sample(self, z: Tensor) -> Tensor:
        """Latent points z [M, B, 2] -> data points."""
        first, second = z[..., :1], z[..., 1:]
        for net in self._nets():
            t, log_s = self._shift_log_scale(net, first)
            second = torch.addcmul(t, second, torch.exp(log_s))
            first, second = second, first
        return torch.cat([first, second], -1)

    def to_model(self, k: int) -> nn.Module:
        model = build_rnvp_2d().to(self.flat[0].dtype)
        with torch.no_grad():
            for name, p in zip(self.names, self.flat, strict=True):
                dict(model.named_parameters())[name].copy_(p[k])
        return model


# ------------------------------------------------------------------------------ training step
class StackTrainer:
    """App. G's training step for every model of a stack at once: the loss of each model is
    its own mean NLL on its own batch; a model whose loss is not finite skips the step (its
    parameters, optimizer state and merge schedule stand still, as densities_2d's loop skips
    it); P4Inv stacks merge every ``every`` of a model's steps, every ``force_every``-th event
    forced, with inverse corrections every ``correct_every`` merges of a layer.

    ``generators``: one CPU torch.Generator per model for the fresh v of merged layers.
    """

    def __init__(self, stack: nn.Module, lr: float, every: int = 10, force_every: int = 10,
                 correct_every: int = 50,
                 generators: list[torch.Generator] | None = None) -> None:  # fmt: skip
        self.stack = stack
        self.optimizer = StackedAdam(list(stack.parameters()), lr)
        self.every, self.force_every, self.correct_every = every, force_every, correct_every
        self.generators = generators
        m = stack.m
        self.steps = torch.zeros(m, dtype=torch.int64)  # steps taken (finite losses)
        self.events = torch.zeros(m, dtype=torch.int64)
        self.skipped = torch.zeros(m, dtype=torch.int64)
        self.stats = StackStats.zeros(m)
        self.last_fresh: Tensor | None = None  # the layers that took a fresh v at the last step

    def step(self, x: Tensor) -> Tensor:
        """One step on batches x [M, B, 2]; returns each model's loss [M] (detached)."""
        losses = -self.stack.log_prob(x).mean(1)
        active = torch.isfinite(losses)
        for p in self.stack.parameters():
            p.grad = None
        # a model's loss reaches only its own parameters, so the others' gradients stay finite
        torch.where(active, losses, torch.zeros_like(losses)).sum().backward()
        self.optimizer.step(active)
        self.skipped += (~active).long()
        self.steps += active.long()
        self.last_fresh = None
        if isinstance(self.stack, P4InvStack):
            event = active & (self.steps % self.every == 0)
            if event.any():
                self.events += event.long()
                force = event & (self.events % self.force_every == 0) if self.force_every else (
                    torch.zeros_like(event))  # fmt: skip
                self.last_fresh = self.stack.merge(event, force, self.optimizer, self.stats,
                                                   self.generators, self.correct_every)  # fmt: skip
        return losses.detach()
