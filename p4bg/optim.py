"""Flat parameter buffers: many small parameter tensors presented to the optimizer as one.

Why: the paper's flow has 800 parameter tensors (50 couplings × 2 MLPs × 6, 50 P4Inv × 3, the
coupling scales). On the CPU, fused Adam and the foreach gradient norm still loop over tensors,
at about 7 µs per tensor: 7.1 ms per step against 2.2 ms with the conditioners in one buffer
and P4Inv's 150 tensors apart (``python benchmarks/studies/flat_params.py``).
:class:`FlatParameters` stores each group's parameters as views into one contiguous buffer and
their gradients as views into that buffer's gradient, so that autograd accumulates in place and
the optimizer, the gradient norm and ``zero_grad`` see a handful of tensors. The modules, their
``state_dict`` and every forward pass are unchanged; apex's flat FusedAdam buffers and DDP's
``gradient_as_bucket_view`` rest on the same idea, and neither is a dependency that fits here
(apex is CUDA-only, DDP a process group).

Checkpoints keep the per-parameter layout (:meth:`FlatParameters.state_dict` and
:meth:`FlatParameters.load_state_dict`), so the files do not depend on the flattening: runs saved
before it resume from their Adam moments, and a file saved with it reads like any optimizer
state. Updates equal the per-parameter optimizer's to rounding (tests/test_optim.py): the fused
kernel's vector and scalar paths round differently at the ends of tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FlatParameters"]


class FlatParameters:
    """Parameter groups for an optimizer, each group's trainable parameters (all but
    ``keep_separate``) merged into one buffer.

    Args:
        groups: optimizer parameter groups (dicts with ``"params"`` and any hyper-parameters, as
            ``torch.optim`` takes them). Their order and hyper-parameters are kept.
        keep_separate: parameters that stay tensors of their own in the optimizer (P4Inv's
            u, v, b: a merge resets their Adam state alone, which a slice of a flat state could
            not do with its own step count).

    The members must not be replaced after flattening (``module.to()``, ``p.data = …``): move
    the model first. Call :meth:`zero_grad` rather than the optimizer's: ``set_to_none`` there drops
    the flat gradients that the members' ``.grad`` are views of (:meth:`zero_grad` restores them).
    """

    def __init__(self, groups: Sequence[dict], keep_separate: Iterable[Tensor] = ()) -> None:
        separate = {id(p) for p in keep_separate}
        self.logical: list[dict] = []  # the groups as given: per-parameter, for checkpoints
        self.groups: list[dict] = []  # what the optimizer gets
        self.flats: list[nn.Parameter] = []
        self.members: dict[int, list[tuple[nn.Parameter, int]]] = {}  # id(flat) -> (p, offset)
        self._grad_views: list[tuple[nn.Parameter, Tensor]] = []
        self._where: dict[int, tuple[nn.Parameter, int]] = {}  # id(member) -> (flat, offset)
        for group in groups:
            params = list(group["params"])
            self.logical.append({**group, "params": params})
            merge = [p for p in params if id(p) not in separate and p.requires_grad]
            loose = [p for p in params if id(p) in separate or not p.requires_grad]
            flat = [self._flatten(merge)] if len(merge) > 1 else merge
            self.groups.append({**group, "params": flat + loose})

    def _flatten(self, params: list[nn.Parameter]) -> nn.Parameter:
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) != 1:
            raise ValueError(
                f"FlatParameters: a group mixes dtypes/devices {sorted(map(str, kinds))}"
            )
        total = sum(p.numel() for p in params)
        data = torch.empty(total, dtype=params[0].dtype, device=params[0].device)
        grad = torch.zeros_like(data)
        flat = nn.Parameter(data)
        flat.grad = grad
        self._grad_views.append((flat, grad))  # restored if the optimizer drops it
        members, offset = [], 0
        for p in params:
            n = p.numel()
            data[offset : offset + n].copy_(p.detach().reshape(-1))
            p.data = data[offset : offset + n].view_as(p)
            p.grad = grad[offset : offset + n].view_as(p)
            self._grad_views.append((p, p.grad))
            members.append((p, offset))
            self._where[id(p)] = (flat, offset)
            offset += n
        self.flats.append(flat)
        self.members[id(flat)] = members
        return flat

    def tensors(self) -> list[Tensor]:
        """What the optimizer updates: the flat buffers and the separate parameters."""
        return [p for g in self.groups for p in g["params"]]

    def zero_grad(self) -> None:
        """Zero the flat gradients (their members' ``.grad`` are views of them) and drop the
        separate parameters' gradients (``set_to_none``, as the optimizer would)."""
        for p, view in self._grad_views:
            if p.grad is not view:  # replaced from outside (e.g. optimizer.zero_grad()): restore
                p.grad = view
        for flat in self.flats:
            flat.grad.zero_()
        for group in self.groups:
            for p in group["params"]:
                if id(p) not in self.members:
                    p.grad = None

    def state_of(self, optimizer: torch.optim.Optimizer, p: Tensor) -> dict[str, Any]:
        """Optimizer state of one (logical) parameter: views into its flat buffer's state."""
        if id(p) not in self._where:
            return optimizer.state.get(p, {})
        flat, offset = self._where[id(p)]
        return {
            k: self._slice(v, flat, offset, p) for k, v in optimizer.state.get(flat, {}).items()
        }

    @staticmethod
    def _slice(value: Any, flat: Tensor, offset: int, p: Tensor) -> Any:
        if isinstance(value, Tensor) and value.shape == flat.shape:
            return value[offset : offset + p.numel()].view_as(p)
        return value

    def state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's ``state_dict`` as an optimizer over the logical groups, one entry per
        parameter, would have written it."""
        real = optimizer.state_dict()
        state, groups, index = {}, [], 0
        for logical, group in zip(self.logical, real["param_groups"], strict=True):
            ids = []
            for p in logical["params"]:
                entry = self.state_of(optimizer, p)
                if entry:
                    state[index] = {k: v.clone() if isinstance(v, Tensor) else v
                                    for k, v in entry.items()}  # fmt: skip
                ids.append(index)
                index += 1
            groups.append({**group, "params": ids})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, optimizer: torch.optim.Optimizer, saved: dict) -> None:
        """Load a per-parameter ``state_dict`` (:meth:`state_dict`'s, or one written before
        flattening) into ``optimizer``. A flat buffer's members must agree on Adam's step count
        (they are updated together); a member without state starts from zero moments."""
        if len(saved["param_groups"]) != len(self.logical):
            raise ValueError(f"optimizer state: {len(saved['param_groups'])} parameter groups, "
                             f"the model's optimizer has {len(self.logical)}")  # fmt: skip
        by_param: dict[int, dict] = {}
        for logical, group in zip(self.logical, saved["param_groups"], strict=True):
            if len(group["params"]) != len(logical["params"]):
                raise ValueError(f"optimizer state: a group of {len(group['params'])} "
                                 f"parameters, the model has {len(logical['params'])}")  # fmt: skip
            for p, i in zip(logical["params"], group["params"], strict=True):
                if i in saved["state"]:
                    by_param[id(p)] = saved["state"][i]
        state, index = {}, 0
        for group in self.groups:
            for q in group["params"]:
                own = id(q) not in self.members
                entry = by_param.get(id(q)) if own else self._gather(q, by_param)
                if entry:
                    state[index] = entry
                index += 1
        real = optimizer.state_dict()
        pairs = zip(saved["param_groups"], real["param_groups"], strict=True)
        groups = [{**g, "params": r["params"]} for g, r in pairs]
        optimizer.load_state_dict({"state": state, "param_groups": groups})

    def _gather(self, flat: Tensor, by_param: dict[int, dict]) -> dict | None:
        members = self.members[id(flat)]
        present = [by_param[id(p)] for p, _ in members if id(p) in by_param]
        if not present:
            return None
        steps = {float(s["step"]) for s in present if "step" in s}
        if len(steps) > 1:
            raise ValueError(f"optimizer state: parameters of one flat group have different "
                             f"step counts {sorted(steps)}; they are updated together")  # fmt: skip
        entry: dict[str, Any] = {}
        for key, value in present[0].items():
            if isinstance(value, Tensor) and key != "step":  # moments: one slice per member
                parts = []
                for p, _ in members:
                    own = by_param.get(id(p), {}).get(key)
                    parts.append(torch.zeros(p.numel(), dtype=flat.dtype) if own is None
                                 else own.reshape(-1).to(flat.dtype))  # fmt: skip
                entry[key] = torch.cat(parts)
            else:
                entry[key] = value.clone() if isinstance(value, Tensor) else value
        return entry
