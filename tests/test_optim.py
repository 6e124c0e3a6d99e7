"""FlatParameters against the per-parameter optimizer it stands in for (the oracle)."""

from __future__ import annotations

import copy

import pytest
import torch

from p4bg.flows import build_flow
from p4bg.nn import P4Inv
from p4bg.optim import FlatParameters


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    flow = build_flow("p4inv", dim=6, n_blocks=2, hidden=8)
    with torch.no_grad():  # non-zero output layers, so that every parameter moves
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return flow


def p4inv_params(flow: torch.nn.Module) -> list[torch.Tensor]:
    return [p for m in flow.modules() if isinstance(m, P4Inv) for p in m.parameters()]


def loss(flow: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    y, ladj = flow(x)
    return y.square().sum() - ladj.sum()


def test_members_are_views_of_the_flat_buffer_and_grads_accumulate_there():
    flow = model()
    before = copy.deepcopy(flow.state_dict())
    separate = p4inv_params(flow)
    flat = FlatParameters([{"params": list(flow.parameters())}], keep_separate=separate)
    after = flow.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # values kept
    (buffer,) = flat.flats
    assert len(flat.tensors()) == 1 + len(separate)
    n_separate = sum(p.numel() for p in separate)
    assert buffer.numel() == sum(p.numel() for p in flow.parameters()) - n_separate
    with torch.no_grad():  # the modules see what the optimizer writes to the buffer
        buffer.add_(1.0)
    for name, p in flow.named_parameters():
        shift = 0.0 if any(p is q for q in separate) else 1.0
        torch.testing.assert_close(p.detach(), before[name] + shift, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        buffer.sub_(1.0)
    flat.zero_grad()
    x = torch.randn(5, 6)
    loss(flow, x).backward()
    reference = model()
    loss(reference, x).backward()
    start = buffer.grad.data_ptr()
    end = start + buffer.grad.element_size() * buffer.numel()
    for (name, p), q in zip(flow.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
        inside = start <= p.grad.data_ptr() < end  # the members' grads are views of flat.grad
        assert inside != any(p is s for s in separate), name
    flat.zero_grad()
    assert float(buffer.grad.abs().sum()) == 0.0
    assert all(p.grad is None for p in separate)
    flow.zero_grad(set_to_none=True)  # from outside: the views are restored
    torch.optim.Adam(flat.groups).zero_grad(set_to_none=True)
    flat.zero_grad()
    loss(flow, x).backward()
    assert float(buffer.grad.abs().sum()) > 0


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_training_with_flat_buffers_equals_the_per_parameter_optimizer(weight_decay):
    """Same losses, same parameters, same per-parameter state_dict, for Adam and AdamW with
    decay on the 2-D weights only (the trainer's groups). Equal to rounding, not bitwise: the
    fused kernel's vector and scalar paths round differently where a tensor's length is not a
    multiple of the vector width, and the members' lengths are not."""

    def groups(flow):
        if weight_decay == 0:
            return [{"params": list(flow.parameters())}]
        p4 = {id(p) for p in p4inv_params(flow)}
        decay = [p for p in flow.parameters() if p.ndim == 2 and id(p) not in p4]
        rest = [p for p in flow.parameters() if p.ndim != 2 or id(p) in p4]
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": rest, "weight_decay": 0.0}]  # fmt: skip

    kind = torch.optim.AdamW if weight_decay else torch.optim.Adam
    a, b = model(), model()
    opt_a = kind(groups(a), lr=1e-2, fused=True)
    flat = FlatParameters(groups(b), keep_separate=p4inv_params(b))
    opt_b = kind(flat.groups, lr=1e-2, fused=True)
    torch.manual_seed(1)
    for _ in range(4):
        x = torch.randn(7, 6)
        opt_a.zero_grad(set_to_none=True)
        flat.zero_grad()
        la, lb = loss(a, x), loss(b, x)
        la.backward()
        lb.backward()
        torch.testing.assert_close(lb, la)
        opt_a.step()
        opt_b.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, msg=name)
    saved_a, saved_b = opt_a.state_dict(), flat.state_dict(opt_b)
    assert saved_a["param_groups"] == saved_b["param_groups"]
    assert saved_a["state"].keys() == saved_b["state"].keys()
    for i, entry in saved_a["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(saved_b["state"][i][key], value)

    # a per-parameter state (an older checkpoint) loads into the flat optimizer and continues
    # exactly as the per-parameter optimizer does
    c = model(5)
    c.load_state_dict(a.state_dict())
    flat_c = FlatParameters(groups(c), keep_separate=p4inv_params(c))
    opt_c = kind(flat_c.groups, lr=1e-2, fused=True)
    flat_c.load_state_dict(opt_c, copy.deepcopy(saved_a))  # as torch.load gives it
    x = torch.randn(7, 6)
    opt_a.zero_grad(set_to_none=True)
    flat_c.zero_grad()
    loss(a, x).backward()
    loss(c, x).backward()
    opt_a.step()
    opt_c.step()
    for p, q in zip(a.parameters(), c.parameters(), strict=True):
        torch.testing.assert_close(q, p)


def test_state_of_a_parameter_and_errors_on_a_mismatched_state():
    flow = model()
    flat = FlatParameters([{"params": list(flow.parameters())}], keep_separate=p4inv_params(flow))
    opt = torch.optim.Adam(flat.groups, lr=1e-3)
    assert flat.state_of(opt, next(flow.parameters())) == {}
    flat.zero_grad()
    loss(flow, torch.randn(3, 6)).backward()
    opt.step()
    weight = next(p for p in flow.parameters() if p.ndim == 2)
    state = flat.state_of(opt, weight)
    assert state["exp_avg"].shape == weight.shape and int(state["step"]) == 1
    saved = flat.state_dict(opt)
    with pytest.raises(ValueError, match="parameter groups"):
        flat.load_state_dict(opt, {**saved, "param_groups": saved["param_groups"] * 2})
    first = saved["param_groups"][0]["params"]
    short = [{**saved["param_groups"][0], "params": first[:-1]}]
    with pytest.raises(ValueError, match="a group of"):
        flat.load_state_dict(opt, {**saved, "param_groups": short})
    state = copy.deepcopy(saved["state"])
    state[first[0]]["step"] = torch.tensor(7.0)  # members of one buffer must share the count
    with pytest.raises(ValueError, match="different step counts"):
        flat.load_state_dict(opt, {**saved, "state": state})
    with pytest.raises(ValueError, match="mixes dtypes"):
        FlatParameters([{"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.float32)),
                                    torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]}])  # fmt: skip
