"""Shared test helpers that need a short MD run."""

from __future__ import annotations

import numpy as np


def run_md(tmp_path_factory, frames: int, seed: int, steps_per_frame: int = 100) -> np.ndarray:
    """Frames of 600 K alanine dipeptide MD run in this process, shape (frames, 66) nm float64."""
    from p4bg.data import read_chunk
    from p4bg.md.plain import ReplicaJob, run_replica
    from p4bg.systems import SYSTEMS_DIR

    folder = tmp_path_factory.mktemp("md") / "replica_00"
    job = ReplicaJob(
        index=0,
        system_path=str(SYSTEMS_DIR / "alanine_dipeptide"),
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
    return read_chunk(folder, 0)[0].reshape(frames, 66).astype(np.float64)
