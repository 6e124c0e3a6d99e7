"""What ``torch.compile`` gains on the NLL training step as the code stands, in one run.

Times the step (loss through the inverse flow and transform, backward, Adam) of the paper-size
P4Inv model eagerly and compiled, and counts the graph breaks ``torch._dynamo.explain`` finds in
the loss (0 since the graph breaks were removed). ``p4bg.train --compile=true`` uses it.

    python benchmarks/compile_nll_step.py --data data/alanine_dipeptide_600K
    python benchmarks/compile_nll_step.py --data DATA --steps 2 --batch 8     # quick
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch

from p4bg.config import TrainConfig, apply_overrides
from p4bg.train import Trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="data/alanine_dipeptide_600K")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 3)")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)  # recompilation notices
    config = apply_overrides(TrainConfig(), {
        "data": args.data, "out": "/tmp/p4bg_compile_bench", "batch_size": args.batch,
        "device": "cpu"}, "benchmark")  # fmt: skip
    trainer = Trainer(config, progress=False)
    x = trainer.train_x[: args.batch]

    def step(loss_fn) -> float:
        t0 = time.perf_counter()
        trainer.flat.zero_grad()
        loss_fn(x).backward()
        trainer.optimizer.step()
        return time.perf_counter() - t0

    def median_ms(loss_fn) -> float:
        for _ in range(3):
            step(loss_fn)
        return 1e3 * statistics.median(step(loss_fn) for _ in range(args.steps))

    eager = median_ms(trainer.bg.nll)
    explained = torch._dynamo.explain(trainer.bg.nll)(x)
    compiled_fn = torch.compile(trainer.bg.nll)
    seconds = step(compiled_fn)
    compiled = median_ms(compiled_fn)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"P4Inv paper-size model, median of {args.steps} NLL steps")  # fmt: skip
    print(f"  graph breaks in the loss: {explained.graph_break_count} "
          f"({explained.graph_count} graphs); first compiled step {seconds:.1f} s")  # fmt: skip
    print(f"  eager {eager:.1f} ms, compiled {compiled:.1f} ms, eager/compiled "
          f"{eager / compiled:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
