"""Training a Boltzmann generator: the run's parts, the schedules, the loss, the loop.

:func:`build_run` makes every part of a run from its configuration (data, coordinates, flow,
generator, optimizer, P4Inv merge schedule, random streams, the loss module, the lazily started
target energy); :class:`Trainer` owns the run's progress and its loop. Around them, one module
per job: ``schedules`` (phase, learning rate, energy weight, annealing temperature),
``objective`` (the step's loss, the annealing weights and resampling), ``streams`` (the seeded
random streams), ``checkpoints`` (save, resume, start from another run), ``validation``,
``plan`` (the printout before a run) and ``reporting`` (config.toml, train.log, metrics.csv, the
progress bar). The command line is :mod:`p4bg.train`.
"""

from p4bg.training.build import RunParts, build_run
from p4bg.training.loop import StopSignals, Trainer, host_row

__all__ = ["RunParts", "StopSignals", "Trainer", "build_run", "host_row"]
