"""``python -m p4bg.train``: train a Boltzmann generator by likelihood, then likelihood + energy.

    python -m p4bg.train --preset paper --flow p4inv --out runs/p4inv
    python -m p4bg.train --preset quick --flow swap --out runs/quick_swap --batch_size=128
    python -m p4bg.train --resume runs/p4inv          # continue a killed run exactly
    python -m p4bg.train --preset paper --dry-run     # model, parameter counts and plan
    torchrun --standalone --nproc_per_node=2 -m p4bg.train --preset smoke --out runs/ddp

Phases (paper App. H): ``nll_steps`` of maximum likelihood on training frames at ``nll_lr``,
then ``mixed_steps`` of ``w_l·NLL + w_e·KL`` at ``mixed_lr`` with ``w_e/w_l =
energy_weight_ratio``, then ``anneal_steps`` of temperature annealing from the data's
temperature to ``target_temperature`` at ``anneal_lr`` (reweighted maximum likelihood on the
model's own samples, :meth:`Trainer.anneal_batch`); P4Inv merges every ``merge_every``
steps. Any configuration key can be given as ``--key=value`` (or ``--key value``);
``--config FILE`` reads a TOML file.
Output in ``--out``: config.toml, checkpoint.pt (atomic), metrics.csv, train.log.

Under torchrun each process trains with DistributedDataParallel on its part of every global
batch (``batch_size`` is per process); rank 0 validates and writes (:mod:`p4bg.distributed`).
The module reads top to bottom: the command line (:class:`TrainCommand`), the optimizer and
schedules, :class:`Objective` (one step's loss), :class:`Trainer` (state, one step, and the
loop, :meth:`Trainer.run`), :func:`main`. What a run writes is :mod:`p4bg.reporters`'.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.geometry import dihedral
from analysis.metrics import (
    CLIP_FRACTION,
    log_z_forward,
    log_z_reverse,
    reverse_ess,
    reverse_ess_clipped,
)
from p4bg import distributed
from p4bg.cli import Parser, option
from p4bg.cli import build_parser as build_cli_parser
from p4bg.config import PRESETS, ConfigError, TrainConfig, apply_overrides, load_toml, to_toml
from p4bg.coordinates import MixedCoordinateTransform
from p4bg.data import DatasetError, load_dataset, load_metadata, training_frames
from p4bg.distributed import SINGLE, World, all_sum, pick_device
from p4bg.energy import TorchEnergy, UnsupportedForceError, make_energy
from p4bg.flows import count_parameters, flow_from_config
from p4bg.generator import BoltzmannGenerator
from p4bg.nn import P4Inv, P4Merger, p4inv_penalty
from p4bg.optim import FlatParameters
from p4bg.reporters import RunReporter, save_checkpoint
from p4bg.systems import MOLAR_GAS_CONSTANT, SystemConfigError, load_system

__all__ = ["Trainer", "main", "parse_args"]

# Random streams of their own (seed offsets), so that e.g. validation settings never change the
# training trajectory: minibatches, prior draws of the KL term, validation samples, P4Inv resets.
# Across processes the first two are shared (every rank draws the global batch and takes its
# part); the merge stream is each rank's own (rank 0's draws are broadcast: P4Merger).
_STREAMS = {"batches": 1, "kl": 2, "validation": 3, "merges": 4}
_RANK_STREAMS = {"merges"}
# Settings that do not change the computation and may differ when a run is resumed.
_RESUME_OVERRIDES = {"device", "n_workers", "energy", "compile"}


@dataclass
class TrainCommand:
    """The switches of ``python -m p4bg.train``; the configuration keys (:class:`TrainConfig`)
    follow as ``--key=value`` (or ``--key value``; dashes or underscores)."""

    preset: str = option("paper", "the configuration to start from", choices=tuple(PRESETS))
    config: str | None = option(None, "TOML file of configuration keys, over the preset")
    resume: str | None = option(None, "continue the run in this folder exactly (with its "
                                "config.toml)", metavar="RUN")  # fmt: skip
    dry_run: bool = option(False, "print the model, its parameter counts and the plan; train "
                           "nothing")  # fmt: skip
    no_progress: bool = option(False, "no progress bar")


def build_parser() -> Parser:
    """The command's parser: :class:`TrainCommand`'s switches, then every configuration key
    with the ``paper`` preset's value (kept as text: :func:`apply_overrides` converts it and
    names the key if it cannot)."""
    parser = build_cli_parser(TrainCommand, "python -m p4bg.train", __doc__ or "")
    parser.usage = ("python -m p4bg.train [--preset NAME] [--config FILE] [--resume RUN] "
                    "[--dry-run] [--no-progress] [--KEY=VALUE ...]")  # fmt: skip
    keys = parser.add_argument_group("configuration keys (the paper preset's values)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        names = dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"])
        keys.add_argument(*names, dest=f"key:{f.name}", default=argparse.SUPPRESS,
                          metavar=f.type.upper() if isinstance(f.type, str) else "VALUE",
                          help=f"{getattr(defaults, f.name)!r}")  # fmt: skip
    return parser


def _joined_values(argv: list[str]) -> list[str]:
    """``--key -1e3`` as ``--key=-1e3``: argparse takes a value starting with a dash for an
    option unless it looks like a plain negative integer or decimal."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg.startswith("-"):
            try:
                float(arg)
            except ValueError:
                pass
            else:
                out[-1] = f"{out[-1]}={arg}"
                continue
        out.append(arg)
    return out


