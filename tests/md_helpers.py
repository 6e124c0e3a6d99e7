"""Shared test helpers that need a short MD run."""

from __future__ import annotations

import numpy as np
import torch


def run_md(tmp_path_factory, frames: int, seed: int, steps_per_frame: int = 100,
           system_path: object = None) -> np.ndarray:  # fmt: skip
    """Frames of 600 K MD run in this process, of alanine dipeptide or of the system folder
    ``system_path``: shape (frames, 3·n_atoms) nm float64 (66 for alanine dipeptide)."""
    from p4bg.data import read_chunk
    from p4bg.md.plain import ReplicaJob, run_replica
    from p4bg.systems import SYSTEMS_DIR

    folder = tmp_path_factory.mktemp("md") / "replica_00"
    job = ReplicaJob(
        index=0,
        system_path=str(system_path or SYSTEMS_DIR / "alanine_dipeptide"),
        temperature=600.0,
        platform="Reference",
        seed=seed,
        frames=frames,
        steps_per_frame=steps_per_frame,
        equilibration_steps=1000,
        chunk_frames=frames,
        folder=str(folder),
    )
    run_replica(job)
    return read_chunk(folder, 0)[0].reshape(frames, -1).astype(np.float64)


def rotation(omega: torch.Tensor) -> torch.Tensor:
    """exp([ω]×): the rotation by the rotation vector ω [3] rad."""
    zero = omega.new_zeros(())
    skew = torch.stack([torch.stack([zero, -omega[2], omega[1]]),
                        torch.stack([omega[2], zero, -omega[0]]),
                        torch.stack([-omega[1], omega[0], zero])])  # fmt: skip
    return torch.linalg.matrix_exp(skew)


def frame_log_volume(block: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """log|det[T, Ω(y), B]| of blocks y [batch, 5, 3] by the 15 × 15 determinant itself."""
    eye = torch.eye(3, dtype=block.dtype)
    T = eye.repeat(block.shape[1], 1).expand(len(block), -1, -1)
    omega = torch.stack([torch.cross(eye[i].expand_as(block), block, dim=-1).flatten(1)
                         for i in range(3)], -1)  # fmt: skip
    return torch.linalg.slogdet(torch.cat([T, omega, basis.expand(len(block), -1, -1)], -1))[1]


def capped_dipeptide_frames(
    residue: str, frames: int, seed: int
) -> tuple[object, np.ndarray, object]:
    """ACE-``residue``-NME (alanine dipeptide's PDB mutated by PDBFixer, hydrogens added at
    pH 7, minimised) and ``frames`` frames of 600 K MD, 50 fs apart, in amber99sbildn + OBC on
    the Reference platform. Returns (mdtraj Topology, frames (frames, n_atoms, 3) nm float64,
    the openmm.System)."""
    import mdtraj
    import openmm
    import openmm.app as app
    import openmm.unit as unit
    from pdbfixer import PDBFixer

    from p4bg.systems import SYSTEMS_DIR

    fixer = PDBFixer(filename=str(SYSTEMS_DIR / "alanine_dipeptide" / "alanine_dipeptide.pdb"))
    if residue != "ALA":
        fixer.applyMutations([f"ALA-2-{residue}"], next(fixer.topology.chains()).id)
    fixer.findMissingResidues()
    fixer.missingResidues = {}
    fixer.findMissingAtoms()
    fixer.addMissingAtoms(seed=seed)
    fixer.addMissingHydrogens(7.0)
    forcefield = app.ForceField("amber99sbildn.xml", "amber99_obc.xml")
    system = forcefield.createSystem(fixer.topology, nonbondedMethod=app.NoCutoff)
    integrator = openmm.LangevinMiddleIntegrator(600.0, 1.0, 0.001)
    integrator.setRandomNumberSeed(seed)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(fixer.positions)
    openmm.LocalEnergyMinimizer.minimize(context)
    context.setVelocitiesToTemperature(600.0, seed)
    integrator.step(500)
    out = []
    for _ in range(frames):
        integrator.step(50)
        out.append(context.getState(getPositions=True).getPositions(asNumpy=True)
                   .value_in_unit(unit.nanometer))  # fmt: skip
    return mdtraj.Topology.from_openmm(fixer.topology), np.asarray(out, dtype=np.float64), system


def rigid_motion_residuals(transform: object, z: torch.Tensor, seed: int) -> torch.Tensor:
    """For each latent row z[i]: (z, rotation vector ω, translation t) -> R(ω) forward(z) + t is
    square (3n -> 3n); returns log|det| of its autograd Jacobian − ladj(z) − log J(0) − log g(ω),
    g(ω) = 2(1 − cos|ω|)/|ω|² the Haar density of ω: zero when ladj is the full Jacobian. ω and t
    are drawn from ``seed``; float64 throughout."""
    import math

    from torch.autograd.functional import jacobian

    n_latent = z.shape[1]
    n_atoms = (n_latent + 6) // 3
    log_j0 = float(frame_log_volume(transform.reference.unsqueeze(0), transform.basis)[0])
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(len(z)):
        omega = torch.randn(3, dtype=torch.float64, generator=gen)
        shift = torch.randn(3, dtype=torch.float64, generator=gen)

        def placed(v: torch.Tensor) -> torch.Tensor:
            x, _ = transform(v[:n_latent].unsqueeze(0))
            moved = x.reshape(n_atoms, 3) @ rotation(v[n_latent : n_latent + 3]).T
            return (moved + v[n_latent + 3 :]).reshape(-1)

        sign, logdet = torch.linalg.slogdet(jacobian(placed, torch.cat([z[i], omega, shift])))
        assert sign != 0
        _, ladj = transform(z[i : i + 1])
        theta = float(omega.norm())
        log_g = math.log(2 * (1 - math.cos(theta)) / theta**2)
        out.append(float(logdet) - float(ladj[0]) - log_g - log_j0)
    return torch.tensor(out, dtype=torch.float64)
