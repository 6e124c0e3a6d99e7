"""Checkpoints of a training run: what is saved, how a run resumes, how a run starts from another.

A checkpoint holds everything the next step depends on: the flow, the coordinate fit, the
optimizer (flat buffers converted back to per-parameter state), the merge schedule, every random
stream of every rank, the counters, the best validation NLL and the energy platform in use. So a
run killed after step k and resumed computes what an uninterrupted run would, bit for bit (tested,
also across a reorganisation of the code: tests/test_legacy_resume.py). A resume on another
number of processes, or with a configuration that differs in a key that changes the computation,
is refused with the command that would work.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p4bg import distributed
from p4bg.config import ConfigError
from p4bg.runs import (
    BEST,
    CHECKPOINT,
    MODEL_KEYS,
    RESUME_OVERRIDES,
    changed_keys,
    config_from_values,
    read_checkpoint,
    save_checkpoint,
)
from p4bg.training.objective import AnnealBuffer
from p4bg.training.streams import global_rng_state, set_global_rng_state

if TYPE_CHECKING:
    from p4bg.training.build import RunParts
    from p4bg.training.loop import Trainer

__all__ = ["init_from", "resume", "save", "save_best", "training_state"]


def training_state(t: Trainer) -> dict[str, Any]:
    """This process's checkpoint content."""
    p = t.parts
    return {
        "config": asdict(p.config),
        "step": t.step,
        "flow": p.flow.state_dict(),
        "coordinates": p.coordinates.state_dict(),
        "optimizer": p.flat.state_dict(p.optimizer),
        "merger": p.merger.state_dict(),
        "rng": global_rng_state(p.device),
        "world_size": p.world.size,
        "streams_device": p.device.type,
        "batches": p.streams["batches"].get_state(),
        "streams": p.streams.state_dict(),
        "counters": dict(t.counters),
        "evaluations": dict(t.evaluations),
        "evaluations_from": t.evaluations_from,
        # the draws the next steps resample from (none to keep when every step draws afresh)
        "anneal_buffer": t.anneal_buffer.state_dict()
        if t.anneal_buffer is not None and p.config.anneal_refill_every > 1
        else None,
        "best": dict(t.best),
        "temperature_K": p.temperatures.data,
        "target_temperature_K": p.temperatures.target,
        "seconds": t.seconds,
        "energy_platform": p.target.platform,
    }


def save(t: Trainer) -> None:
    """checkpoint.pt, with every rank's random states (a collective across processes: every
    rank calls it; rank 0 writes)."""
    t.flush_counters()
    p = t.parts
    ranks = None
    if p.world.distributed:
        own = {"rng": global_rng_state(p.device), "streams": p.streams.state_dict()}
        ranks = distributed.gather_objects(own, p.world)
    if p.world.main:
        state = training_state(t)
        if ranks is not None:
            state["ranks"] = ranks
        save_checkpoint(t.out / CHECKPOINT, state)


def save_best(t: Trainer) -> None:
    """best.pt: the model at the lowest validation NLL (rank 0 alone; not for resuming)."""
    save_checkpoint(t.out / BEST, training_state(t))


def resume(t: Trainer, path: Path) -> None:
    """Load ``path`` (a checkpoint.pt) into the trainer and its parts."""
    if not path.is_file():
        raise ConfigError(f"--resume: {path} does not exist; start the run without --resume")
    p = t.parts
    state = read_checkpoint(path)  # on the CPU: the RNG states stay there
    saved_world = int(state.get("world_size", 1))
    if saved_world != p.world.size:
        launch = ("python -m p4bg.train" if saved_world == 1 else
                  f"torchrun --nproc_per_node={saved_world} -m p4bg.train")  # fmt: skip
        raise ConfigError(
            f"--resume {path.parent}: the run was trained by {saved_world} process(es), this "
            f"launch has {p.world.size}; resume on the same number: `{launch} --resume "
            f"{path.parent}` (the batches and random streams depend on it)"
        )
    if "ranks" in state:  # this rank's own random states
        state = {**state, **state["ranks"][p.world.rank]}
    changed = changed_keys(state["config"], p.config, RESUME_OVERRIDES | {"out"})
    if changed:
        raise ConfigError(
            f"--resume: config.toml differs from the checkpoint in {changed}; "
            "restore it or start a new run"
        )
    p.target.platform = state.get("energy_platform", p.target.platform)
    p.flow.load_state_dict(state["flow"])
    p.coordinates.load_state_dict(state["coordinates"])
    p.flat.load_state_dict(p.optimizer, state["optimizer"])
    p.merger.load_state_dict(state["merger"])
    set_global_rng_state(state["rng"])
    saved_on = state.get("streams_device", "cpu")
    if saved_on == p.device.type:
        p.streams["batches"].set_state(state["batches"])
        p.streams.load_state_dict(state.get("streams", {}))
    else:  # a CPU generator's state cannot seed a CUDA one: new streams, told in train.log
        p.streams.reseed(int(state["step"]))
        t.notes.append(f"resumed on {p.device.type} from a {saved_on} checkpoint: the random "
                       "streams restart from new seeds")  # fmt: skip
    t.step = int(state["step"])
    t.counters = dict(state["counters"])
    if "evaluations" in state:
        t.evaluations = {**t.evaluations, **state["evaluations"]}
        t.evaluations_from = int(state.get("evaluations_from", 0))
    else:  # a checkpoint from before the counts: they start here
        t.evaluations_from = t.step
        t.notes.append(f"the checkpoint predates counting energy evaluations: they are counted "
                       f"from step {t.step:,} on (checkpoint.pt) and metrics.csv leaves its "
                       "evaluations_* columns empty")  # fmt: skip
    if state.get("anneal_buffer") is not None:  # the draws the next steps resample from
        t.anneal_buffer = AnnealBuffer.from_state(state["anneal_buffer"], p.device)
    t.best = dict(state.get("best", t.best))
    best = path.with_name(BEST)
    if p.world.main and best.is_file() and int(read_checkpoint(best).get("step", 0)) > t.step:
        # saved after the last checkpoint, on a branch the resumed run need not repeat
        # (another device rounds differently): drop it; the next validation writes a new one
        best.unlink()
        t.best = {"val_nll": float("inf"), "step": 0}
    t.seconds = float(state["seconds"])


def init_from(parts: RunParts, run: Path) -> None:
    """Start from another run's trained model (weights, P4Inv buffers, coordinate fit) with
    a fresh optimizer and step 0: fine-tuning, e.g. annealing a model trained at 600 K."""
    path = run / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"init={run}: no checkpoint.pt there; give a trained run folder "
                          f"(the spline300 preset starts from the spline preset's: `python "
                          f"-m p4bg.train --preset spline --out {run}`)")  # fmt: skip
    state = read_checkpoint(path)
    saved, _ = config_from_values(state["config"], str(path))
    now = parts.config
    different = {k: (getattr(saved, k), getattr(now, k)) for k in MODEL_KEYS
                 if getattr(saved, k) != getattr(now, k)}  # fmt: skip
    if saved.block_volume != now.block_volume:
        different["block_volume"] = (saved.block_volume, now.block_volume)
    if different:
        raise ConfigError(f"init={run}: its model differs in {different} (saved, now); "
                          "set those keys as the run had them")  # fmt: skip
    parts.flow.load_state_dict(state["flow"])
    parts.coordinates.load_state_dict(state["coordinates"])
    parts.target.platform = state.get("energy_platform", parts.target.platform)
