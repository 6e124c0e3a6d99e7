"""benchmarks/density_stack.py, the batched engine of the 2-D density benchmark, against the
one-model classes it batches (p4bg.nn.P4Inv, P4Merger, torch.optim.Adam, build_rnvp_2d), in
float64: densities, gradients, optimizer, and whole training runs with merges."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from density_stack import (
    P4InvStack,
    RNVPStack,
    StackedAdam,
    StackTrainer,
    standard_normal_log_prob,
)

sys.path.pop(0)

from p4bg.flows import build_bent_flow, build_rnvp_2d
from p4bg.nn import Inverse, P4Inv, P4Merger


def _log_prob(model, x):
    z, ladj = model.inverse(x)
    return standard_normal_log_prob(z) + ladj


def _perturbed_bent_flows(m, n_blocks, seed):
    """``m`` float64 App. G stacks with non-trivial A (a few merges), u, v and bias."""
    torch.manual_seed(seed)
    models = []
    for _ in range(m):
        flow = build_bent_flow(2, n_blocks).double()
        for layer in flow.modules():
            if isinstance(layer, P4Inv):
                with torch.no_grad():
                    for _ in range(2):
                        layer.u.normal_(0, 0.3)
                        layer.merge_step(force=True)
                    layer.u.normal_(0, 0.3)
                    layer.bias.normal_(0, 0.3)
        models.append(flow)
    return models


@pytest.mark.parametrize("via_inverse", [False, True])
def test_p4inv_stack_is_the_bent_flows_density_and_gradient(via_inverse):
    flows = _perturbed_bent_flows(3, 4, seed=1)
    stack = P4InvStack.from_models(flows, via_inverse)
    x = torch.randn(3, 50, 2, dtype=torch.float64)
    ours = stack.log_prob(x)
    ours.sum().backward()
    for k, flow in enumerate(flows):
        model = flow if via_inverse else Inverse(flow)
        theirs = _log_prob(model, x[k])
        torch.testing.assert_close(ours[k], theirs, rtol=1e-12, atol=1e-12)
        theirs.sum().backward()
        layers = [x for x in flow.modules() if isinstance(x, P4Inv)]
        for name in ("u", "v", "bias"):
            grad = torch.stack([getattr(layer, name).grad for layer in layers])
            torch.testing.assert_close(getattr(stack, name).grad[k], grad, rtol=1e-9, atol=1e-11)
        # and sampling is the model's forward
        z = torch.randn(20, 2, dtype=torch.float64)
        torch.testing.assert_close(stack.sample(z.expand(3, -1, -1).clone())[k], model(z)[0],
                                   rtol=1e-11, atol=1e-11)  # fmt: skip


@pytest.mark.parametrize("which", ["forward", "inverse"])
def test_the_hand_written_backward_of_a_stack_program_passes_gradcheck(which):
    """The layers-as-one-node backward (density_stack._Program) against finite differences,
    for the input, the weights and the shifts, with the Bent log-determinant used too."""
    import density_stack as ds

    program = (ds._forward_program if which == "forward" else ds._inverse_program)(2)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    Wt = (torch.eye(2, dtype=torch.float64) + 0.3 * torch.randn(2, 4, 2, 2, dtype=torch.float64)
          ).requires_grad_(True)  # fmt: skip
    shift = (0.3 * torch.randn(2, 4, 2, dtype=torch.float64)).requires_grad_(True)

    def f(x, Wt, shift):
        y, ladj = ds._Program.apply(x, Wt, shift, program)
        return y, ladj

    assert torch.autograd.gradcheck(f, (x, Wt, shift))


def test_stacked_adam_is_torch_adam_per_model_with_resets_and_skips():
    torch.manual_seed(0)
    p = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    copies = [p[k].detach().clone().requires_grad_(True) for k in range(3)]
    ours = StackedAdam([p], lr=0.05)
    theirs = [torch.optim.Adam([c], lr=0.05) for c in copies]
    target = torch.randn(3, 4, 2, dtype=torch.float64)
    for step in range(12):
        active = torch.tensor([True, step % 3 != 0, True])  # model 1 skips every third step
        p.grad = 2 * (p.detach() - target)
        ours.step(active)
        for k in range(3):
            if active[k]:
                copies[k].grad = 2 * (copies[k].detach() - target[k])
                theirs[k].step()
        if step == 5:  # model 2 forgets its state (a merge in P4Merger's terms)
            ours.reset(p, torch.tensor([False, False, True])[:, None, None])
            theirs[2] = torch.optim.Adam([copies[2]], lr=0.05)
    for k in range(3):
        torch.testing.assert_close(p.detach()[k], copies[k].detach(), rtol=1e-13, atol=1e-14)


def test_stacked_adam_in_float32_is_torch_adam():
    """float32 parameters: the bias corrections in float64 as torch.optim.Adam has them, so
    the first steps after a reset (where u and v of merged layers always are) agree."""
    torch.manual_seed(1)
    p = torch.randn(2, 5, dtype=torch.float32, requires_grad=True)
    copy = p.detach().clone().requires_grad_(True)
    ours, theirs = StackedAdam([p], lr=5e-3), torch.optim.Adam([copy], lr=5e-3)
    for _ in range(3):
        g = torch.randn(2, 5, dtype=torch.float32)
        p.grad, copy.grad = g.clone(), g.clone()
        ours.step(torch.tensor([True, True]))
        theirs.step()
    torch.testing.assert_close(p.detach(), copy.detach(), rtol=1e-6, atol=1e-7)


def test_a_merge_event_with_every_kind_of_trouble_is_p4mergers():
    """One forced merge event on layers with a non-finite u, with G = 0 exactly, with a stored
    inverse wrecked just before its correction (LU fallback) and ordinary ones: the same
    decisions, counts and buffers as P4Merger.merge_all(force=True) on the one-model stack."""
    flows = _perturbed_bent_flows(2, 3, seed=7)
    layers = [x for x in flows[0].modules() if isinstance(x, P4Inv)]
    with torch.no_grad():
        layers[0].u[0] = float("nan")
        # G = 1 + vᵀ Ainv u = 0 exactly: A = Ainv = I, v = (1, 0), u = (−1, 0)
        eye = torch.eye(2, dtype=torch.float64)
        layers[1].A.copy_(eye)
        layers[1].Ainv.copy_(eye)
        layers[1].log_abs_det_A.zero_()
        layers[1].sign_A.fill_(1.0)
        layers[1].v.copy_(torch.tensor([1.0, 0.0], dtype=torch.float64))
        layers[1].u.copy_(torch.tensor([-1.0, 0.0], dtype=torch.float64))
        layers[2].n_merges.fill_(49)  # its next merge is corrected, from a wrecked inverse
        layers[2].Ainv.mul_(3.0)  # E = I − A·Ainv = −2I: the hyperpower step diverges
    stack = P4InvStack.from_models(flows, via_inverse=True)
    trainer = StackTrainer(stack, 1e-3, every=1, force_every=1, correct_every=50,
                           generators=[torch.Generator().manual_seed(k) for k in range(2)])  # fmt: skip
    event = torch.tensor([True, True])
    fresh = stack.merge(event, event, trainer.optimizer, trainer.stats, trainer.generators, 50)
    for k, flow in enumerate(flows):
        merger = P4Merger(flow, None, every=1, force_every=1, correct_every=50)
        merger.merge_all(force=True)
        ls = [x for x in flow.modules() if isinstance(x, P4Inv)]
        with torch.no_grad():
            for i in torch.nonzero(fresh[k]).flatten().tolist():
                ls[i].v.copy_(stack.v[k, i])
        totals = merger.totals
        for name in ("attempts", "accepted", "forced", "skipped", "refused", "nonfinite_resets",
                     "corrections", "fallbacks"):  # fmt: skip
            assert int(getattr(trainer.stats, name)[k]) == getattr(totals, name), (k, name)
        mirror = P4InvStack.from_models([flow], via_inverse=True)
        for name in ("A", "Ainv", "log_abs_det_A", "sign_A", "u", "v", "bias", "n_merges"):
            torch.testing.assert_close(getattr(stack, name)[k], getattr(mirror, name)[0],
                                       rtol=1e-12, atol=1e-12, equal_nan=True)  # fmt: skip
    stats = trainer.stats
    assert int(stats.nonfinite_resets[0]) == 1 and int(stats.refused[0]) == 1
    assert int(stats.fallbacks[0]) == 1 and int(stats.nonfinite_resets[1]) == 0


def test_rnvp_stack_is_the_rnvp_models():
    torch.manual_seed(3)
    models = [build_rnvp_2d().double() for _ in range(3)]
    for model in models:
        with torch.no_grad():
            for q in model.parameters():
                q.add_(0.3 * torch.randn_like(q))
    stack = RNVPStack(3, models)
    x = torch.randn(3, 40, 2, dtype=torch.float64)
    ours = stack.log_prob(x)
    ours.sum().backward()
    for k, model in enumerate(models):
        theirs = _log_prob(model, x[k])
        torch.testing.assert_close(ours[k], theirs, rtol=1e-13, atol=1e-13)
        theirs.sum().backward()
        for name, flat in zip(stack.names, stack.flat, strict=True):
            torch.testing.assert_close(flat.grad[k], dict(model.named_parameters())[name].grad,
                                       rtol=1e-11, atol=1e-13)  # fmt: skip
        z = torch.randn(10, 2, dtype=torch.float64)
        torch.testing.assert_close(stack.sample(z.expand(3, -1, -1).clone())[k], model(z)[0])


@pytest.mark.parametrize("via_inverse", [False, True])
def test_stack_training_is_the_one_model_loop_merges_included(via_inverse):
    """60 steps of App. G's loop on three models (merges every 3 steps, every 2nd forced,
    corrections every 2nd merge of a layer; one model's batch is non-finite at two steps):
    every loss, every merge count and the final P4Inv state match densities_2d's one-model
    loop with P4Merger and torch.optim.Adam. The fresh v of merged layers is the one random
    draw the two sides do not share: the stack's draws are copied into the one-model runs."""
    m, steps, lr = 3, 60, 2e-2
    flows = _perturbed_bent_flows(m, 3, seed=4)
    stack = P4InvStack.from_models(flows, via_inverse)
    trainer = StackTrainer(stack, lr, every=3, force_every=2, correct_every=2,
                           generators=[torch.Generator().manual_seed(k) for k in range(m)])  # fmt: skip
    models = [flow if via_inverse else Inverse(flow) for flow in flows]
    optims = [torch.optim.Adam(model.parameters(), lr=lr) for model in models]
    mergers = [P4Merger(model, opt, every=3, force_every=2, correct_every=2)
               for model, opt in zip(models, optims, strict=True)]  # fmt: skip
    rng = np.random.default_rng(0)
    for step in range(steps):
        x = torch.from_numpy(rng.standard_normal((m, 64, 2)) * 1.5)
        if step in (7, 20):
            x[1, 0, 0] = float("nan")
        losses = trainer.step(x)
        for k in range(m):
            loss = -_log_prob(models[k], x[k]).mean()
            if not torch.isfinite(loss):
                assert not torch.isfinite(losses[k])
                continue
            torch.testing.assert_close(losses[k], loss.detach(), rtol=1e-10, atol=1e-10)
            optims[k].zero_grad(set_to_none=True)
            loss.backward()
            optims[k].step()
            event = mergers[k].step()
            if event is not None:
                fresh = trainer.last_fresh[k]
                layers = [x for x in flows[k].modules() if isinstance(x, P4Inv)]
                with torch.no_grad():
                    for i in torch.nonzero(fresh).flatten().tolist():
                        layers[i].v.copy_(stack.v[k, i])
    assert trainer.skipped.tolist() == [0, 2, 0]
    stats = trainer.stats
    for k in range(m):
        totals = mergers[k].totals
        assert totals.attempts > 0 and totals.accepted + totals.forced > 0
        for name in ("attempts", "accepted", "forced", "skipped", "refused", "nonfinite_resets",
                     "corrections", "fallbacks"):  # fmt: skip
            assert int(getattr(stats, name)[k]) == getattr(totals, name), name
        assert float(stats.max_residual[k]) < 1e-12
        mirror = P4InvStack.from_models([flows[k]], via_inverse)
        for name in ("A", "Ainv", "log_abs_det_A", "sign_A", "u", "v", "bias"):
            torch.testing.assert_close(getattr(stack, name)[k], getattr(mirror, name)[0],
                                       rtol=1e-9, atol=1e-10)  # fmt: skip
        assert torch.equal(stack.n_merges[k], mirror.n_merges[0])


