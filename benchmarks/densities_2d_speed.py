"""Speed of the 2-D density benchmark: today's one-model loop (densities_2d.py's ``train``)
against the batched engine (density_stack.py) that trains every density × seed of a model kind
at once, side by side in one process, one thread.

    python benchmarks/densities_2d_speed.py                    # 8 densities x 3 seeds
    python benchmarks/densities_2d_speed.py --steps 20 --models RNVP

For each model kind: ms per step of one model in the loop, ms per step of the stack of all M
models, and the speed-up of a model-step (loop ms × M / stack ms); then the paper's full
schedule (8 × 20,000 steps, all kinds, M models each) projected from both, in hours.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from densities_2d import DATASETS, MODELS, build_model, train
from densities_2d_schedule import PAPER_STEPS, Run


def loop_ms(kind: str, steps: int) -> float:
    """ms per step of densities_2d.py's loop on one model (moons), after a warm-up."""
    torch.manual_seed(0)
    model = build_model(kind)
    train(model, DATASETS["moons"], 5, 0, False, kind)
    info = train(model, DATASETS["moons"], steps, 0, False, kind)
    return info["seconds"] / steps * 1e3


def stack_ms(kind: str, datasets: list[str], seeds: list[int], steps: int) -> float:
    """ms per step of the batched engine on every (density, seed) model at once."""
    run = Run(kind, datasets, seeds, steps=PAPER_STEPS)
    run.advance(5)
    start = time.perf_counter()
    run.advance(steps)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    datasets, seeds = list(DATASETS), list(range(args.seeds))
    m = len(datasets) * len(seeds)
    print(f"{args.steps} steps after 5 of warm-up, {args.threads} thread(s); the stack holds "
          f"{len(datasets)} densities x {len(seeds)} seeds = {m} models")  # fmt: skip
    print("| model | loop, one model (ms/step) | stack, all models (ms/step) | speed-up per "
          "model-step | full schedule: loop (h) | full schedule: stack (h) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for kind in args.models:
        a = loop_ms(kind, args.steps)
        b = stack_ms(kind, datasets, seeds, args.steps)
        hours = (a * m * PAPER_STEPS / 3.6e6, b * PAPER_STEPS / 3.6e6)
        totals = [totals[0] + hours[0], totals[1] + hours[1]]
        print(f"| {kind} | {a:.1f} | {b:.1f} | {a * m / b:.1f}x | {hours[0]:.1f} | "
              f"{hours[1]:.1f} |", flush=True)  # fmt: skip
    print(f"all kinds, one core: loop {totals[0]:.1f} h, stack {totals[1]:.1f} h "
          f"({totals[0] / totals[1]:.1f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
