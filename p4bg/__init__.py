"""p4bg: Boltzmann generators whose flows mix with P4Inv layers (invertible linear layers trained
through rank-one perturbations), for molecules in implicit solvent from OpenMM.

The package by job: ``nn`` (bijections, torch only), ``energy`` (target energies: OpenMM
workers, TorchEnergy), ``md`` (plain MD, replica exchange, umbrella sampling and their
estimators), ``training`` (build_run and the loop), ``runs`` (the run folder), ``sampling``, and
the modules they share (``units``, ``files``, ``config``, ``cli``, ``systems``, ``data``,
``coordinates``, ``flows``, ``generator``, ``distributed``). The command lines are ``train``,
``sample``, ``analyze``, ``simulate``, ``remd`` and ``umbrella`` (``python -m p4bg.X``). The
layout and its rules are docs/design.md §1.
"""

__version__ = "0.1.0"