def _schedule():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import densities_2d_schedule
    finally:
        sys.path.pop(0)
    return densities_2d_schedule


@pytest.mark.parametrize("kind", [pytest.param("P4Inv", marks=pytest.mark.slow), "P4Inv via inv",
                                  "RNVP"])  # fmt: skip
def test_schedule_run_continues_from_its_checkpoint_as_if_never_stopped(kind):
    """105 steps at once, or 52, a checkpoint through torch.save and torch.load, a fresh
    run's worth of objects and 53 more: the same parameters, P4Inv state, optimizer state,
    losses and data stream, bit for bit, across ten merge events (the 10th forced), inverse
    corrections and learning-rate halvings. The run that wrote the checkpoint goes on
    unchanged by having written it."""
    import io

    schedule = _schedule()
    args = (kind, ["moons", "rings"], [0, 1])
    straight = schedule.Run(*args, steps=112)
    straight.advance(105)
    first = schedule.Run(*args, steps=112)
    first.advance(52)
    buffer = io.BytesIO()
    torch.save(first.state(), buffer)
    first.advance(53)
    buffer.seek(0)
    resumed = schedule.Run(*args, steps=112)
    resumed.load(torch.load(buffer, weights_only=False))
    resumed.advance(53)
    for run in (first, resumed):
        a, b = straight.stack.state_dict(), run.stack.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
        torch.testing.assert_close(straight.recent, run.recent, rtol=0, atol=0, equal_nan=True)
        assert [r.bit_generator.state for r in straight.rngs] == [
            r.bit_generator.state for r in run.rngs]  # fmt: skip
        for x, y in zip(straight.trainer.optimizer.exp_avg_sq, run.trainer.optimizer.exp_avg_sq,
                        strict=True):  # fmt: skip
            assert torch.equal(x, y)
    if kind != "RNVP":
        stats = straight.trainer.stats
        assert int(stats.forced.sum()) + int(stats.skipped.sum()) > 0 or int(
            stats.accepted.sum()) == int(stats.attempts.sum())  # fmt: skip
        assert int(stats.attempts.sum()) == 4 * 10 * 200
        assert int(straight.trainer.events.min()) == 10
        assert straight.trainer.stats.as_lists() == resumed.trainer.stats.as_lists()
    with pytest.raises(SystemExit, match="another run"):
        schedule.Run(kind, ["moons"], [0, 1], steps=112).load(straight.state())


