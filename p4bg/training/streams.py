"""The random streams of a training run, each with a seed of its own.

Separate streams keep one setting from moving another's draws: changing the validation sample
count never changes the training trajectory. Minibatches and the prior draws of the energy term
are shared by all processes of a distributed run (every rank draws the global batch and keeps
its part, so K processes compute what one process with the K-fold batch would); the merge stream
(new P4Inv ``v`` vectors) is each rank's own, and rank 0's draws are broadcast after a merge.
The global generators of torch, numpy and Python are seeded too and saved in checkpoints, so
that a resumed run continues exactly.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["RANK_STREAMS", "STREAMS", "Streams", "global_rng_state", "set_global_rng_state"]

#: stream name -> offset added to the run's seed
STREAMS = {"batches": 1, "kl": 2, "validation": 3, "merges": 4}
#: streams each process keeps to itself
RANK_STREAMS = frozenset({"merges"})


def global_rng_state(device: torch.device) -> dict[str, Any]:
    """The global generators' states (torch, numpy, Python, and CUDA's on a CUDA device)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`global_rng_state` saved."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Streams:
    """The named generators of one process, on the training device (indices and prior draws
    are made where they are used, without a host round trip)."""

    def __init__(self, seed: int, rank: int, device: torch.device) -> None:
        self.seed, self.rank = seed, rank
        self.generators = {name: torch.Generator(device=device).manual_seed(self.seed_of(name))
                           for name in STREAMS}  # fmt: skip

    def __getitem__(self, name: str) -> torch.Generator:
        return self.generators[name]

    def seed_of(self, name: str) -> int:
        """The run's seed plus the stream's offset (and, for a rank's own stream, its rank's)."""
        rank = self.rank if name in RANK_STREAMS else 0
        return self.seed + STREAMS[name] + 7_919 * rank

    def reseed(self, step: int) -> None:
        """New seeds derived from the step: for a resume on another device type, whose
        generators cannot take the saved states."""
        for name, offset in STREAMS.items():
            self.generators[name].manual_seed(self.seed + offset + 1_000_003 * step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: g.get_state() for name, g in self.generators.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, g_state in state.items():
            self.generators[name].set_state(g_state)

    def prior(self, n: int, dim: int, stream: str, scale: float, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:  # fmt: skip
        """``n`` draws of N(0, scale²·I) in ``dim`` dimensions from the named stream, drawn in
        float64 (the same numbers whatever the model's dtype) and cast to ``dtype``."""
        g = self.generators[stream]
        z = torch.randn(n, dim, generator=g, dtype=torch.float64, device=g.device)
        return (scale * z).to(device, dtype)
