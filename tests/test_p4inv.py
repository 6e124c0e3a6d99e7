"""P4Inv against torch.linalg in float64 (the second implementation is the oracle)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from bijection_checks import check_bijection

from p4bg.nn import (
    DenseLinear,
    Inverse,
    LULinear,
    MergeResult,
    P4Inv,
    P4Merger,
    Sequential,
    p4inv_penalty,
)


def random_p4inv(dim: int = 7, merges: int = 3, init: str = "identity", bias: bool = True) -> P4Inv:
    """A layer with a non-trivial A (after a few merges) and a live perturbation."""
    layer = P4Inv(dim, bias=bias, init=init)
    with torch.no_grad():
        for _ in range(merges):
            layer.u.copy_(0.3 * torch.randn(dim) / dim**0.5)
            assert layer.merge(force=True)
        layer.u.copy_(0.3 * torch.randn(dim) / dim**0.5)
        if bias:
            layer.bias.copy_(torch.randn(dim))
    return layer


def eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


# ------------------------------------------------------------------------ bijection properties
@pytest.mark.parametrize("init", ["identity", "reverse"])
@pytest.mark.parametrize("bias", [True, False])
def test_p4inv_bijection_properties(init, bias):
    check_bijection(random_p4inv(6, init=init, bias=bias), torch.randn(5, 6))


@pytest.mark.parametrize("bias", [True, False])
def test_hand_written_backward_passes_gradcheck(bias):
    """Forward and inverse are single autograd nodes with a hand-written backward: check every
    input's gradient (x, u, v, b) through both outputs (y and ladj) against finite differences."""
    layer = random_p4inv(5, bias=bias)
    names = ["u", "v"] + (["bias"] if bias else [])
    x = torch.randn(4, 5, requires_grad=True)
    params = tuple(getattr(layer, n).detach().clone().requires_grad_() for n in names)
    for module, prefix in ((layer, ""), (Inverse(layer), "bijection.")):

        def fn(x, *p, module=module, prefix=prefix):
            values = {prefix + n: t for n, t in zip(names, p, strict=True)}
            return torch.func.functional_call(module, values, (x,))

        assert torch.autograd.gradcheck(fn, (x, *params))


def test_baseline_layers_and_compositions_are_bijections():
    dense = DenseLinear(5, weight=eye(5) + 0.3 * torch.randn(5, 5))
    with torch.no_grad():
        dense.bias.normal_()
    lu = LULinear(5)
    with torch.no_grad():
        for p in lu.parameters():
            p.copy_(0.3 * torch.randn_like(p))
        lu.perm.copy_(torch.tensor([2, 0, 4, 1, 3]))
        lu.perm_inv.copy_(torch.argsort(lu.perm))
    x = torch.randn(4, 5)
    check_bijection(dense, x)
    check_bijection(lu, x)
    check_bijection(Inverse(random_p4inv(5)), x)
    check_bijection(
        Sequential(random_p4inv(5), dense, Inverse(random_p4inv(5, init="reverse")), lu), x
    )


def test_sequential_sums_ladj_and_runs_backwards():
    a, b = random_p4inv(4), random_p4inv(4)
    seq = Sequential([a, b])
    x = torch.randn(3, 4)
    y, ladj = seq(x)
    ya, la = a(x)
    yb, lb = b(ya)
    torch.testing.assert_close(y, yb)
    torch.testing.assert_close(ladj, la + lb)
    with pytest.raises(TypeError, match="Bijection"):
        Sequential(a, torch.nn.Linear(4, 4))


# ------------------------------------------------------------------------ torch.linalg oracle
@pytest.mark.parametrize("init", ["identity", "reverse"])
def test_against_linalg(init):
    layer = random_p4inv(9, merges=5, init=init)
    W = layer.weight()
    torch.testing.assert_close(W, layer.A + torch.outer(layer.u, layer.v).detach())
    sign, logabsdet = torch.linalg.slogdet(W)
    assert layer.log_abs_det() == pytest.approx(float(logabsdet), abs=1e-12)
    assert layer.det_sign() == float(sign)
    torch.testing.assert_close(layer.weight_inverse(), torch.linalg.inv(W), atol=1e-12, rtol=1e-10)
    x = torch.randn(8, 9)
    y, ladj = layer(x)
    torch.testing.assert_close(y, x @ W.T + layer.bias, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, logabsdet.expand(8))
    xi, _ = layer.inverse(y)
    torch.testing.assert_close(xi, torch.linalg.solve(W, (y - layer.bias).T).T, atol=1e-12, rtol=0)


