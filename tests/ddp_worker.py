"""One process of the distributed tests (tests/test_distributed.py), started by torchrun.

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py merges OUT [--alone]
    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py train OUT [--stop-at K] -- ARGS

Each rank writes what it holds to ``OUT/rank{r}.pt``, so that the test compares the ranks.
``merges``: three P4Inv layers trained on each rank's own data, with each rank's own random
stream for the new v, and no gradient all-reduce: before every merge event the ranks' u and v
differ. With the process group (the default) every merge is rank 0's; ``--alone`` passes no
world to P4Merger, to show that the ranks then drift apart. ``train``: ``p4bg.train`` with
ARGS as on its command line; ``--stop-at K`` stops it after step K as a signal would;
``--fail-a-third`` makes the target energy fail (+inf) for about a third of the samples, by a
rule of their positions alone, so that one process and two fail on the same samples. Without a
process group (``python tests/ddp_worker.py train …``) it is the single-process run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from train_helpers import stop_after

from p4bg import distributed
from p4bg.energy import make_energy
from p4bg.nn import P4Inv, P4Merger
from p4bg.systems import load_system
from p4bg.train import parse_args, resolve_config
from p4bg.training import Trainer

BUFFERS = ("A", "Ainv", "log_abs_det_A", "sign_A", "n_merges", "u", "v")


def merges(out: Path, alone: bool) -> None:
    world, _ = distributed.setup("cpu")
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([P4Inv(6), P4Inv(6, init="reverse"), P4Inv(6)])
    optimizer = torch.optim.Adam(layers.parameters(), lr=0.05)
    merger = P4Merger(layers, optimizer, every=1, force_every=3, correct_every=7,
                      generator=torch.Generator().manual_seed(100 + world.rank),
                      broadcast=None if alone else distributed.broadcaster(world))  # fmt: skip
    # wide data: the layers shrink until merges leave the sane bounds (skipped, forced)
    data = 3.0 * torch.randn(32, 6, generator=torch.Generator().manual_seed(world.rank))
    for _ in range(120):
        optimizer.zero_grad()
        x, ladj = data, torch.zeros(len(data))
        for layer in layers:
            x, step_ladj = layer(x)
            ladj = ladj + step_ladj
        (0.5 * x.square().sum(1) - ladj).mean().backward()
        optimizer.step()
        merger.step()
    state = {f"{i}.{name}": getattr(layer, name).detach().clone()
             for i, layer in enumerate(layers) for name in BUFFERS}  # fmt: skip
    torch.save({"state": state, "totals": merger.totals.as_dict()}, out / f"rank{world.rank}.pt")
    distributed.shutdown()


class Failing:
    """``energy`` failing where the first coordinate's thousandths are a multiple of 3."""

    def __init__(self, energy) -> None:
        self.energy = energy
        self.stats, self.platform = energy.stats, energy.platform

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fail = torch.remainder(torch.floor(x[:, 0].detach() * 1000), 3) == 0
        return torch.where(fail, torch.inf, self.energy(x))

    def close(self) -> None:
        self.energy.close()


def train(out: Path, stop_at: int, argv: list[str], fail: bool = False) -> None:
    flags, overrides = parse_args(argv)
    config = resolve_config(flags, overrides)
    world, device = distributed.setup(config.device)
    energy = None
    if fail:
        system = load_system(config.system, config.temperature)
        energy = Failing(make_energy(config.energy, system, device=distributed.pick_device(device),
                                     temperature=config.temperatures().target))  # fmt: skip
    trainer = Trainer(config, resume=bool(flags["resume"]), progress=False, world=world,
                      device=device, energy=energy)  # fmt: skip
    if stop_at:
        stop_after(trainer, stop_at)
    trainer.run()
    adam = trainer.flat.state_dict(trainer.optimizer)["state"]
    torch.save({"state": {k: v.clone() for k, v in trainer.flow.state_dict().items()},
                "adam": adam, "step": trainer.step,
                "totals": trainer.merger.totals.as_dict(),
                "counters": trainer.flush_counters()}, out / f"rank{world.rank}.pt")  # fmt: skip
    distributed.shutdown()


if __name__ == "__main__":
    command, folder, *rest = sys.argv[1:]
    if command == "merges":
        merges(Path(folder), "--alone" in rest)
    else:
        stop = int(rest[rest.index("--stop-at") + 1]) if "--stop-at" in rest else 0
        argv = rest[rest.index("--") + 1 :]
        distributed.run_process(lambda: train(Path(folder), stop, argv, "--fail-a-third" in rest))