def parse_args(argv: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The command line as (the switches of :class:`TrainCommand`, ``{key: text}`` of the
    configuration keys given)."""
    parser = build_parser()
    namespace, rest = parser.parse_known_args(_joined_values(list(argv)))
    if rest:
        unknown = rest[0]
        if unknown.startswith("--"):
            key = unknown[2:].partition("=")[0].replace("-", "_")
            raise ConfigError(f"unknown key '{key}'; valid keys: "
                              f"{', '.join(f.name for f in fields(TrainConfig))}")  # fmt: skip
        raise ConfigError(f"unexpected argument {unknown!r}; options look like --key=value")
    values = vars(namespace)
    overrides = {k[4:]: v for k, v in values.items() if k.startswith("key:")}
    flags = {k: v for k, v in values.items() if not k.startswith("key:")}
    return flags, overrides


def resolve_config(flags: dict[str, Any], overrides: dict[str, str]) -> TrainConfig:
    if flags["resume"]:
        run = Path(flags["resume"])
        if not (run / "config.toml").is_file():
            raise ConfigError(
                f"--resume {run}: no run there (no config.toml); start it without --resume"
            )
        extra = sorted(set(overrides) - _RESUME_OVERRIDES)
        if extra or flags["config"]:
            raise ConfigError(
                "--resume continues a run with its saved config.toml; only "
                f"{', '.join(sorted(_RESUME_OVERRIDES))} may be changed (got {extra or '--config'})"
            )
        saved = load_toml(run / "config.toml")
        # runs from before the `energy` key trained against the OpenMM workers
        saved.setdefault("energy", "openmm")
        config = apply_overrides(TrainConfig(), saved, str(run / "config.toml"))
        config = apply_overrides(config, {**overrides, "out": str(run)}, "--resume")
    else:
        config = apply_overrides(
            TrainConfig(), PRESETS[flags["preset"]], f"preset {flags['preset']}"
        )
        if flags["config"]:
            config = apply_overrides(config, load_toml(flags["config"]), str(flags["config"]))
        config = apply_overrides(config, overrides, "command line")
        # the run records the target's temperature itself, not "the data's"
        config.target_temperature = config.target_of()
    config.validate()
    return config


def _rng_state(device: torch.device) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


# Options of the compiled flow passes. Inductor's vectorised tanh on the CPU costs about 4x an
# exp (23 against 5 µs for a [256, 60] batch); written as 2 / (1 + exp(-2x)) - 1 it is an exp
# (absolute error ~1e-7: nothing for the conditioners' activations), 7 % of the paper model's
# compiled mixed step. TorchEnergy, whose accuracy is tested against OpenMM, keeps the default.
COMPILE_OPTIONS = {"cpp.use_decompose_tanh": True}


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


def learning_rate(config: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): per phase constant or cosine-decayed
    to ``lr × lr_final_factor``; a linear warm-up over the first ``warmup_steps``."""
    if step < config.nll_steps:
        base, start, length = config.nll_lr, 0, config.nll_steps
    elif step < config.nll_steps + config.mixed_steps:
        base, start, length = config.mixed_lr, config.nll_steps, config.mixed_steps
    else:
        base, start = config.anneal_lr, config.nll_steps + config.mixed_steps
        length = config.anneal_steps
    lr = base
    if config.lr_schedule == "cosine" and length > 1:
        t = (step - start) / (length - 1)
        f = config.lr_final_factor
        lr = base * (f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * t)))
    if step < min(config.warmup_steps, config.nll_steps):
        lr *= (step + 1) / config.warmup_steps
    return lr


def energy_weight(config: TrainConfig, step: int) -> float:
    """w_e of the mixed loss ``(1 − w_e)·NLL + w_e·KL`` at ``step``: ``r / (1 + r)`` for
    ``r = energy_weight_ratio``, reached linearly over ``energy_ramp_steps`` mixed steps."""
    if not config.nll_steps <= step < config.nll_steps + config.mixed_steps:
        return 0.0
    w_e = config.energy_weight_ratio / (1.0 + config.energy_weight_ratio)
    if config.energy_ramp_steps > 0:
        w_e *= min(1.0, (step - config.nll_steps + 1) / config.energy_ramp_steps)
    return w_e


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's polite kill) ask the loop to stop at the end
    of the step, after a checkpoint; a second signal stops at once (``escalate``). Handlers
    are installed only in the main thread and restored on exit."""

    HANDLED = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, escalate: bool = True) -> None:
        self.requested = False
        self.escalate = escalate
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and self.escalate:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.HANDLED:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------- objective
class Objective(torch.nn.Module):
    """The loss of one training step as one module call, so that DistributedDataParallel's
    hooks see all of it: the NLL of data frames through the inverse and, given prior draws
    ``z``, the energy term through the forward.

    ``forward(x, z=None, w_e=0)``: x [batch, 66] nm; z [kl_batch, 60]. Returns (loss, nll, kl,
    u of the samples or None): ``(1 − w_e)·NLL + w_e·KL`` (+ the P4Inv penalty), means over this
    process's batch; across processes DDP averages the gradients, i.e. those of the means over
    the global batch. ``nll``, ``nll_and_generate``: the generator's passes, compiled or not."""

    def __init__(self, bg: Any, config: TrainConfig, nll: Any, nll_and_generate: Any,
                 world: World = SINGLE) -> None:  # fmt: skip
        super().__init__()
        self.bg, self.world = bg, world
        self.nll, self.nll_and_generate = nll, nll_and_generate
        self.high, self.max_energy = config.energy_high, config.energy_max
        self.penalty = config.penalty

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None,
                w_e: float = 0.0) -> tuple[Any, ...]:  # fmt: skip
        if z is None:
            nll = self.nll(x)
            kl, u, loss = torch.zeros((), device=x.device), None, nll
        else:
            nll, samples, log_q = self.nll_and_generate(x, z)
            # the mean over the global batch's successful evaluations, whatever rank they fell
            # on: this rank's sum over their global count, times the number of processes,
            # whose gradients DDP averages (one process: the masked mean of reverse_kl_of)
            total, count, u = self.bg.reverse_kl_parts(samples, log_q, self.high,
                                                       self.max_energy)  # fmt: skip
            kl = total * self.world.size / all_sum(count, self.world)
            loss = (1.0 - w_e) * nll + w_e * kl
        if self.penalty > 0:
            loss = loss + self.penalty * p4inv_penalty(self.bg.flow)
        return loss, nll, kl, u


