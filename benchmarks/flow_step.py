"""Paper-size flow (25 blocks, 60 dims, hidden 60): swap baseline against P4Inv mixing, one run.

Times, at batch --batch (256), median milliseconds of
  forward  z -> x with ladj (no grad), inverse x -> z with ladj (no grad), and
  train step: NLL through the inverse (log N(z; 0, I) + ladj), backward, Adam step — plus, for
  P4Inv, the merge schedule's step (a merge every 100 steps, as the paper),
for the swap model and the P4Inv model, and prints the P4Inv overhead. Data: standard-normal
"configurations" in the 60-dim latent space (the coordinate transform is not part of this).

    python benchmarks/flow_step.py
    python benchmarks/flow_step.py --repeats 5 --batch 64     # quick
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from p4bg.flows import build_flow, count_parameters
from p4bg.nn import P4Merger


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    """Median ms of each operation for both models, measured in alternating rounds (swap, then
    P4Inv, then swap, ...) so that drifts of this noisy machine hit both alike."""
    const = 0.5 * 60 * math.log(2 * math.pi)
    ops: dict[str, dict[str, object]] = {}
    params = {}
    for kind in ("swap", "p4inv"):
        torch.manual_seed(0)
        flow = build_flow(kind).to(device)
        params[kind] = count_parameters(flow)["total"]
        opt = torch.optim.Adam(flow.parameters(), lr=1e-4, foreach=True)
        merger = P4Merger(flow, opt, every=100, track_residual=False) if kind == "p4inv" else None
        x = torch.randn(args.batch, 60, device=device)

        def forward(flow=flow, x=x) -> None:
            with torch.no_grad():
                flow(x)

        def inverse(flow=flow, x=x) -> None:
            with torch.no_grad():
                flow.inverse(x)

        def train(flow=flow, x=x, opt=opt, merger=merger) -> None:
            opt.zero_grad(set_to_none=True)
            z, ladj = flow.inverse(x)
            nll = (0.5 * z.square().sum(1) + const - ladj).mean()
            nll.backward()
            opt.step()
            if merger is not None:
                merger.step()

        ops[kind] = {"forward": forward, "inverse": inverse, "train step": train}
    times = {kind: {op: [] for op in ops[kind]} for kind in ops}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for op in ("forward", "inverse", "train step"):
        for kind in ops:
            for _ in range(3):
                ops[kind][op]()  # warm-up
        for _ in range(args.repeats):
            for kind in ops:
                sync()
                t0 = time.perf_counter()
                ops[kind][op]()
                sync()
                times[kind][op].append(time.perf_counter() - t0)
    result = {kind: {op: statistics.median(t) for op, t in times[kind].items()} for kind in times}
    for kind in result:
        result[kind]["params"] = params[kind]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    results = measure(args, device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, float32, "
          f"batch {args.batch}; median ms over {args.repeats} repeats")  # fmt: skip
    print(f"  {'':<12} {'swap':>10} {'P4Inv':>10} {'overhead':>9}")
    for op in ("forward", "inverse", "train step"):
        s, p = results["swap"][op], results["p4inv"][op]
        print(f"  {op:<12} {s * 1e3:>10.2f} {p * 1e3:>10.2f} {100 * (p / s - 1):>8.1f}%")
    print(f"  parameters: swap {results['swap']['params']:,}, P4Inv {results['p4inv']['params']:,}")


if __name__ == "__main__":
    main()
