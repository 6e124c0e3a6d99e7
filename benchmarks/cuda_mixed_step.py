"""The mixed training step on a GPU with each target energy: milliseconds and host syncs per step.

Prepared for a session that is lent a CUDA device (the device tool): one short run that trains
the paper-size P4Inv model for a few mixed steps with ``--energy torch`` (TorchEnergy on the
device) and ``--energy openmm`` (positions to the host, OpenMM worker processes, forces back),
and reports the median milliseconds per step and the number of host synchronisations per step,
counted with ``torch.cuda.set_sync_debug_mode("warn")`` (each sync the CUDA runtime reports is
one warning). On a machine without CUDA it runs on the CPU and reports no sync counts.

    python benchmarks/cuda_mixed_step.py --data data/alanine_dipeptide_600K
    python benchmarks/cuda_mixed_step.py --data DATA --steps 2 --batch 8     # quick
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from p4bg.config import TrainConfig, apply_overrides
from p4bg.training import Trainer


def time_mixed(args: argparse.Namespace, energy: str, device: str) -> tuple[float, float | None]:
    """Median ms per mixed step and mean syncs per step (None without CUDA)."""
    config = apply_overrides(TrainConfig(), {
        "data": args.data, "out": "/tmp/p4bg_cuda_bench", "batch_size": args.batch,
        "nll_steps": 0, "mixed_steps": args.steps + 3, "device": device, "energy": energy,
        "log_every": 10**6}, "benchmark")  # fmt: skip
    trainer = Trainer(config, progress=False)
    trainer.energy()
    cuda = trainer.device.type == "cuda"
    times, syncs = [], []
    for step in range(config.total_steps):
        if cuda:
            torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda and step >= 3:
                torch.cuda.set_sync_debug_mode("warn")
            t0 = time.perf_counter()
            trainer.train_step()
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
        if step >= 3:
            times.append(elapsed)
            syncs.append(sum("synchroniz" in str(w.message) for w in caught))
    trainer.target.close()
    return 1e3 * statistics.median(times), (statistics.mean(syncs) if cuda else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="data/alanine_dipeptide_600K")
    parser.add_argument("--steps", type=int, default=20, help="timed mixed steps (after 3)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__} on {name}; paper-size P4Inv model, batch {args.batch}, "
          f"median of {args.steps} mixed steps")  # fmt: skip
    print(f"  {'energy':<7} {'ms/step':>8} {'syncs/step':>11}")
    for energy in ("torch", "openmm"):
        ms, syncs = time_mixed(args, energy, device)
        cell = "n/a (CPU)" if syncs is None else f"{syncs:.1f}"
        print(f"  {energy:<7} {ms:>8.1f} {cell:>11}")


if __name__ == "__main__":
    main()