# --------------------------------------------------------------------------------- trainer
class Trainer:
    """Owns the model, optimizer, merge schedule, data and reporters of one run."""

    def __init__(
        self,
        config: TrainConfig,
        resume: bool = False,
        progress: bool = True,
        world: World = SINGLE,
        device: str | None = None,
    ) -> None:
        """``world``: the processes of a torchrun launch (:func:`p4bg.distributed.setup`);
        ``config.batch_size`` is then each process's batch, the global batch ``batch_size ×
        world.size``. ``device``: this process's device (default ``config.device``)."""
        self.config = config
        self.world = world
        self.progress = progress and world.main
        self.out = Path(config.out)
        self.device = pick_device(device or config.device)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        random.seed(config.seed)
        self.system = load_system(config.system, config.temperature)
        check_temperature(config)
        data = load_dataset(config.data)
        if data.xyz.shape[1] != self.system.dim:
            raise ConfigError(f"data={config.data}: frames have {data.xyz.shape[1]} coordinates, "
                              f"system {config.system} needs {self.system.dim}")  # fmt: skip
        train_idx = training_frames(data.split["train"], config.train_fraction, config.train_stride)
        val_idx = data.split["val"]
        if config.val_frames and len(val_idx) > config.val_frames:
            val_idx = val_idx[np.linspace(0, len(val_idx) - 1, config.val_frames).astype(np.int64)]
        if len(train_idx) < 10 or len(val_idx) < 1:
            raise ConfigError(
                f"data={config.data}: {len(train_idx)} training and {len(val_idx)} validation "
                "frames; simulate more or raise train_fraction"
            )
        train = data.xyz[train_idx]
        self.n_train, self.n_val = len(train), len(val_idx)
        dtype = getattr(torch, config.dtype)
        # The transform's normalisation is fitted on at most 200,000 frames (evenly strided):
        # more changes its statistics by nothing visible and costs minutes of Procrustes fits.
        fit = train[:: math.ceil(len(train) / 200_000)]
        self.coordinates = MixedCoordinateTransform(self.system, fit).to(self.device, dtype)
        self.train_x = torch.from_numpy(train).to(self.device, dtype)  # moved to the device once
        self.val_x = torch.from_numpy(data.xyz[val_idx]).to(self.device, dtype)
        # the data's energies at the target's temperature: a Boltzmann sample of the target
        # only when the two temperatures agree (else the forward log Z is not reported)
        kT = MOLAR_GAS_CONSTANT * config.target_of()
        self.val_u = torch.from_numpy(data.energies[val_idx] / kT).double()
        val_phi = dihedral(data.xyz[val_idx].reshape(len(val_idx), -1, 3).astype(np.float64),
                           self.system.phi_atoms)  # fmt: skip
        self.val_phi_pos = torch.from_numpy(val_phi > 0)
        flow = flow_from_config(config, self.coordinates.dim)
        self.flow = flow.to(self.device, dtype)
        self.target = None
        self.bg = BoltzmannGenerator(self.flow, self.coordinates, None)
        self.optimizer, self.flat = make_optimizer(self.flow, config)
        # the training step's passes through flow and transform, compiled on request (with
        # TorchEnergy, see energy(); validation stays eager: not worth minutes of compilation)
        nll, nll_and_generate = self.bg.nll, self.bg.nll_and_generate
        if config.compile:  # the mixed step's two passes: one graph, one backward
            nll = torch.compile(nll, options=COMPILE_OPTIONS)
            nll_and_generate = torch.compile(nll_and_generate, options=COMPILE_OPTIONS)
        # the random streams live on the training device: indices and prior draws are made
        # where they are used, with no host round trip (on the CPU, as before)
        self.streams = {name: torch.Generator(device=self.device).manual_seed(self._seed(name))
                        for name in _STREAMS}  # fmt: skip
        self.batches = self.streams["batches"]
        self.merger = P4Merger(self.flow, self.optimizer, every=config.merge_every,
                               force_every=config.force_every, correct_every=config.correct_every,
                               reset_optimizer=config.reset_optimizer,
                               generator=self.streams["merges"], world=world)  # fmt: skip
        self.step = 0
        self.counters = {"skipped_steps": 0, "energy_failures": 0}
        # the same counts for the steps since the last report, kept on the device so that a
        # training step never waits for it (added to `counters` at logging and checkpoints)
        self._pending = {name: torch.zeros((), dtype=torch.int64, device=self.device)
                         for name in self.counters}  # fmt: skip
        self.best = {"val_nll": float("inf"), "step": 0}
        self.seconds = 0.0
        self.stop_requested = False  # set (by a signal or a caller) to stop after this step
        self.notes: list[str] = []  # said in train.log when the run starts
        self.reporter: RunReporter | None = None  # train.log, metrics.csv: opened by run()
        # The OpenMM platform is measured once and then kept, so that a resumed run evaluates
        # energies exactly as the original did.
        self.energy_platform = "auto"
        if config.energy == "torch":
            self._energy_plan()  # a System TorchEnergy cannot evaluate fails now, not later
        if resume:
            self._load(self.out / "checkpoint.pt")
        elif config.init:
            self._init_from(Path(config.init))
        self.objective = Objective(self.bg, config, nll, nll_and_generate, world)
        self.model: torch.nn.Module = self.objective
        if world.distributed:
            self.model = distributed.ddp(self.objective, self.device)

    def _seed(self, stream: str) -> int:
        """The seed of a random stream: the run's seed plus the stream's offset, and for the
        streams each process keeps to itself a rank's own offset."""
        rank = self.world.rank if stream in _RANK_STREAMS else 0
        return self.config.seed + _STREAMS[stream] + 7_919 * rank

    # ------------------------------------------------------------------- state
    def state(self) -> dict:
        return {
            "config": asdict(self.config),
            "step": self.step,
            "flow": self.flow.state_dict(),
            "coordinates": self.coordinates.state_dict(),
            "optimizer": self.flat.state_dict(self.optimizer),
            "merger": self.merger.state_dict(),
            "rng": _rng_state(self.device),
            "world_size": self.world.size,
            "streams_device": self.device.type,
            "batches": self.batches.get_state(),
            "streams": {name: g.get_state() for name, g in self.streams.items()},
            "counters": dict(self.counters),
            "best": dict(self.best),
            "temperature_K": self.config.temperature,
            "target_temperature_K": self.config.target_of(),
            "seconds": self.seconds,
            "energy_platform": self.energy_platform,
        }

    def _rank_states(self) -> list[dict]:
        """Every rank's random states (a collective across processes; rank order)."""
        own = {"rng": _rng_state(self.device),
               "streams": {name: g.get_state() for name, g in self.streams.items()}}  # fmt: skip
        return distributed.gather_objects(own, self.world)

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise ConfigError(f"--resume: {path} does not exist; start the run without --resume")
        state = torch.load(path, map_location="cpu", weights_only=False)  # RNG states stay on CPU
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world.size:
            launch = ("python -m p4bg.train" if saved_world == 1 else
                      f"torchrun --nproc_per_node={saved_world} -m p4bg.train")  # fmt: skip
            raise ConfigError(
                f"--resume {path.parent}: the run was trained by {saved_world} process(es), this "
                f"launch has {self.world.size}; resume on the same number: `{launch} --resume "
                f"{path.parent}` (the batches and random streams depend on it)"
            )
        if "ranks" in state:  # this rank's own random states
            state = {**state, **state["ranks"][self.world.rank]}
        saved, now, default = dict(state["config"]), asdict(self.config), asdict(TrainConfig())
        # a key added to TrainConfig after the checkpoint was written counts as its default
        changed = [
            k
            for k in now
            if k not in _RESUME_OVERRIDES | {"out"} and saved.get(k, default[k]) != now[k]
        ]
        if changed:
            raise ConfigError(
                f"--resume: config.toml differs from the checkpoint in {changed}; "
                "restore it or start a new run"
            )
        self.energy_platform = state.get("energy_platform", self.energy_platform)
        self.flow.load_state_dict(state["flow"])
        self.coordinates.load_state_dict(state["coordinates"])
        self.flat.load_state_dict(self.optimizer, state["optimizer"])
        self.merger.load_state_dict(state["merger"])
        _set_rng_state(state["rng"])
        saved_on = state.get("streams_device", "cpu")
        if saved_on == self.device.type:
            self.batches.set_state(state["batches"])
            for name, g_state in state.get("streams", {}).items():
                self.streams[name].set_state(g_state)
        else:  # a CPU generator's state cannot seed a CUDA one: new streams, told in train.log
            for name, offset in _STREAMS.items():
                seed = self.config.seed + offset + 1_000_003 * int(state["step"])
                self.streams[name].manual_seed(seed)
            self.notes.append(f"resumed on {self.device.type} from a {saved_on} checkpoint: the "
                              "random streams restart from new seeds")  # fmt: skip
        self.step = int(state["step"])
        self.counters = dict(state["counters"])
        self.best = dict(state.get("best", self.best))
        best = path.with_name("best.pt")
        if (
            self.world.main
            and best.is_file()
            and int(torch.load(best, map_location="cpu", weights_only=False)["step"]) > self.step
        ):
            # saved after the last checkpoint, on a branch the resumed run need not repeat
            # (another device rounds differently): drop it; the next validation writes a new one
            best.unlink()
            self.best = {"val_nll": float("inf"), "step": 0}
        self.seconds = float(state["seconds"])

    def _init_from(self, run: Path) -> None:
        """Start from another run's trained model (weights, P4Inv buffers, coordinate fit) with
        a fresh optimizer and step 0: fine-tuning, e.g. more energy training after the paper."""
        path = run / "checkpoint.pt"
        if not path.is_file():
            raise ConfigError(f"init={run}: no checkpoint.pt there; give a trained run folder "
                              f"(the spline300 preset starts from the spline preset's: `python "
                              f"-m p4bg.train --preset spline --out {run}`)")  # fmt: skip
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = state["config"]
        keys = ("system", "flow", "coupling", "n_blocks", "hidden", "spline_bins",
                "spline_tail_bound")  # fmt: skip
        default = TrainConfig()  # keys a run older than them did not save: their defaults
        saved = {k: saved.get(k, getattr(default, k)) for k in keys}
        different = {k: (saved[k], getattr(self.config, k)) for k in keys
                     if saved[k] != getattr(self.config, k)}  # fmt: skip
        if different:
            raise ConfigError(f"init={run}: its model differs in {different} (saved, now); "
                              "set those keys as the run had them")  # fmt: skip
        self.flow.load_state_dict(state["flow"])
        self.coordinates.load_state_dict(state["coordinates"])
        self.energy_platform = state.get("energy_platform", self.energy_platform)

    def save(self) -> None:
        """checkpoint.pt, with every rank's random states (a collective across processes:
        every rank calls it; rank 0 writes)."""
        self.flush_counters()
        ranks = self._rank_states() if self.world.distributed else None
        if self.world.main:
            state = self.state()
            if ranks is not None:
                state["ranks"] = ranks
            save_checkpoint(self.out / "checkpoint.pt", state)

    def save_best(self) -> None:
        """best.pt: the model at the lowest validation NLL (rank 0 alone; not for resuming)."""
        save_checkpoint(self.out / "best.pt", self.state())

    def flush_counters(self) -> dict[str, int]:
        """Add the device-side counts of the steps since the last call to :attr:`counters`
        (one synchronisation; summed over ranks) and return the totals."""
        pending = all_sum(torch.stack(list(self._pending.values())), self.world).tolist()
        for (name, t), value in zip(self._pending.items(), pending, strict=True):
            self.counters[name] += int(value)
            t.zero_()
        return dict(self.counters)

    # -------------------------------------------------------------------- steps
    def energy(self) -> Any:
        """The target energy (``config.energy``), created on first use (OpenMM: worker
        processes started; torch: on the training device)."""
        if self.target is None:
            cfg = self.config
            self.target = make_energy(
                cfg.energy,
                self.system,
                # OpenMM workers: n_workers per node, shared by its processes
                n_workers=distributed.share(cfg.n_workers, self.world),
                platform=self.energy_platform,
                device=self.device,
                compile=cfg.compile,  # the energy of the step is compiled with its flow passes
                temperature=cfg.target_of(),
            )
            self.energy_platform = self.target.platform
            self.bg.target = self.target
            if self.reporter is not None:
                self.reporter.info("target energy: %r", self.target)
        return self.target

    def phase(self, step: int) -> str:
        cfg = self.config
        if step < cfg.nll_steps:
            return "nll"
        return "mixed" if step < cfg.nll_steps + cfg.mixed_steps else "anneal"

    @torch.no_grad()
    def anneal_batch(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch for the annealing phase: ``anneal_samples`` fresh samples of the
        model (τ = 1), importance-weighted to the Boltzmann density at ``temperature`` (K),
        ``log w = −u_T(x) − log q(x)``, resampled with replacement to ``batch_size`` frames.
        The NLL of the batch is then a self-normalised estimate of the forward KL from that
        density, with its gradient (TA-BG). Returns (x [batch, 66] nm, the weights' ESS as a
        fraction, a 0-dim tensor); failed energies get weight 0, and a batch whose weights
        are all 0 or not finite comes out non-finite, so the step is skipped and counted."""
        cfg, world = self.config, self.world
        # across processes: each rank generates its part of the global draws, the parts are
        # gathered, and every rank resamples the global batch alike and trains on its part
        n = cfg.anneal_samples * world.size
        z = self._prior(n, "kl")[world.shard(n)]
        x, log_q = self.bg.generate(z)
        u = self.energy()(x).double() * (cfg.target_of() / temperature)
        self._pending["energy_failures"] += (~torch.isfinite(u)).sum()
        log_w = torch.nan_to_num(-u - log_q.double(), nan=-math.inf, posinf=-math.inf)
        x = distributed.all_gather_rows(x, world)
        log_w = distributed.all_gather_rows(log_w, world)
        w = torch.softmax(log_w, 0)
        ess = 1.0 / (w.square().sum() * len(w))
        ok = torch.isfinite(w).all() & (w.sum() > 0)
        w = torch.where(ok, w, torch.ones_like(w))  # multinomial needs valid weights
        n = cfg.batch_size * world.size
        idx = torch.multinomial(w, n, replacement=True, generator=self.streams["kl"])
        batch = x[idx[world.shard(n)]]
        return torch.where(ok, batch, math.nan), ess

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its losses, as 0-dim tensors on the device (non-finite
        steps are skipped and counted, on the device; :func:`host_row` converts)."""
        cfg = self.config
        phase = self.phase(self.step)
        lr = learning_rate(cfg, self.step)
        w_e = energy_weight(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if cfg.mixed_fresh_optimizer and self.step == cfg.nll_steps > 0 and phase == "mixed":
            self.optimizer.state.clear()  # Adam starts its moments afresh at the next step
        if phase == "anneal" and self.step == cfg.nll_steps + cfg.mixed_steps:
            # the self-sampled batches' gradients are not the data's: fresh moments
            self.optimizer.state.clear()
        # every rank draws the global batch from the shared stream and takes its part
        world, n = self.world, cfg.batch_size * self.world.size
        idx = torch.randint(self.n_train, (n,), generator=self.batches, device=self.device)
        idx = idx[world.shard(n)]
        self.flat.zero_grad()
        extra: dict[str, Any] = {}
        if phase == "anneal":
            temperature = cfg.anneal_temperature(self.step)
            x, ess = self.anneal_batch(temperature)
            loss, nll, kl, _ = self.model(x)
            extra = {"anneal_temperature": temperature, "anneal_ess": ess}
        elif phase == "mixed":
            n_kl = (cfg.kl_batch_size or cfg.batch_size) * world.size
            z = self._prior(n_kl, "kl")[world.shard(n_kl)]
            self.energy()
            loss, nll, kl, u = self.model(self.train_x[idx], z, w_e)
            self._pending["energy_failures"] += (~torch.isfinite(u)).sum()
        else:
            loss, nll, kl, _ = self.model(self.train_x[idx])
        # No host synchronisation in the step: a non-finite loss or gradient is found on the
        # device and the fused optimizer skips the update there (`found_inf`: parameters and
        # Adam's moments untouched); the values reach the host only when they are logged.
        loss.backward()  # across processes DDP averages the gradients here
        if world.distributed:  # the global batch's losses, alike on every rank
            losses = all_sum(torch.stack([loss.detach(), nll.detach(), kl.detach()]), world)
            loss, nll, kl = (losses / world.size).unbind()
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.flat.tensors(), max_norm, foreach=True)
        skip = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        self._pending["skipped_steps"] += skip
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = skip.to(torch.float32)
            self.optimizer.step()
        elif not bool(skip):
            self.optimizer.step()
        row = {"phase": phase, "loss": loss.detach(), "nll": nll.detach(), "kl": kl.detach(),
               "lr": lr, "w_e": w_e, "grad_norm": grad_norm.detach(), **extra}  # fmt: skip
        self.step += 1
        stats = self.merger.step()
        if stats is not None:
            row.update(merges_accepted=stats.accepted, merges_skipped=stats.skipped + stats.refused,
                       merges_forced=stats.forced, merge_resets=stats.nonfinite_resets,
                       max_residual=stats.max_residual)  # fmt: skip
        return row

    def _prior(self, n: int, stream: str) -> torch.Tensor:
        """``n`` prior draws from the named random stream (on the training device)."""
        g = self.streams[stream]
        z = torch.randn(n, self.coordinates.dim, generator=g, dtype=torch.float64, device=g.device)
        return (self.bg.prior_scale * z).to(self.device, self.train_x.dtype)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation NLL (all frames, and the φ > 0 and φ < 0 frames apart) and, from
        ``val_samples`` fresh samples, the reverse ESS (unclipped and with the top 1e-4 of the
        weights clipped), the log Z sandwich and the mean sample energy (kT). The samples come
        from the prior N(0, τ²I) with τ = ``sample_prior_scale``, as `p4bg.sample` will draw
        them, their log q from that tempered model."""
        log_q = torch.cat([self.bg.log_prob(c) for c in torch.split(self.val_x, 4096)]).double()
        log_q = log_q.cpu()
        pos = self.val_phi_pos
        row = {
            "val_nll": float(-log_q.mean()),
            "val_nll_phi_pos": float(-log_q[pos].mean()) if pos.any() else float("nan"),
            "val_nll_phi_neg": float(-log_q[~pos].mean()) if (~pos).any() else float("nan"),
        }
        if self.config.target_of() == self.config.temperature:
            row["val_logz_forward"] = log_z_forward((-self.val_u - log_q).numpy())
        else:  # the data are not a sample of the target at another temperature
            row["val_logz_forward"] = float("nan")
        n = self.config.val_samples or self.config.sample_batch
        energy = self.energy()
        before = energy.stats.failures
        u_s, lq_s = [], []
        trained_scale = self.bg.prior_scale
        self.bg.prior_scale = self.config.sample_prior_scale  # as p4bg.sample will draw them
        try:
            for chunk in range(0, n, 4096):
                x, lq = self.bg.generate(self._prior(min(4096, n - chunk), "validation"))
                u_s.append(energy(x).double().cpu())
                lq_s.append(lq.double().cpu())
        finally:
            self.bg.prior_scale = trained_scale
        u, lq = torch.cat(u_s), torch.cat(lq_s)
        failures = energy.stats.failures - before
        self.counters["energy_failures"] += failures
        finite = torch.isfinite(u)
        row["mean_u"] = float(u[finite].mean()) if finite.any() else float("nan")
        row["val_failures"] = failures
        if self.config.val_samples:
            log_w = (-u - lq).numpy()
            row["val_ess"] = reverse_ess(log_w)
            # clipping the top 1e-4 needs >= 10,000 samples to touch more than the largest
            # weight, which it would set to itself: below that the column stays empty
            if len(log_w) * CLIP_FRACTION > 1:
                row["val_ess_clipped"] = reverse_ess_clipped(log_w)
            row["val_logz_reverse"] = log_z_reverse(log_w)
        return row

    # --------------------------------------------------------------------- loop
    def run(self) -> dict[str, float]:
        """Train to ``total_steps`` (or to a stop signal), reporting and checkpointing on
        schedule; returns the last reported row. Every rank runs it; rank 0 validates and
        writes."""
        cfg, world = self.config, self.world
        out = self.reporter = RunReporter(self.out, to_toml(cfg), self.step, cfg.total_steps,
                                          active=world.main, progress=self.progress)  # fmt: skip
        out.info("start at step %d of %d; device %s; %d process(es), global batch %d; %d train "
                 "/ %d val frames", self.step, cfg.total_steps, self.device, world.size,
                 cfg.batch_size * world.size, self.n_train, self.n_val)  # fmt: skip
        for note in self.notes:
            out.warning(note)
        if cfg.compile:
            out.info("compile: the first step of each phase compiles the flow (minutes)")
        last: dict[str, Any] = {}
        stopped = distributed.any_rank(self.stop_requested, world)
        try:
            # torchrun passes a signal on to every process, and again before it kills them:
            # there a second signal must not cut the checkpoint short
            with out, StopSignals(escalate=not world.distributed) as signals:
                start = time.perf_counter() - self.seconds
                while self.step < cfg.total_steps and not stopped:
                    row = self.train_step()
                    self.seconds = time.perf_counter() - start
                    at_end = self.step == cfg.total_steps
                    report = (self.step % cfg.log_every == 0 or self.step % cfg.val_every == 0
                              or "merges_accepted" in row or at_end)  # fmt: skip
                    if report:  # the step's values reach the host only here
                        row = last = host_row(row)
                    if world.main and (self.step % cfg.val_every == 0 or at_end):
                        row.update(self.validate())
                        # the data's NLL ranks models of the data's temperature: annealed
                        # ones are judged by their samples (val_ess), so best.pt stays the
                        # last model before annealing
                        if row["val_nll"] < self.best["val_nll"] and row["phase"] != "anneal":
                            self.best = {"val_nll": row["val_nll"], "step": self.step}
                            self.save_best()
                        row["best_val_nll"] = self.best["val_nll"]
                        out.info(self._validation_line(row))
                    if report:
                        out.row({**row, **self.flush_counters(), "step": self.step,
                                 # clamps of degenerate geometry or torsion tails since the
                                 # start (or the resume) of the processes
                                 "clamped_coordinates": int(all_sum(
                                     self.coordinates.n_clamped.clone(), world)),
                                 "seconds": round(self.seconds, 3)})  # fmt: skip
                    if self.step % cfg.checkpoint_every == 0 or at_end:
                        self.save()
                    out.advance()
                    # after every step, the ranks agree whether to stop (on the CPU)
                    asked = signals.requested or self.stop_requested
                    stopped = distributed.any_rank(asked, world)
                if stopped and self.step < cfg.total_steps:
                    self.save()
                    out.info("interrupted at step %d; checkpoint saved, continue with "
                             "--resume %s", self.step, self.out)  # fmt: skip
        finally:
            if self.target is not None:
                self.target.close()
        return {"step": self.step, **host_row(last)}

    def _validation_line(self, row: dict) -> str:
        """One train.log line per validation; only the measured quantities appear."""
        text = (f"step {self.step} {row['phase']}: loss {row['loss']:.4f}, val NLL "
                f"{row['val_nll']:.4f} (phi>0 {row['val_nll_phi_pos']:.2f}, phi<0 "
                f"{row['val_nll_phi_neg']:.2f}"
                + (f"; best {self.best['val_nll']:.4f} at {self.best['step']}"
                   if math.isfinite(self.best["val_nll"]) else "")
                + ")")  # fmt: skip
        if "val_ess" in row:
            n = self.config.val_samples
            text += (f", reverse ESS {100 * row['val_ess']:.3g}% of {n:,} samples at "
                     f"{self.config.target_of():g} K")  # fmt: skip
            if "val_ess_clipped" in row:
                text += f" (clipped top 1e-4: {100 * row['val_ess_clipped']:.3g}%)"
            gap = row["val_logz_forward"] - row["val_logz_reverse"]
            if math.isfinite(gap):
                text += f", log Z gap {gap:.3f}"
        if row["phase"] == "anneal":
            text += (f", annealing at {row['anneal_temperature']:.0f} K (batch ESS "
                     f"{100 * row['anneal_ess']:.3g}%)")  # fmt: skip
        return text + f", mean u {row['mean_u']:.2f} kT, failed energies {row['val_failures']}"

    # ------------------------------------------------------------------ dry run
    def _energy_plan(self) -> str:
        """What ``config.energy`` will resolve to, without starting any worker."""
        if self.config.energy == "openmm":
            return f"OpenMM workers ({self.config.n_workers})"
        try:
            TorchEnergy(self.system)
        except UnsupportedForceError as err:
            if self.config.energy == "torch":
                raise ConfigError(str(err)) from None
            return f"OpenMM workers ({self.config.n_workers}): {err}"
        return f"TorchEnergy on {self.device}"

    def describe(self) -> str:
        cfg = self.config
        counts = count_parameters(self.flow)
        p4 = sum(1 for _ in self.merger.layers)
        lines = [
            f"flow: {cfg.n_blocks} blocks x ({cfg.coupling} coupling, {cfg.flow} mixing, "
            f"{cfg.coupling} coupling, {cfg.flow} mixing), hidden {cfg.hidden}"
            + (
                f", {cfg.spline_bins} bins on [-{cfg.spline_tail_bound:g}, "
                f"{cfg.spline_tail_bound:g}]"
                if cfg.coupling == "spline"
                else ""
            )
            + f", latent dim {self.coordinates.dim}",
            f"parameters: {'spline' if cfg.coupling == 'spline' else 'RNVP'} "
            f"{counts[cfg.coupling]:,}, P4Inv {counts['p4inv']:,} ({p4} layers), "
            f"total {counts['total']:,}",
            f"data {cfg.data} at {cfg.temperature:g} K: {self.n_train:,} train frames "
            f"(first {cfg.train_fraction:g} of each replica, every {cfg.train_stride}), "
            f"{self.n_val:,} val frames; device {self.device}",
            f"plan: {cfg.nll_steps:,} NLL steps at lr {cfg.nll_lr:g}"
            + (
                f", then {cfg.mixed_steps:,} mixed steps at lr {cfg.mixed_lr:g}"
                if cfg.mixed_steps
                else " and no energy phase"
            )
            + f" ({cfg.lr_schedule}"
            + (f" to x{cfg.lr_final_factor:g}" if cfg.lr_schedule == "cosine" else "")
            + (f", warm-up {cfg.warmup_steps}" if cfg.warmup_steps else "")
            + ")"
            + (f"; w_e/w_l = {cfg.energy_weight_ratio:g}" if cfg.mixed_steps else "")
            + (
                f" reached over {cfg.energy_ramp_steps:,} steps"
                if cfg.mixed_steps and cfg.energy_ramp_steps
                else ""
            )
            + f"; batch {cfg.batch_size}"
            + (
                f" per process x {self.world.size} processes = {cfg.batch_size * self.world.size}"
                if self.world.distributed
                else ""
            )
            + (f", KL batch {cfg.kl_batch_size or cfg.batch_size}" if cfg.mixed_steps else "")
            + (f"; AdamW weight decay {cfg.weight_decay:g}" if cfg.weight_decay else "; Adam")
            + (
                ", moments cleared at the mixed phase"
                if cfg.mixed_fresh_optimizer and cfg.mixed_steps
                else ""
            )
            + (f"; grad clip {cfg.max_grad_norm:g}" if cfg.max_grad_norm else ""),
            f"target energy at {cfg.target_of():g} K"
            + (
                f"; then {cfg.anneal_steps:,} annealing steps at lr {cfg.anneal_lr:g} through "
                + ", ".join(f"{t:.0f}" for t in cfg.anneal_ladder())
                + f" K ({cfg.anneal_samples:,} samples reweighted per batch)"
                if cfg.anneal_steps
                else ""
            )
            + (f"; starts from the model of {cfg.init}" if cfg.init else ""),
            f"validation every {cfg.val_every} steps: NLL by basin"
            + (f", reverse ESS of {cfg.val_samples:,} samples" if cfg.val_samples else "")
            + "; best model (lowest NLL, before any annealing) kept in best.pt",
            f"merges every {cfg.merge_every} steps, forced every {cfg.force_every}, "
            f"corrected every {cfg.correct_every} merges, penalty {cfg.penalty:g}",
            f"target energy: {cfg.energy} -> {self._energy_plan()}",
            f"output {cfg.out}: config.toml, checkpoint.pt every {cfg.checkpoint_every}, "
            "metrics.csv, train.log",
        ]
        return "\n".join(lines)


def host_row(row: dict[str, Any]) -> dict[str, Any]:
    """A step's row with its tensors as Python floats (one synchronisation for them all)."""
    keys = [k for k, v in row.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return dict(row)
    values = torch.stack([row[k].detach().double().reshape(()) for k in keys]).tolist()
    return {**row, **dict(zip(keys, values, strict=True))}


def main(argv: list[str] | None = None) -> None:
    """``python -m p4bg.train``, or under ``torchrun`` one process of a distributed run."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags, overrides = parse_args(argv)
        config = resolve_config(flags, overrides)
        if (
            not flags["resume"]
            and not flags["dry_run"]
            and (Path(config.out) / "checkpoint.pt").exists()
        ):
            raise ConfigError(
                f"out={config.out} already holds a run; continue it with "
                f"--resume {config.out} or choose another --out"
            )
        world, device = (SINGLE, config.device) if flags["dry_run"] else distributed.setup(
            config.device)  # fmt: skip
        trainer = Trainer(config, resume=bool(flags["resume"]), progress=not flags["no_progress"],
                          world=world, device=device)  # fmt: skip
    except (ConfigError, DatasetError, SystemConfigError) as err:
        if os.environ.get("RANK", "0") == "0":  # said once, not by every process
            print(f"p4bg.train: error: {err}", file=sys.stderr)
        distributed.shutdown()
        raise SystemExit(2) from None
    try:
        _train(trainer, flags)
    finally:
        distributed.shutdown()


def _train(trainer: Trainer, flags: dict[str, Any]) -> None:
    config, say = trainer.config, print if trainer.world.main else (lambda *a: None)
    if flags["dry_run"]:
        print(trainer.flow)
        print(trainer.describe())
        return
    say(trainer.describe())
    if trainer.step >= config.total_steps:
        say(f"{config.out} already finished all {config.total_steps} steps; nothing to do")
        return
    result = trainer.run()
    status = "finished" if trainer.step >= config.total_steps else "interrupted"
    val = result.get("val_nll", float("nan"))
    best = trainer.best
    val_text = f"last val NLL {val:.4f}" if math.isfinite(val) else "no validation at the last step"
    if math.isfinite(best.get("val_nll", math.inf)):
        val_text += f" (best {best['val_nll']:.4f} at step {best['step']}, in best.pt)"
    say(f"{status} at step {trainer.step} in {trainer.seconds:.0f} s; {val_text}; "
        f"run in {config.out}")  # fmt: skip


if __name__ == "__main__":
    main()
