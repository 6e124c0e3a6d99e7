"""Optimizer step of the paper-size flow: per-parameter tensors against flat buffers, in one run.

The gradient norm (foreach), fused Adam (with ``found_inf``) and ``zero_grad`` as the training
step runs them, on the paper's P4Inv flow (800 parameter tensors), first with every tensor
handed to the optimizer, then through :class:`p4bg.optim.FlatParameters` (the conditioners in
one buffer, P4Inv's 150 tensors separate, as :func:`p4bg.training.build.make_optimizer` builds it).
Random gradients; alternating rounds; median milliseconds.

    python benchmarks/studies/flat_params.py
    python benchmarks/studies/flat_params.py --steps 5 --rounds 1   # quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from p4bg.flows import build_flow
from p4bg.nn import P4Inv
from p4bg.optim import FlatParameters


def step_ms(params: list[torch.Tensor], zero_grad, steps: int) -> list[float]:
    optimizer = torch.optim.Adam(params, lr=1e-4, fused=True)
    grads = [torch.randn_like(p) for p in params]
    times = []
    for _ in range(steps):
        zero_grad()
        for p, g in zip(params, grads, strict=True):  # stands in for backward (not timed)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        t0 = time.perf_counter()
        norm = torch.nn.utils.clip_grad_norm_(params, float("inf"), foreach=True)
        optimizer.found_inf = (~torch.isfinite(norm)).to(torch.float32)
        optimizer.step()
        zero_grad()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=50, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    plain, flat_model = build_flow("p4inv"), build_flow("p4inv")
    params = list(plain.parameters())
    p4 = [p for m in flat_model.modules() if isinstance(m, P4Inv) for p in m.parameters()]
    flat = FlatParameters([{"params": list(flat_model.parameters())}], keep_separate=p4)

    def zero_plain() -> None:
        for p in params:
            p.grad = None

    times: dict[str, list[float]] = {"per-parameter": [], "flat": []}
    for _ in range(args.rounds):
        times["per-parameter"] += step_ms(params, zero_plain, args.steps)[3:]
        times["flat"] += step_ms(flat.tensors(), flat.zero_grad, args.steps)[3:]
    n = sum(p.numel() for p in params)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; paper P4Inv flow, "
          f"{n:,} parameters; clip_grad_norm_ + fused Adam + zero_grad, median ms")  # fmt: skip
    print(f"  {'layout':<14} {'tensors':>8} {'ms':>8} {'ratio':>7}")
    base = statistics.median(times["per-parameter"])
    for name, count in (("per-parameter", len(params)), ("flat", len(flat.tensors()))):
        ms = statistics.median(times[name])
        print(f"  {name:<14} {count:>8} {ms * 1e3:>8.2f} {base / ms:>6.2f}x")


if __name__ == "__main__":
    main()