def test_schedule_rnvp_run_is_the_one_model_loop():
    """The runner's RealNVP models (no random draw besides the data) follow densities_2d.py's
    ``train`` step for step: the same data stream and learning-rate halvings, float32."""
    schedule = _schedule()
    from densities_2d import DATASETS, build_model, train

    torch.set_default_dtype(torch.float32)  # as the benchmark runs (the fixture restores it)
    run = schedule.Run("RNVP", ["moons", "pinwheel"], [0, 2], steps=40)
    run.advance(40)
    for k, (density, seed) in enumerate(run.pairs):
        torch.manual_seed(seed)
        model = build_model("RNVP")
        info = train(model, DATASETS[density], 40, seed, False, "")
        ours = run.stack.to_model(k)
        for p, q in zip(ours.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
        assert float(np.nanmean(run.recent[k].numpy())) == pytest.approx(info["train_nll"],
                                                                         rel=1e-5)  # fmt: skip


def test_schedule_stack_starts_where_the_one_model_loop_starts():
    """Model (density, seed) of a stack holds the parameters densities_2d.py's loop builds
    for that seed."""
    schedule = _schedule()
    from densities_2d import build_model

    for kind in ("P4Inv", "RNVP"):
        stack = schedule.build_stack(kind, ["moons", "rings"], [3, 5])
        for k, seed in enumerate([3, 5, 3, 5]):
            torch.manual_seed(seed)
            theirs = build_model(kind)
            ours = stack.to_model(k)
            for (n, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
                assert torch.equal(p, q), (kind, k, n)


def test_off_support_share_counts_points_in_empty_cells_outside_and_not_finite():
    """Known answers on the figure's grid (150 cells of 0.06 over [−4.5, 4.5]): one point in
    an empty cell, one in a filled cell, one outside the grid, one NaN → 3 of 4 off."""
    schedule = _schedule()
    empty = np.zeros((150, 150), dtype=bool)
    empty[75, 75] = True  # the cell [0, 0.06)²
    xy = np.array([[0.01, 0.02], [1.0, 1.0], [5.0, 0.0], [np.nan, 0.0]])
    assert schedule.off_support_share(xy, empty) == 0.75
    assert schedule.off_support_share(xy[1:2], empty) == 0.0
