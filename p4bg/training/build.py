"""``build_run``: everything a training run needs, made once from its configuration.

The loop (:mod:`p4bg.training.loop`) receives these parts and builds nothing itself: the
system and the data (split, the coordinate fit, validation frames), the flow and its generator,
the optimizer, the P4Inv merge schedule, the random streams, the loss module (wrapped by DDP
under torchrun) and the target energy, which starts its worker processes or its device tables
on first use only (a run that never reaches an energy term never starts them).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from analysis.geometry import dihedral
from p4bg import distributed
from p4bg.config import ConfigError, TrainConfig
from p4bg.coordinates import MixedCoordinateTransform
from p4bg.data import load_dataset, load_metadata, training_frames
from p4bg.distributed import SINGLE, World, pick_device
from p4bg.energy import EnergyStats, make_energy
from p4bg.flows import flow_from_config
from p4bg.generator import BoltzmannGenerator
from p4bg.nn import P4Inv, P4Merger
from p4bg.optim import FlatParameters
from p4bg.systems import MolecularSystem, load_system
from p4bg.training.objective import Objective
from p4bg.training.streams import Streams
from p4bg.training.validation import ValidationSet
from p4bg.units import Temperatures

__all__ = ["COMPILE_OPTIONS", "DeferredEnergy", "RunParts", "build_run", "make_optimizer"]

# Options of the compiled flow passes. Inductor's vectorised tanh on the CPU costs about 4x an
# exp (23 against 5 µs for a [256, 60] batch); written as 2 / (1 + exp(-2x)) - 1 it is an exp
# (absolute error ~1e-7: nothing for the conditioners' activations), 7 % of the paper model's
# compiled mixed step. TorchEnergy, whose accuracy is tested against OpenMM, keeps the default.
COMPILE_OPTIONS = {"cpp.use_decompose_tanh": True}


class CountedFunction:
    """A plain function ``u(x)`` [batch] kT given as the target (tests) with the counters of a
    :class:`p4bg.energy.Energy` (``stats``), which the trainer reads for the evaluations it
    spends and the failures (+inf) it meets."""

    platform = "function"

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn
        self.evaluations = 0
        self._failures: torch.Tensor | int = 0  # on the device: a call never waits for it

    @property
    def stats(self) -> EnergyStats:
        return EnergyStats(evaluations=self.evaluations, failures=int(self._failures))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        u = self.fn(x)
        self.evaluations += len(x)
        self._failures = self._failures + (~torch.isfinite(u)).sum()
        return u

    def close(self) -> None:
        close = getattr(self.fn, "close", None)
        if close is not None:
            close()


class DeferredEnergy:
    """The target energy, made on first use by ``make(platform)``: ``u(x)`` [batch] kT of x
    [batch, 66] nm. ``platform`` is the OpenMM platform to use ("auto": measure), and after the
    start the one in use: a checkpoint keeps it, so that a resumed run evaluates energies as the
    original did. ``on_start`` hears of the energy once it exists (the log names it)."""

    def __init__(self, make: Callable[[str], Any], platform: str = "auto") -> None:
        self._make = make
        self.platform = platform
        self.energy: Any = None
        self.on_start: Callable[[Any], None] | None = None

    def get(self) -> Any:
        """The energy, started now if it was not yet."""
        if self.energy is None:
            self.energy = self._make(self.platform)
            self.platform = getattr(self.energy, "platform", self.platform)
            if self.on_start is not None:
                self.on_start(self.energy)
        return self.energy

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.get()(x)

    def close(self) -> None:
        if self.energy is not None:
            self.energy.close()


def check_temperature(config: TrainConfig) -> None:
    """The data's temperature (metadata.json) must be the training temperature: a flow fitted to
    300 K frames trained against 600 K energies would be a silent mix of two distributions."""
    meta = load_metadata(config.data)
    data_t = meta.get("temperature_K")
    if data_t is None:
        raise ConfigError(f"data={config.data}: metadata.json records no temperature_K; "
                          "regenerate the dataset with p4bg.simulate")  # fmt: skip
    if abs(float(data_t) - config.temperature) > 1e-6:
        raise ConfigError(
            f"data={config.data} was simulated at {float(data_t):g} K but temperature="
            f"{config.temperature:g} K; the target energy must be at the data's temperature: "
            f"start a run with --temperature={float(data_t):g} or use a dataset made at "
            f"{config.temperature:g} K (a resumed run keeps its own temperature)"
        )


def make_optimizer(
    flow: torch.nn.Module, config: TrainConfig
) -> tuple[torch.optim.Optimizer, FlatParameters]:
    """Adam (the paper); with ``weight_decay`` AdamW, decaying only the conditioners' weight
    matrices: biases, coupling scales and P4Inv's u, v, b are left alone (decaying v would
    shrink the rank-one update that P4Inv trains through).

    The conditioners' parameters reach the optimizer as flat buffers (:mod:`p4bg.optim`; the
    returned :class:`FlatParameters` zeroes the gradients and converts the state for
    checkpoints); P4Inv's stay separate, so that a merge resets their Adam state alone."""
    p4 = [p for m in flow.modules() if isinstance(m, P4Inv) for p in m.parameters()]
    if config.weight_decay == 0:
        groups = [{"params": list(flow.parameters())}]
    else:
        ids = {id(p) for p in p4}
        decay = [p for p in flow.parameters() if p.ndim == 2 and id(p) not in ids]
        rest = [p for p in flow.parameters() if p.ndim != 2 or id(p) in ids]
        groups = [{"params": decay, "weight_decay": config.weight_decay},
                  {"params": rest, "weight_decay": 0.0}]  # fmt: skip
    flat = FlatParameters(groups, keep_separate=p4)
    # fused: one multi-tensor kernel instead of ~10 small kernels per parameter tensor (the
    # for-loop Adam took a third of the NLL step of the paper model on the CPU)
    kind = torch.optim.Adam if config.weight_decay == 0 else torch.optim.AdamW
    return kind(flat.groups, lr=config.nll_lr, fused=True), flat


