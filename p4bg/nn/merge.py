"""The merge schedule of P4Inv layers: every ``N`` optimizer steps each layer folds its rank-one
perturbation into ``A`` (paper §3, App. A; docs/design.md §3), and the optimizer forgets that
layer's u and v.

:class:`P4Merger` walks the model's P4Inv layers on schedule, reads every layer's merge check
with one device synchronisation, applies :meth:`P4Inv.merge_decision` (skipped, accepted, forced
every ``force_every``-th event, or reset when u or v went non-finite), corrects the stored inverse
every ``correct_every`` merges of a layer, and counts all of it in :class:`MergeStats`. In a run
of several processes the caller passes a ``broadcast`` function; nn/ itself knows nothing of
torch.distributed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn

from p4bg.nn.p4inv import MergeResult, P4Inv

__all__ = ["MergeStats", "P4Merger", "reset_optimizer_state"]


@dataclass
class MergeStats:
    """Counts over P4Inv layers for one merge event (or, summed, for a whole run)."""

    attempts: int = 0
    accepted: int = 0
    forced: int = 0
    skipped: int = 0
    refused: int = 0
    nonfinite_resets: int = 0
    corrections: int = 0
    fallbacks: int = 0
    max_residual: float = float("nan")

    def add(self, other: MergeStats) -> None:
        for f in fields(self):
            if f.name == "max_residual":
                mine, theirs = self.max_residual, other.max_residual
                self.max_residual = theirs if math.isnan(mine) else max(mine, theirs)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


# the order in which merge decisions travel between processes (as their index)
_RESULTS = list(MergeResult)


def _merge_state(layer: P4Inv) -> list[Tensor]:
    """The buffers a merge changes in a layer (u and v are broadcast for every layer)."""
    return [layer.A, layer.Ainv, layer.log_abs_det_A, layer.sign_A, layer.n_merges]


def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> None:
    """Return the optimizer state of ``params`` (only them) to what a fresh optimizer has.

    Optimizers that create state lazily at their first step (Adam, AdamW, SGD, RMSprop, …)
    simply forget it. Adagrad creates its state at construction; it is reset in place.
    """
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        if isinstance(optimizer, torch.optim.Adagrad):
            group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
            state["step"].zero_()
            state["sum"].fill_(group["initial_accumulator_value"])
        else:
            del optimizer.state[p]


class P4Merger:
    """Merges every P4Inv layer of a model on schedule (call :meth:`step` after each
    ``optimizer.step()``).

    Every ``every`` steps each layer attempts a merge; every ``force_every``-th attempt is forced
    (0: never). A layer's optimizer state for u and v is reset when it merged or was reset for
    non-finite values (``reset_optimizer``), leaving other parameters' state untouched. After
    every ``correct_every``-th merge of a layer (0: never) its inverse is corrected.
    ``track_residual`` measures max |I − A·Ainv| at each merge event (O(n³) per layer).
    ``generator`` draws the new ``v`` of merged layers from a stream of their own (on the
    layers' device). ``broadcast``: in a run of several processes, a function that overwrites
    the tensors it is given with one process's values on every process (p4bg.distributed
    makes it from torch.distributed; None for one process); that process decides every merge
    and its merged state is broadcast after the event (once per event, not per forward pass),
    so that all processes hold the same P4Inv state bit for bit. nn/ knows nothing of how.
    A merge event synchronises with the device twice, whatever the number of layers: once to
    read every layer's :meth:`P4Inv.merge_check`, once for the residuals; an inverse
    correction (every ``correct_every``-th merge of a layer) adds its own.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        every: int = 100,
        force_every: int = 10,
        correct_every: int = 50,
        reset_optimizer: bool = True,
        correction_threshold: float = 1e-6,
        track_residual: bool = True,
        generator: torch.Generator | None = None,
        broadcast: Callable[[list[Tensor]], None] | None = None,
    ) -> None:
        for name, value, low in (
            ("every", every, 1),
            ("force_every", force_every, 0),
            ("correct_every", correct_every, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"P4Merger: {name} must be an int >= {low}, got {value!r}")
        if reset_optimizer and isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(
                "P4Merger: LBFGS keeps one state for all parameters, so a layer's state cannot be "
                "reset alone; use reset_optimizer=False or another optimizer"
            )
        self.layers = [m for m in model.modules() if isinstance(m, P4Inv)]
        self.optimizer = optimizer
        self.every = every
        self.force_every = force_every
        self.correct_every = correct_every
        self.reset_optimizer = reset_optimizer
        self.correction_threshold = correction_threshold
        self.track_residual = track_residual
        self.generator = generator
        self.broadcast = broadcast
        self.steps = 0
        self.events = 0
        self.totals = MergeStats()

    def step(self) -> MergeStats | None:
        """Count one optimizer step; merge when the schedule says so and return the stats."""
        self.steps += 1
        if self.steps % self.every:
            return None
        return self.merge_all()

    def merge_all(self, force: bool | None = None) -> MergeStats:
        """One merge event over all layers, now (``force=None``: by the force schedule)."""
        self.events += 1
        if force is None:
            force = self.force_every > 0 and self.events % self.force_every == 0
        stats = MergeStats()
        checks, decisions = self._decide(force)
        touched_layers = []
        for layer, check, decision in zip(self.layers, checks, decisions, strict=True):
            result = layer.merge_step(force, self.generator, check, decision)
            stats.attempts += 1
            counter = {
                MergeResult.ACCEPTED: "accepted",
                MergeResult.FORCED: "forced",
                MergeResult.SKIPPED: "skipped",
                MergeResult.REFUSED: "refused",
                MergeResult.RESET_NONFINITE: "nonfinite_resets",
            }[result]
            setattr(stats, counter, getattr(stats, counter) + 1)
            touched = result.merged or result is MergeResult.RESET_NONFINITE
            if touched:
                touched_layers.append(layer)
            if touched and self.reset_optimizer and self.optimizer is not None:
                reset_optimizer_state(self.optimizer, (layer.u, layer.v))
            merges = int(check[3]) + int(result.merged)  # layer.n_merges, without a sync
            if result.merged and self.correct_every and merges % self.correct_every == 0:
                fell_back, _ = layer.correct_inverse(self.correction_threshold)
                stats.corrections += 1
                stats.fallbacks += int(fell_back)
        # rank 0's merged state (A, its inverse and determinant) and every layer's u and v (the
        # fresh ones of merged layers) replace the others' bit for bit: no rank's own rounding
        # or random draw survives a merge event
        if self.broadcast is not None:
            merged = [t for layer in touched_layers for t in _merge_state(layer)]
            self.broadcast(merged + [t for layer in self.layers for t in (layer.u, layer.v)])
        if self.track_residual and self.layers:  # one more synchronisation, for all layers
            device = self.layers[0].A.device
            residuals = [layer.inverse_residual_tensor().to(device) for layer in self.layers]
            stats.max_residual = float(torch.stack(residuals).max())
        self.totals.add(stats)
        return stats

    def _decide(self, force: bool) -> tuple[list[list[float]], list[MergeResult]]:
        """Every layer's :meth:`P4Inv.merge_check` and merge decision, read with one
        synchronisation. Across processes rank 0 decides: its checks and decisions are
        broadcast, so that values differing in the last bit cannot split the ranks."""
        if not self.layers:
            return [], []
        device = self.layers[0].A.device
        table = torch.stack([layer.merge_check().to(device) for layer in self.layers])
        checks = table.cpu().tolist()
        pairs = zip(self.layers, checks, strict=True)
        decisions = [layer.merge_decision(check, force) for layer, check in pairs]
        if self.broadcast is None:
            return checks, decisions
        codes = torch.tensor([[float(_RESULTS.index(d))] for d in decisions], dtype=torch.float64)
        table = torch.cat([table, codes.to(device)], 1)
        self.broadcast([table])  # every rank takes rank 0's checks and decisions
        rows = table.cpu().tolist()
        return [row[:4] for row in rows], [_RESULTS[int(row[4])] for row in rows]

    def state_dict(self) -> dict:
        return {"steps": self.steps, "events": self.events, "totals": self.totals.as_dict()}

    def load_state_dict(self, state: dict) -> None:
        missing = {"steps", "events", "totals"} - set(state)
        if missing:
            raise KeyError(f"P4Merger.load_state_dict: missing keys {sorted(missing)}")
        self.steps = int(state["steps"])
        self.events = int(state["events"])
        self.totals = MergeStats(**state["totals"])