def test_reverse_init_is_the_reverse_permutation():
    for n in (1, 2, 3, 4, 5, 60):
        layer = P4Inv(n, init="reverse")
        expected = torch.zeros(n, n)
        for i in range(n):
            expected[i, n - 1 - i] = 1.0
        torch.testing.assert_close(layer.A, expected)
        assert float(layer.sign_A) == float(torch.linalg.det(expected))
        x = torch.randn(2, n)
        torch.testing.assert_close(layer(x)[0], x.flip(1))


# --------------------------------------------------------------------------------------- merge
def test_merge_leaves_the_function_unchanged():
    layer = random_p4inv(8)
    _set_g(layer, 1.3, noise=0.5)
    x = torch.randn(6, 8)
    with torch.no_grad():
        y0, l0 = layer(x)
        W0 = layer.weight()
        assert layer.merge_step() is MergeResult.ACCEPTED
        y1, l1 = layer(x)
    assert torch.count_nonzero(layer.u) == 0
    torch.testing.assert_close(layer.A, W0, atol=1e-14, rtol=0)
    torch.testing.assert_close(y1, y0, atol=1e-12, rtol=0)
    torch.testing.assert_close(l1, l0, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.Ainv, torch.linalg.inv(layer.A), atol=1e-12, rtol=0)
    assert float(layer.log_abs_det_A) == pytest.approx(
        float(torch.linalg.slogdet(layer.A)[1]), abs=1e-12
    )


def _set_g(layer: P4Inv, g: float, noise: float = 0.0) -> None:
    """Choose u so that G = 1 + vᵀ Ainv u equals g: ``noise`` times a random vector, plus the
    multiple of A v that sets G."""
    with torch.no_grad():
        v = layer.v.double()
        r = noise * torch.randn(layer.dim)
        c = (g - 1.0 - v @ (layer.Ainv @ r)) / (v @ v)
        layer.u.copy_(r + c * (layer.A @ v))


def test_ill_conditioned_merges_are_skipped():
    layer = random_p4inv(6)
    A0, Ainv0 = layer.A.clone(), layer.Ainv.clone()
    for g in (1e-4, -1e-4, math.exp(16.0)):  # ln|G| < -6, and ln|det| above 15.5
        _set_g(layer, g)
        u0 = layer.u.detach().clone()
        assert layer.merge_step() is MergeResult.SKIPPED
        assert torch.equal(layer.A, A0) and torch.equal(layer.Ainv, Ainv0)
        assert torch.equal(layer.u.detach(), u0)  # the perturbation is kept for training on
    assert not layer.merge()


def test_forced_merge_crosses_det_zero():
    layer = P4Inv(10)
    _set_g(layer, -1e-3)  # det W = -1e-3: on the other side of det = 0
    W = layer.weight()
    assert layer.merge_step(force=True) is MergeResult.FORCED
    sign, logabsdet = torch.linalg.slogdet(W)
    assert float(layer.sign_A) == float(sign) == -1.0
    assert float(layer.log_abs_det_A) == pytest.approx(float(logabsdet), abs=1e-12)
    torch.testing.assert_close(layer.Ainv, torch.linalg.inv(W), atol=1e-9, rtol=1e-9)


