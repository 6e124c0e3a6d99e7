"""Train a Boltzmann generator on MD data: maximum likelihood, then likelihood + energy, then
(optionally) annealing to another temperature.

examples:
  python -m p4bg.train --preset quick --data data/alanine_dipeptide_600K --out runs/quick
  python -m p4bg.train --preset spline --out runs/spline          # the best 600 K model
  python -m p4bg.train --preset spline300 --init runs/spline      # then anneal it to 300 K
  python -m p4bg.train --preset paper --mixing=swap --batch_size=128 --out runs/swap
  python -m p4bg.train --resume runs/spline      # continue a stopped run exactly
  python -m p4bg.train --preset paper --dry-run  # the model, its size and the plan
  torchrun --standalone --nproc_per_node=2 -m p4bg.train --preset smoke --out runs/ddp

Every configuration key below can be set as --key=value (dashes or underscores), or in a TOML
file given with --config; the command line wins over the file, the file over the preset.
A run folder gets config.toml, train.log, metrics.csv, checkpoint.pt (replaced atomically) and
best.pt (the model at the lowest validation NLL). Ctrl-C or SIGTERM stops after the current step
with a checkpoint; --resume continues from it. Under torchrun batch_size is per process.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from p4bg import distributed
from p4bg.cli import Parser, option
from p4bg.cli import build_parser as build_cli_parser
from p4bg.config import PRESETS, RENAMED_KEYS, ConfigError, TrainConfig, apply_overrides, load_toml
from p4bg.data import DatasetError
from p4bg.distributed import SINGLE
from p4bg.md import plain
from p4bg.md.output import MDRunOptions
from p4bg.runs import RESUME_OVERRIDES, read_config
from p4bg.systems import SystemConfigError, load_system
from p4bg.training import Trainer

__all__ = ["build_parser", "main", "parse_args", "resolve_config"]

PROG = "python -m p4bg.train"


@dataclass
class TrainCommand:
    """The switches of ``python -m p4bg.train``; the configuration keys follow as --key=value."""

    preset: str = option("paper", "the configuration to start from", choices=tuple(PRESETS))
    config: str | None = option(None, "TOML file of configuration keys, over the preset")
    resume: str | None = option(None, "continue the run in this folder exactly (with its "
                                "config.toml)", metavar="RUN")  # fmt: skip
    dry_run: bool = option(False, "print the model, its parameter counts and the plan; train "
                           "nothing")  # fmt: skip
    no_progress: bool = option(False, "no progress bar")


def build_parser() -> Parser:
    """The command's parser: the switches, then every configuration key with the ``paper``
    preset's value (kept as text: apply_overrides converts it and names the key if it cannot)."""
    parser = build_cli_parser(TrainCommand, PROG, __doc__ or "")
    parser.usage = (f"{PROG} [--preset NAME] [--config FILE] [--resume RUN] [--dry-run] "
                    "[--no-progress] [--KEY=VALUE ...]")  # fmt: skip
    keys = parser.add_argument_group("configuration keys (the paper preset's values)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        names = dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"])
        keys.add_argument(*names, dest=f"key:{f.name}", default=argparse.SUPPRESS,
                          metavar=f.type.upper() if isinstance(f.type, str) else "VALUE",
                          help=f"{getattr(defaults, f.name)!r}")  # fmt: skip
    for old in RENAMED_KEYS:  # accepted, not advertised
        keys.add_argument(f"--{old}", dest=f"key:{old}", default=argparse.SUPPRESS,
                          help=argparse.SUPPRESS)  # fmt: skip
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
    namespace, rest = build_parser().parse_known_args(_joined_values(list(argv)))
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
    """The run's configuration: a resumed run's own (only settings that do not change the
    computation may be overridden), else preset < --config file < command line; the target
    temperature recorded as a number, not as "the data's"."""
    if flags["resume"]:
        run = Path(flags["resume"])
        extra = sorted(set(overrides) - RESUME_OVERRIDES)
        if extra or flags["config"]:
            raise ConfigError(
                "--resume continues a run with its saved config.toml; only "
                f"{', '.join(sorted(RESUME_OVERRIDES))} may be changed (got {extra or '--config'})"
            )
        config, _ = read_config(run)
        config = apply_overrides(config, {**overrides, "out": str(run)}, "--resume")
    else:
        config = apply_overrides(
            TrainConfig(), PRESETS[flags["preset"]], f"preset {flags['preset']}"
        )
        if flags["config"]:
            config = apply_overrides(config, load_toml(flags["config"]), str(flags["config"]))
        config = apply_overrides(config, overrides, "command line")
        config.target_temperature = config.temperatures().target
    config.validate()
    return config


def make_smoke_data(config: TrainConfig) -> None:
    """The smoke preset's dataset, made when it is missing: 200 frames of MD (0.04 ns over two
    replicas, seconds), so that ``python -m p4bg.train --preset smoke`` checks an installation
    from nothing. Only for the preset's own dataset folder; any other missing data is an error."""
    if config.data != PRESETS["smoke"]["data"] or (Path(config.data) / "metadata.json").is_file():
        return
    print(f"p4bg.train: the smoke preset's data {config.data} is not there; making it (200 "
          "frames of MD, seconds)", file=sys.stderr)  # fmt: skip
    system = load_system(config.system, config.temperature)
    options = MDRunOptions(system=config.system, out=config.data, equilibration_ps=1.0,
                           workers=1, no_progress=True)  # fmt: skip
    plan = plain.make_plan(system, ns=0.04, save_every_ps=0.2, replicas=2, seed=0,
                           equilibration_ps=1.0, split=options.split, chunk_frames=100)  # fmt: skip
    plain.run(options, system, plan, "python -m p4bg.train --preset smoke")


def main(argv: list[str] | None = None) -> None:
    """``python -m p4bg.train``, or under ``torchrun`` one process of a distributed run
    (which ends the process: :func:`p4bg.distributed.run_process`)."""
    argv = sys.argv[1:] if argv is None else argv
    distributed.run_process(lambda: _main(argv))


def _main(argv: list[str]) -> None:
    try:
        flags, overrides = parse_args(argv)
        config = resolve_config(flags, overrides)
        if (not flags["resume"] and not flags["dry_run"]
                and (Path(config.out) / "checkpoint.pt").exists()):  # fmt: skip
            raise ConfigError(
                f"out={config.out} already holds a run; continue it with "
                f"--resume {config.out} or choose another --out"
            )
        if not flags["resume"] and not distributed.launched():  # not under torchrun
            make_smoke_data(config)
        world, device = (SINGLE, config.device) if flags["dry_run"] else distributed.setup(
            config.device)  # fmt: skip
        trainer = Trainer(config, resume=bool(flags["resume"]), progress=not flags["no_progress"],
                          world=world, device=device)  # fmt: skip
        if flags["resume"]:
            trainer.notes.extend(read_config(flags["resume"])[1])
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
