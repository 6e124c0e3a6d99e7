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
        for name in ("attempts", "accepted", "forced", "skipped", "refused", "corrections",
                     "fallbacks"):  # fmt: skip
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


@pytest.mark.parametrize("kind", ["P4Inv via inv", "RNVP"])
def test_schedule_run_continues_from_its_checkpoint_as_if_never_stopped(kind):
    """25 steps at once, or 12 then a checkpoint, a fresh process's worth of objects and 13
    more: the same parameters, P4Inv state, optimizer state and data stream, bit for bit
    (merges and a learning-rate halving included)."""
    schedule = _schedule()
    straight = schedule.Run(kind, ["moons", "rings"], [0, 1], steps=24)
    straight.advance(25)
    first = schedule.Run(kind, ["moons", "rings"], [0, 1], steps=24)
    first.advance(12)
    state = first.state()
    resumed = schedule.Run(kind, ["moons", "rings"], [0, 1], steps=24)
    resumed.load(state)
    resumed.advance(13)
    a, b = straight.stack.state_dict(), resumed.stack.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    torch.testing.assert_close(straight.recent, resumed.recent, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(straight.batch(), resumed.batch())
    if kind != "RNVP":
        assert int(straight.trainer.stats.attempts.sum()) > 0
        assert straight.trainer.stats.as_lists() == resumed.trainer.stats.as_lists()
    with pytest.raises(SystemExit, match="another run"):
        schedule.Run(kind, ["moons"], [0, 1], steps=24).load(state)


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