def test_zero_g_is_never_merged_even_when_forced():
    layer = P4Inv(4, init="identity")
    with torch.no_grad():
        layer.v.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        layer.u.copy_(torch.tensor([-1.0, 0.0, 0.0, 0.0]))  # G = 1 - 1 = 0 exactly
    assert layer.merge_step(force=True) is MergeResult.REFUSED
    assert torch.equal(layer.A, eye(4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_perturbation_is_reset_without_merging(bad):
    layer = random_p4inv(5)
    A0 = layer.A.clone()
    with torch.no_grad():
        layer.u[2] = bad
    assert layer.merge_step(force=True) is MergeResult.RESET_NONFINITE
    assert torch.equal(layer.A, A0)
    assert torch.count_nonzero(layer.u) == 0 and torch.isfinite(layer.v).all()


# -------------------------------------------------------------------------- inverse correction
def test_hyperpower_correction_contracts_residual():
    layer = random_p4inv(12, merges=4)
    E0 = 1e-4 * torch.randn(12, 12)
    with torch.no_grad():
        layer.Ainv.copy_(torch.linalg.inv(layer.A) @ (eye(12) - E0))  # A Ainv = I - A inv(A) E0 ...
    E = eye(12) - layer.A @ layer.Ainv
    fell_back, after = layer.correct_inverse()
    assert not fell_back
    assert after < 1e-13 < float(E.abs().max())


def test_hyperpower_residual_identity():
    """I - A V_new = E⁷ (3I + E)² / 16: checked where E is large enough to see it."""
    layer = random_p4inv(6, merges=2)
    E = 0.3 * torch.randn(6, 6) / 6
    with torch.no_grad():
        layer.Ainv.copy_(torch.linalg.solve(layer.A, eye(6) - E))  # now I - A Ainv = E
    layer.correct_inverse(threshold=1.0)  # accept whatever it gives: we check the algebra
    expected = torch.linalg.matrix_power(E, 7) @ torch.linalg.matrix_power(3 * eye(6) + E, 2) / 16
    torch.testing.assert_close(eye(6) - layer.A @ layer.Ainv, expected, atol=1e-14, rtol=1e-6)


def test_correction_falls_back_to_exact_lu_when_it_cannot_contract():
    layer = random_p4inv(8, merges=3)
    with torch.no_grad():
        layer.Ainv.add_(0.5 * torch.randn(8, 8))
        layer.log_abs_det_A.add_(0.7)  # a drifted determinant is repaired by the fallback too
    fell_back, after = layer.correct_inverse()
    assert fell_back and after < 1e-12
    torch.testing.assert_close(layer.Ainv, torch.linalg.inv(layer.A), atol=1e-12, rtol=0)
    assert float(layer.log_abs_det_A) == pytest.approx(
        float(torch.linalg.slogdet(layer.A)[1]), abs=1e-12
    )


# ------------------------------------------------------------------------------------- penalty
def test_penalty_matches_its_definition_and_has_gradients():
    layer = random_p4inv(5)
    assert float(layer.penalty().detach()) == 0.0  # well inside the bounds
    _set_g(layer, math.exp(-3.0))  # ln|G| = -3: 1 below c_min
    pen = layer.penalty()
    log_det = layer.log_abs_det()
    expected = 1.0 + max(-2.0 - log_det, 0.0) ** 2 + max(log_det - 15.0, 0.0) ** 2
    assert float(pen.detach()) == pytest.approx(expected, rel=1e-9)
    pen.backward()
    assert layer.u.grad.abs().sum() > 0 and layer.v.grad.abs().sum() > 0
    model = Sequential(layer, random_p4inv(5))
    assert float(p4inv_penalty(model).detach()) == pytest.approx(float(pen.detach()), rel=1e-12)


# ------------------------------------------------------------------------------ dtype and state
def test_float32_model_path():
    ref = random_p4inv(16, merges=4)
    layer = copy.deepcopy(ref).float()
    for name in ("A", "Ainv", "log_abs_det_A", "sign_A"):
        assert getattr(layer, name).dtype == torch.float64, name
    assert layer.u.dtype == layer.v.dtype == layer.bias.dtype == torch.float32
    x = torch.randn(10, 16)
    y32, l32 = layer(x.float())
    assert y32.dtype == l32.dtype == torch.float32
    y64, l64 = ref(x)
    torch.testing.assert_close(y32.double(), y64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l32.double(), l64, atol=1e-5, rtol=1e-5)
    x32, li32 = layer.inverse(y32)
    torch.testing.assert_close(x32.double(), x, atol=1e-4, rtol=1e-4)
    assert li32.dtype == torch.float32
    with pytest.raises(TypeError, match="dtype"):
        layer(x)  # float64 input into a float32 model
    # Merging updates the float64 state; the float32 copies used by forward follow.
    with torch.no_grad():
        layer.u.copy_(0.2 * torch.randn(16))
        W = layer.weight()
        assert layer.merge()
        torch.testing.assert_close(
            layer(x.float())[0].double(), x @ W.T + layer.bias.double(), atol=1e-4, rtol=1e-5
        )
    layer.double()
    assert layer.u.dtype == torch.float64 and layer.A.dtype == torch.float64


def test_state_dict_round_trip_keeps_buffers_exactly():
    layer = random_p4inv(7, merges=6, init="reverse")
    merger = P4Merger(layer, every=1)
    merger.step()
    state = layer.state_dict()
    assert {"A", "Ainv", "log_abs_det_A", "sign_A", "n_merges", "u", "v", "bias"} <= set(state)
    clone = P4Inv(7, init="identity")
    clone.load_state_dict(state)
    for name, value in state.items():
        assert torch.equal(getattr(clone, name), value), name
    x = torch.randn(3, 7)
    torch.testing.assert_close(clone(x), layer(x), atol=0, rtol=0)
    torch.testing.assert_close(clone.inverse(x), layer.inverse(x), atol=0, rtol=0)
    # A float32 model loads the float64 buffers without rounding them.
    clone32 = P4Inv(7).float()
    clone32.load_state_dict(state)
    assert clone32.A.dtype == torch.float64 and torch.equal(clone32.Ainv, layer.Ainv)
    merger2 = P4Merger(clone, every=1)
    merger2.load_state_dict(merger.state_dict())
    assert merger2.state_dict() == merger.state_dict()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda p: torch.optim.Adam(p, lr=0.1, foreach=True),
        lambda p: torch.optim.Adam(p, lr=0.1, foreach=False),
        lambda p: torch.optim.AdamW(p, lr=0.1, fused=True),
    ],
)
def test_cached_determinant_follows_optimizer_steps(make_opt):
    layer = random_p4inv(6)
    opt = make_opt(layer.parameters())
    x = torch.randn(4, 6)
    for _ in range(3):
        with torch.no_grad():
            _, ladj_cached = layer(x)
        assert float(ladj_cached[0]) == pytest.approx(layer.log_abs_det(), abs=1e-12)
        opt.zero_grad()
        y, ladj = layer(x)
        (y.square().sum() - ladj.sum()).backward()
        opt.step()