@dataclass
class RunParts:
    """What :func:`build_run` hands the loop. ``train_x`` [frames, 66] nm on the device."""

    config: TrainConfig
    temperatures: Temperatures
    world: World
    device: torch.device
    system: MolecularSystem
    coordinates: MixedCoordinateTransform
    flow: torch.nn.Module
    bg: BoltzmannGenerator
    target: DeferredEnergy
    optimizer: torch.optim.Optimizer
    flat: FlatParameters
    merger: P4Merger
    streams: Streams
    objective: Objective
    model: torch.nn.Module  # the objective, or its DDP wrapper
    train_x: torch.Tensor
    val: ValidationSet


def _frames(config: TrainConfig, system: MolecularSystem) -> tuple[np.ndarray, np.ndarray, Any]:
    """(training frame indices, validation frame indices, the dataset)."""
    data = load_dataset(config.data)
    if data.xyz.shape[1] != system.dim:
        raise ConfigError(f"data={config.data}: frames have {data.xyz.shape[1]} coordinates, "
                          f"system {config.system} needs {system.dim}")  # fmt: skip
    train_idx = training_frames(data.split["train"], config.train_fraction, config.train_stride)
    val_idx = data.split["val"]
    if config.val_frames and len(val_idx) > config.val_frames:
        val_idx = val_idx[np.linspace(0, len(val_idx) - 1, config.val_frames).astype(np.int64)]
    if len(train_idx) < 10 or len(val_idx) < 1:
        raise ConfigError(
            f"data={config.data}: {len(train_idx)} training and {len(val_idx)} validation "
            "frames; simulate more or raise train_fraction"
        )
    return train_idx, val_idx, data


def build_run(config: TrainConfig, world: World = SINGLE, device: str | None = None,
              energy: Any = None) -> RunParts:  # fmt: skip
    """The parts of a run of ``config`` on this process of ``world`` (``device``: this
    process's, default ``config.device``). ``energy``: a target to use instead of the one the
    configuration names (tests: a failing or synthetic energy), u(x) [batch] kT."""
    temperatures = config.temperatures()
    dev = pick_device(device or config.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    system = load_system(config.system, config.temperature)
    check_temperature(config)
    train_idx, val_idx, data = _frames(config, system)
    train = data.xyz[train_idx]
    dtype = getattr(torch, config.dtype)
    # The transform's normalisation is fitted on at most 200,000 frames (evenly strided):
    # more changes its statistics by nothing visible and costs minutes of Procrustes fits.
    fit = train[:: math.ceil(len(train) / 200_000)]
    coordinates = MixedCoordinateTransform(system, fit, block_volume=config.block_volume)
    coordinates = coordinates.to(dev, dtype)
    train_x = torch.from_numpy(train).to(dev, dtype)  # moved to the device once
    # the data's energies at the target's temperature: a Boltzmann sample of the target only
    # when the two temperatures agree (else validation reports no forward log Z)
    val_phi = dihedral(data.xyz[val_idx].reshape(len(val_idx), -1, 3).astype(np.float64),
                       system.phi_atoms)  # fmt: skip
    val = ValidationSet(torch.from_numpy(data.xyz[val_idx]).to(dev, dtype),
                        torch.from_numpy(data.energies[val_idx] / temperatures.kT).double(),
                        torch.from_numpy(val_phi > 0))  # fmt: skip
    flow = flow_from_config(config, coordinates.dim).to(dev, dtype)

    def make(platform: str) -> Any:
        if energy is not None:
            return energy if hasattr(energy, "stats") else CountedFunction(energy)
        return make_energy(
            config.energy, system,
            # OpenMM workers: n_workers per node, shared by its processes
            n_workers=distributed.share(config.n_workers, world), platform=platform,
            device=dev, compile=config.compile,  # compiled with the step's flow passes
            temperature=temperatures.target,
        )  # fmt: skip

    target = DeferredEnergy(make)
    bg = BoltzmannGenerator(flow, coordinates, target)
    optimizer, flat = make_optimizer(flow, config)
    # the training step's passes through flow and transform, compiled on request (TorchEnergy
    # too, in make_energy; validation stays eager: not worth minutes of compilation)
    nll, nll_and_generate = bg.nll, bg.nll_and_generate
    if config.compile:  # the mixed step's two passes: one graph, one backward
        nll = torch.compile(nll, options=COMPILE_OPTIONS)
        nll_and_generate = torch.compile(nll_and_generate, options=COMPILE_OPTIONS)
    streams = Streams(config.seed, world.rank, dev)
    merger = P4Merger(flow, optimizer, every=config.merge_every,
                      force_every=config.force_every, correct_every=config.correct_every,
                      reset_optimizer=config.reset_optimizer, generator=streams["merges"],
                      broadcast=distributed.broadcaster(world))  # fmt: skip
    objective = Objective(bg, config, nll, nll_and_generate, world)
    model = distributed.ddp(objective, dev) if world.distributed else objective
    return RunParts(
        config,
        temperatures,
        world,
        dev,
        system,
        coordinates,
        flow,
        bg,
        target,
        optimizer,
        flat,
        merger,
        streams,
        objective,
        model,
        train_x,
        val,
    )
