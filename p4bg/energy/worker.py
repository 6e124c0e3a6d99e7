"""Energy worker process: ``python -m p4bg.energy.worker FD``.

Started by :class:`p4bg.energy.OpenMMEnergy` with one end of a socket pair as file descriptor
FD. It imports only numpy and OpenMM (not torch, not the user's ``__main__``: no start-up cost,
no ``if __name__ == "__main__"`` requirement on user scripts; the package ``p4bg.energy`` loads
its other modules on first use for this reason), builds its own Context from the serialised
System it is sent, and answers ``(job, xyz, forces)`` requests with ``(job, energies, forces,
failed)`` until it receives ``None`` or its parent goes away. The parent uses
:func:`make_context` and :func:`evaluate_frames` too, for ``n_workers=0`` and to measure the
platforms.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def make_context(system_xml: str, platform: str) -> Any:
    """An OpenMM Context of the serialised System on the named platform (the integrator is never
    stepped: the Context only evaluates energies and forces)."""
    import openmm

    system = openmm.XmlSerializer.deserialize(system_xml)
    return openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform)
    )


def evaluate_frames(
    context: Any, xyz: np.ndarray, forces: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Energies (kJ/mol), forces (kJ/mol/nm) and failure flags of frames ``xyz`` (frames, n, 3)
    nm, one Context call per frame. Failed frames get energy +inf and force 0."""
    n = len(xyz)
    energies = np.empty(n)
    out_forces = np.zeros(xyz.shape) if forces else None
    failed = np.zeros(n, dtype=bool)
    for i in range(n):
        frame = xyz[i]
        if not np.isfinite(frame).all():
            failed[i] = True
            continue
        try:
            context.setPositions(frame)
            state = context.getState(getEnergy=True, getForces=forces)
            energies[i] = state.getPotentialEnergy()._value  # kJ/mol, no Quantity arithmetic
            if forces:
                out_forces[i] = state.getForces(asNumpy=True)._value
        except Exception:  # OpenMM raises for some invalid inputs on some platforms
            failed[i] = True
            continue
        if not np.isfinite(energies[i]) or (forces and not np.isfinite(out_forces[i]).all()):
            failed[i] = True
    energies[failed] = np.inf
    if forces:
        out_forces[failed] = 0.0
    return energies, out_forces, failed


def main(fd: int) -> None:
    """Serve the parent on the socket ``fd`` until told to stop or the parent is gone."""
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    try:
        system_xml, platform = conn.recv()
        try:
            context = make_context(system_xml, platform)
        except Exception as err:
            conn.send(("error", repr(err)))
            return
        conn.send(("ready", None))
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                return
            if message is None:
                return
            job, xyz, forces = message
            conn.send((job, *evaluate_frames(context, xyz, forces)))
    except KeyboardInterrupt:  # workers run in their own session; this covers a manual kill -INT
        return
    except (BrokenPipeError, EOFError):
        return


if __name__ == "__main__":
    main(int(sys.argv[1]))