def test_inference_mode_does_not_poison_the_caches():
    layer = random_p4inv(4).float()
    x = torch.randn(3, 4, dtype=torch.float32)
    with torch.inference_mode():
        layer(x)
        layer.inverse(x)
    y, ladj = layer(x.requires_grad_())
    (y.sum() + ladj.sum()).backward()
    assert layer.u.grad is not None
    _, ladj = layer.inverse(x.detach())
    with torch.no_grad():
        _, cached = layer(x[:1])
        cached += 5.0  # modifying a returned ladj must not change the layer
        assert float(layer(x[:1])[1][0]) == pytest.approx(layer.log_abs_det(), abs=1e-5)


def test_autocast_is_refused_with_a_clear_message():
    layer = random_p4inv(4)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="autocast"):
        layer(torch.randn(2, 4))


# --------------------------------------------------------------------------------- the merger
class TwoLayerModel(torch.nn.Module):
    def __init__(self, dim: int = 5) -> None:
        super().__init__()
        self.first = random_p4inv(dim)
        self.second = random_p4inv(dim)
        self.other = torch.nn.Linear(dim, dim)


OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, dampening=0.3),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.01, initial_accumulator_value=0.1),
}


def _train_step(model: TwoLayerModel, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    h, l1 = model.first(x)
    h, l2 = model.second(model.other(h))
    (h.square().mean() - l1.mean() - l2.mean()).backward()
    opt.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_merger_resets_optimizer_state_of_merged_layer_only(name):
    model = TwoLayerModel()
    opt = OPTIMIZERS[name](model.parameters())
    x = torch.randn(8, 5)
    for _ in range(3):
        _train_step(model, opt, x)
    _set_g(model.second, 1e-5)  # the second layer's merge will be skipped
    kept = {
        p: copy.deepcopy(opt.state[p]) for p in (model.second.u, model.second.v, model.other.weight)
    }
    stats = P4Merger(model, opt, every=1, force_every=0).merge_all()
    assert (stats.accepted, stats.skipped) == (1, 1)
    for p, state in kept.items():  # untouched: same tensors, same values
        for key, value in state.items():
            torch.testing.assert_close(opt.state[p][key], value, atol=0, rtol=0)
    # The merged layer's u, v now step exactly as under a freshly created optimizer.
    fresh_model = copy.deepcopy(model)
    fresh_opt = OPTIMIZERS[name]([fresh_model.first.u, fresh_model.first.v])
    _train_step(model, opt, x)
    fresh_opt.zero_grad()
    h, l1 = fresh_model.first(x)
    h, l2 = fresh_model.second(fresh_model.other(h))
    (h.square().mean() - l1.mean() - l2.mean()).backward()
    fresh_opt.step()
    torch.testing.assert_close(model.first.u, fresh_model.first.u, atol=1e-15, rtol=0)
    torch.testing.assert_close(model.first.v, fresh_model.first.v, atol=1e-15, rtol=0)


def test_merger_schedule_forcing_and_corrections():
    model = Sequential(P4Inv(4), P4Inv(4))
    merger = P4Merger(model, every=3, force_every=2, correct_every=2)
    seen = []
    for step in range(1, 13):
        for layer in model:
            _set_g(layer, 1e-4)  # always outside the bounds: only forced merges go through
        stats = merger.step()
        if stats is not None:
            seen.append((step, stats.forced, stats.skipped, stats.corrections))
    # The forced, ill-conditioned merges were corrected down to rounding: eps · cond(A).
    cond = max(float(torch.linalg.cond(layer.A)) for layer in model)
    assert stats.max_residual < 100 * torch.finfo(torch.float64).eps * cond
    assert seen == [(3, 0, 2, 0), (6, 2, 0, 0), (9, 0, 2, 0), (12, 2, 0, 2)]
    assert (
        merger.totals.forced == 4 and merger.totals.skipped == 4 and merger.totals.corrections == 2
    )
    assert all(int(layer.n_merges) == 2 for layer in model)


def test_a_merge_event_reads_the_device_twice_whatever_the_number_of_layers(monkeypatch):
    """All layers' merge checks come to the host in one read, the residuals in a second: on a
    GPU a merge event waits for the device twice, not several times per layer."""
    counts = {}
    for n_layers in (2, 8):
        model = Sequential(*[P4Inv(6) for _ in range(n_layers)])
        with torch.no_grad():
            for layer in model:
                layer.u.normal_(std=0.1)
        reads = []
        for name in ("item", "__float__", "__bool__", "__int__", "tolist", "cpu", "numpy"):
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, _name=name, _reads=reads, **kwargs):
                _reads.append(_name)
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        stats = P4Merger(model, every=1, force_every=0, correct_every=0).merge_all()
        monkeypatch.undo()
        assert stats.accepted == n_layers
        counts[n_layers] = len(reads)
    assert counts[2] == counts[8] <= 3, counts  # stack().cpu().tolist(), float(max residual)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="dim"):
        P4Inv(0)
    with pytest.raises(ValueError, match="init"):
        P4Inv(3, init="random")
    layer = P4Inv(3)
    with pytest.raises(ValueError, match=r"\[batch, 3\]"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\[batch, 3\]"):
        layer.inverse(torch.randn(3))
    with pytest.raises(ValueError, match="every"):
        P4Merger(layer, every=0)
    with pytest.raises(ValueError, match="force_every"):
        P4Merger(layer, force_every=-1)
    with pytest.raises(TypeError, match="LBFGS"):
        P4Merger(layer, torch.optim.LBFGS(layer.parameters()))
    with pytest.raises(KeyError, match="steps"):
        P4Merger(layer).load_state_dict({})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    layer = random_p4inv(32, merges=5)
    gpu = copy.deepcopy(layer).cuda().float()
    assert gpu.A.dtype == torch.float64 and gpu.A.is_cuda
    x = torch.randn(16, 32)
    y, ladj = gpu(x.float().cuda())
    torch.testing.assert_close(y.double().cpu(), layer(x)[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ladj.double().cpu(), layer(x)[1], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        gpu.u.normal_()
    assert P4Merger(gpu, every=1, correct_every=1).merge_all(force=True).forced + 1 > 0


# ------------------------------------------------------------------------------ stress
def _random_merge_walk(dim: int, merges: int, check_every: int) -> float:
    """Noisy rank-one steps merged at the paper's schedule (every step, forced every 10th
    attempt, corrected every 50th merge): first towards a rotation, then towards the same
    rotation with one axis flipped, so that det = 0 is crossed on the way."""
    layer = P4Inv(dim, bias=False)
    merger = P4Merger(layer, every=1, force_every=10, correct_every=50, track_residual=False)
    skew = 0.3 * torch.randn(dim, dim) / (2 * dim) ** 0.5
    target = torch.linalg.matrix_exp(skew - skew.T)
    worst = 0.0
    for k in range(merges):
        if k == merges // 2:
            target[:, 0] *= -1
        with torch.no_grad():
            v = layer.v.double()
            pull = -(layer.weight() - target) @ v / dim  # an SGD step on the mean squared error
            layer.u.add_(pull + 0.2 * torch.randn(dim) / dim)
        merger.step()
        if k % check_every == 0 or k == merges - 1:
            worst = max(worst, layer.inverse_residual())
            sign, logabsdet = torch.linalg.slogdet(layer.A)
            assert float(layer.log_abs_det_A) == pytest.approx(float(logabsdet), abs=1e-8)
            assert float(layer.sign_A) == float(sign)
    totals = merger.totals
    assert totals.accepted > 0.6 * merges and totals.corrections > 0
    assert float(layer.sign_A) == -1.0  # it crossed det = 0
    return worst


def test_random_merge_stress_short():
    assert _random_merge_walk(128, 1000, check_every=50) < 1e-9


@pytest.mark.slow
def test_random_merge_stress_long():
    assert _random_merge_walk(128, 5000, check_every=100) < 1e-9
