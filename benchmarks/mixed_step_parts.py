"""Where the compiled mixed step of the paper-size P4Inv model spends its time, in one run.

Each part runs compiled (``compile=true``'s options), forward and backward, at batch 256 in
float32, in both directions as the mixed step uses it (NLL: configuration → latent; sampling:
latent → configuration): the coordinate transform, the flow's couplings alone, its P4Inv layers
alone, the whole flow, TorchEnergy with forces, and the optimizer (gradient norm + fused Adam
on the flat buffers). Then the whole training step. With ``--base-ms`` (the OpenMM-bridge step
of the revision before the device-energy work, from ``benchmarks/train_step_compare.py``) it
prints the step time a speed-up target allows, beside the parts that cannot shrink by
restructuring: the matrix products of the couplings.

    python benchmarks/mixed_step_parts.py --data data/alanine_dipeptide_600K --base-ms 195.6
    python benchmarks/mixed_step_parts.py --data DATA --steps 3     # quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from p4bg.config import TrainConfig, apply_overrides
from p4bg.nn import P4Inv, Sequential
from p4bg.train import COMPILE_OPTIONS, Trainer


def median_ms(fn: Callable[[], None], steps: int) -> float:
    for _ in range(3):  # compilation and warm-up
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def both_directions(bijection: torch.nn.Module) -> Callable:
    def run(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y, ladj_in = bijection.inverse(x)
        w, ladj_out = bijection(z)
        return y.sum() + ladj_in.sum() + w.sum() + ladj_out.sum()

    return torch.compile(run, options=COMPILE_OPTIONS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="data/alanine_dipeptide_600K")
    parser.add_argument("--steps", type=int, default=20, help="timed calls per part")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--base-ms", type=float, default=None,
                        help="the OpenMM-bridge mixed step before the work (ms)")  # fmt: skip
    parser.add_argument("--target", type=float, default=2.5, help="speed-up asked (2.5)")
    parser.add_argument("--blocks", type=int, default=TrainConfig().n_blocks,
                        help="flow blocks (the paper: 25; fewer for a smoke run)")  # fmt: skip
    args = parser.parse_args(argv)
    config = apply_overrides(TrainConfig(), {
        "data": args.data, "out": "/tmp/p4bg_parts", "batch_size": args.batch, "nll_steps": 0,
        "mixed_steps": 10**6, "energy": "torch", "compile": True, "device": "cpu",
        "n_blocks": args.blocks},
        "benchmark")  # fmt: skip
    trainer = Trainer(config, progress=False)
    energy = trainer.energy()
    flow = trainer.flow
    couplings = Sequential([m for m in flow.layers if not isinstance(m, P4Inv)])
    mixings = Sequential([m for m in flow.layers if isinstance(m, P4Inv)])
    x = trainer.train_x[: args.batch].clone().requires_grad_(True)
    z = torch.randn(args.batch, trainer.coordinates.dim, requires_grad=True)
    parts: dict[str, Callable[[], None]] = {}
    n = len(couplings)
    for name, module in (("coordinate transform", trainer.coordinates),
                         (f"couplings ({n})", couplings), (f"P4Inv layers ({n})", mixings),
                         ("whole flow", flow)):  # fmt: skip
        fn = both_directions(module)
        inputs = (x, z) if module is trainer.coordinates else (z.detach().clone(), z)
        parts[name] = lambda fn=fn, inputs=inputs: fn(*inputs).backward()
    positions = trainer.train_x[: args.batch].clone().requires_grad_(True)
    parts["TorchEnergy with forces"] = lambda: energy(positions).sum().backward()

    def optimizer_step() -> None:
        norm = torch.nn.utils.clip_grad_norm_(trainer.flat.tensors(), float("inf"), foreach=True)
        trainer.optimizer.found_inf = (~torch.isfinite(norm)).to(torch.float32)
        trainer.optimizer.step()

    parts["grad norm + Adam"] = optimizer_step
    parts["whole mixed step"] = lambda: trainer.train_step()
    results = {name: median_ms(fn, args.steps) for name, fn in parts.items()}
    step = results["whole mixed step"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"compiled, median ms of {args.steps} calls (forward + backward, both "
          "directions)")  # fmt: skip
    print(f"  {'part':<26} {'ms':>7} {'of the step':>12}")
    for name, ms in results.items():
        print(f"  {name:<26} {ms:>7.1f} {100 * ms / step:>11.0f}%")
    if args.base_ms:
        budget = args.base_ms / args.target
        ms = results[f"couplings ({n})"]
        print(f"  a {args.target}x step from {args.base_ms:.1f} ms: {budget:.1f} ms; the couplings "
              f"alone take {ms:.1f} ms ({100 * ms / budget:.0f}% of it)")  # fmt: skip


if __name__ == "__main__":
    main()
