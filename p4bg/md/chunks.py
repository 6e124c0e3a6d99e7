"""The one chunk loop: every kind of MD run saves its frames in chunks that survive a kill.

A job (one replica, one exchange chain, one umbrella window) owns a folder of chunks in the
dataset format of :mod:`p4bg.data`. The loop asks the job's :class:`Sampler` for one saved frame
at a time, and after every ``chunk_frames`` frames writes them with the sampler's checkpoint
(positions, velocities and random state of everything it integrates), atomically. A run that
was killed starts again from the last complete chunk (:func:`p4bg.data.resume_point`): the
sampler restores the checkpoint instead of starting afresh, so that the frames of an
interrupted run are those of an uninterrupted one, bit for bit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np

from p4bg.data import resume_point, write_chunk
from p4bg.md.pool import Progress

__all__ = ["ChunkJob", "Frame", "Sampler", "run_chunks"]


@dataclass(frozen=True, kw_only=True)
class ChunkJob:
    """What the chunk loop needs of every job (picklable, for a worker process)."""

    kind: ClassVar[str] = "replica"  # how messages name the job: "replica 1 failed"

    index: int
    frames: int  # saved frames in all, over every run of the job
    steps_per_frame: int  # MD steps between saved frames
    chunk_frames: int  # frames per chunk file
    folder: str  # the job's folder of chunks
    stop_after_chunks: int | None = None  # testing hook: stop after this many chunks, as a kill
    # stop after the chunk during which this file appeared: an orderly early end (the demo's MD
    # of a given cost); the folder keeps every finished chunk and resumes like a killed run
    stop_file: str | None = None


class Frame(NamedTuple):
    """One saved frame: positions (n_atoms, 3) nm, potential energy kJ/mol, and the kind's
    per-frame values (stacked over the chunk into ``(frames, ...)`` arrays of its ``.npz``)."""

    xyz: np.ndarray
    energy: float
    extra: dict[str, Any] | None = None


class Sampler:
    """What a kind of run supplies to the loop. A sampler is made fresh in the worker; the loop
    then calls either :meth:`start` (no chunk yet) or :meth:`restore`, and :meth:`frame` once
    per saved frame."""

    def start(self) -> None:
        """Begin a new run: initial positions and velocities, equilibration (not saved)."""
        raise NotImplementedError

    def restore(self, checkpoint: bytes) -> None:
        """Continue from the state :meth:`checkpoint` returned after the last complete chunk."""
        raise NotImplementedError

    def checkpoint(self) -> bytes:
        """Everything needed to continue exactly from here (OpenMM checkpoints, RNG states)."""
        raise NotImplementedError

    def frame(self) -> Frame:
        """Advance by one saved frame (``steps_per_frame`` MD steps, and whatever else)."""
        raise NotImplementedError

    def chunk_extra(self) -> dict[str, np.ndarray]:
        """Arrays stored once per chunk, beside the per-frame ones (none by default)."""
        return {}


def run_chunks(
    job: ChunkJob,
    sampler: Sampler,
    progress: Progress | None = None,
    md_steps_per_frame: int | None = None,
) -> dict[str, Any]:
    """Run ``job`` from where its folder stands to ``job.frames`` frames; its statistics.

    md_steps_per_frame: the MD steps a frame costs, for the rate (default ``steps_per_frame``;
    a replica-exchange chain integrates all its temperatures). Returns ``index``,
    ``frames_done`` (on disk), ``new_frames`` (by this call), ``seconds`` and
    ``steps_per_second`` (of this call's production).
    """
    progress = progress or Progress(None, job.index, f"{job.kind} {job.index}")
    folder = Path(job.folder)
    point = resume_point(folder)
    if point.checkpoint is not None:
        sampler.restore(point.checkpoint)
    else:
        sampler.start()
    progress.resumed(point.frames)
    frames_done, step, chunk = point.frames, point.step, point.chunks
    start = time.perf_counter()
    new_frames = 0
    while frames_done < job.frames:
        if job.stop_after_chunks is not None and chunk - point.chunks >= job.stop_after_chunks:
            break
        rows = []
        for _ in range(min(job.chunk_frames, job.frames - frames_done)):
            rows.append(sampler.frame())
            progress.frame()
        m = len(rows)
        xyz = np.stack([r.xyz for r in rows])
        energies = np.array([r.energy for r in rows], dtype=np.float64)
        steps = step + job.steps_per_frame * np.arange(1, m + 1, dtype=np.int64)
        if not np.isfinite(energies).all() or not np.isfinite(xyz).all():
            raise RuntimeError(
                f"{job.kind} {job.index}: non-finite energy or positions in chunk {chunk} "
                "(the simulation blew up); lower the timestep or check the system"
            )
        names = rows[0].extra or {}
        extra = {k: np.stack([np.asarray(r.extra[k]) for r in rows]) for k in names}  # type: ignore[index]
        extra.update(sampler.chunk_extra())
        write_chunk(folder, chunk, xyz, energies, steps, sampler.checkpoint(), extra)
        progress.flush()
        frames_done += m
        new_frames += m
        step = int(steps[-1])
        chunk += 1
        if job.stop_file is not None and Path(job.stop_file).exists():
            break
    seconds = time.perf_counter() - start
    md_steps = new_frames * (md_steps_per_frame or job.steps_per_frame)
    return {
        "index": job.index,
        "frames_done": frames_done,
        "new_frames": new_frames,
        "seconds": seconds,
        "steps_per_second": md_steps / seconds if seconds > 0 else math.nan,
    }
