"""MD dataset files: written in chunks (so a killed run loses nothing finished), loaded as arrays.

Layout of a dataset folder (written by ``python -m p4bg.simulate``)::

    metadata.json                  plan, seeds, platform, versions, command line, status
    split.json                     train/val/test as contiguous time blocks of each replica
    replica_00/chunk_00000.dcd     positions, float32 Å (DCD: full precision, unlike XTC)
    replica_00/chunk_00000.npz     energies (kJ/mol), production step of each frame, and the
                                   OpenMM checkpoint after the chunk's last frame

A chunk is complete when its ``.npz`` exists; both files are written atomically
(:func:`p4bg.files.write_atomic`: a temporary ``*.tmp.*`` file, then a move), the ``.npz`` last.

Frames are loaded in the system PDB's labelling of equivalent hydrogens (``p4bg.equivalent``,
docs/design.md §5): frames written by another tool with a methyl group's hydrogens in the other
order are relabelled (with a warning), and frames whose labelling is undefined are refused.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from p4bg import files
from p4bg.equivalent import (
    EquivalentAtomsError,
    canonicalize_equivalent_atoms,
    equivalent_groups,
)
from p4bg.systems import load_system

__all__ = [
    "Dataset",
    "DatasetError",
    "chunk_paths",
    "complete_chunks",
    "load_dataset",
    "load_metadata",
    "make_split",
    "read_chunk",
    "resume_point",
    "training_frames",
    "write_chunk",
]

SPLIT_NAMES = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset folder is missing, incomplete or inconsistent."""


class Dataset(NamedTuple):
    """An MD dataset in memory.

    xyz: positions, shape (frames, 3·n_atoms), nm, float32 (replicas concatenated in order).
    energies: potential energies, shape (frames,), kJ/mol, float64.
    split: ``{"train" | "val" | "test": frame indices}`` (int64 arrays into xyz).
    """

    xyz: np.ndarray
    energies: np.ndarray
    split: dict[str, np.ndarray]


def chunk_paths(folder: Path, index: int) -> tuple[Path, Path]:
    return folder / f"chunk_{index:05d}.dcd", folder / f"chunk_{index:05d}.npz"


def write_chunk(
    folder: Path,
    index: int,
    xyz: np.ndarray,
    energies: np.ndarray,
    steps: np.ndarray,
    checkpoint: bytes,
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    """Write chunk ``index`` of one replica atomically.

    xyz: positions, shape (frames, n_atoms, 3), nm. energies: kJ/mol, shape (frames,).
    steps: production step of each frame. checkpoint: OpenMM ``Context.createCheckpoint()``
    taken after the last frame, from which a killed run resumes (for a replica-exchange chain,
    the pickled state of all its temperatures). extra: more arrays stored in the ``.npz``
    (replica exchange: energies and angles at every temperature).
    """
    from mdtraj.formats import DCDTrajectoryFile

    folder.mkdir(parents=True, exist_ok=True)
    dcd, npz = chunk_paths(folder, index)

    def write_dcd(tmp: Path) -> None:
        with DCDTrajectoryFile(str(tmp), "w", force_overwrite=True) as f:
            f.write(np.asarray(xyz, dtype=np.float32) * np.float32(10.0))  # DCD stores Å

    arrays = {
        "energies": np.asarray(energies, dtype=np.float64),
        "steps": np.asarray(steps, dtype=np.int64),
        "checkpoint": np.frombuffer(checkpoint, dtype=np.uint8),
        **(extra or {}),
    }
    files.write_atomic(dcd, write_dcd)
    files.write_atomic(npz, lambda tmp: np.savez(tmp, **arrays))


def complete_chunks(folder: Path) -> int:
    """Number of complete chunks of a replica (0, 1, … without gaps); leftovers of an
    interrupted write are removed so that the next write starts clean."""
    if not folder.is_dir():
        return 0
    for leftover in list(folder.glob("*.tmp.*")):
        leftover.unlink()
    count = 0
    while all(p.is_file() for p in chunk_paths(folder, count)):
        count += 1
    for stray in chunk_paths(folder, count):  # a .dcd whose .npz never came
        if stray.exists():
            stray.unlink()
    return count


class ResumePoint(NamedTuple):
    """Where a chunked simulation stands: complete chunks, frames in them, the last chunk's
    checkpoint (None before the first) and the production step of its last frame (0 before)."""

    chunks: int
    frames: int
    checkpoint: bytes | None
    step: int


def resume_point(folder: Path) -> ResumePoint:
    """The :class:`ResumePoint` of one replica's (or chain's) folder of chunks."""
    chunks = complete_chunks(folder)
    frames, checkpoint, step = 0, None, 0
    for i in range(chunks):
        with np.load(chunk_paths(folder, i)[1]) as data:
            frames += len(data["energies"])
            if i == chunks - 1:
                checkpoint = data["checkpoint"].tobytes()
                step = int(data["steps"][-1])
    return ResumePoint(chunks, frames, checkpoint, step)


def read_chunk(folder: Path, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bytes]:
    """``(xyz (frames, n_atoms, 3) nm float32, energies kJ/mol, steps, checkpoint)``."""
    from mdtraj.formats import DCDTrajectoryFile

    dcd, npz = chunk_paths(folder, index)
    with files.quiet_c_stdio(), DCDTrajectoryFile(str(dcd), "r") as f:
        xyz_angstrom = f.read()[0]
    with np.load(npz) as data:
        energies, steps, checkpoint = data["energies"], data["steps"], data["checkpoint"].tobytes()
    if len(xyz_angstrom) != len(energies):
        raise DatasetError(
            f"{dcd}: {len(xyz_angstrom)} frames but {npz} has {len(energies)} energies; "
            "delete both files and resume the simulation with --resume"
        )
    return xyz_angstrom / np.float32(10.0), energies, steps, checkpoint


def make_split(frames_per_replica: list[int], fractions: tuple[float, float, float]) -> dict:
    """Train/val/test as contiguous time blocks of every replica (train first, test last).

    MD frames are correlated in time; a random frame split would put near-copies of test frames
    into the training set. Returns ``{name: [[start, stop], ...]}`` in global frame indices.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise DatasetError(
            f"split fractions must be 3 non-negative numbers summing to 1, got {fractions}"
        )
    blocks: dict[str, list[list[int]]] = {name: [] for name in SPLIT_NAMES}
    offset = 0
    for n in frames_per_replica:
        edges = [
            offset,
            offset + round(n * fractions[0]),
            offset + round(n * (fractions[0] + fractions[1])),
            offset + n,
        ]
        for name, start, stop in zip(SPLIT_NAMES, edges[:-1], edges[1:], strict=True):
            blocks[name].append([start, stop])
        offset += n
    return blocks


def load_metadata(path: str | Path) -> dict:
    path = Path(path)
    meta = path / "metadata.json"
    if not meta.is_file():
        raise DatasetError(
            f"{path}: no dataset here (no metadata.json); make one with "
            f"`python -m p4bg.simulate --out {path}`"
        )
    return json.loads(meta.read_text())


def load_dataset(path: str | Path, canonicalize: bool = True) -> Dataset:
    """Load a dataset folder written by ``p4bg.simulate`` (see the module docstring).

    Returns ``Dataset(xyz (frames, 3·n_atoms) nm float32, energies (frames,) kJ/mol, split)``.
    With ``canonicalize`` (the default) the equivalent hydrogens of every frame are brought to
    the labelling of the system named in ``metadata.json`` (a ``UserWarning`` says how many
    frames were relabelled; p4bg's own MD needs none), and a frame whose labelling is undefined
    raises :class:`DatasetError`. Energies are unchanged by the relabelling.
    """
    path = Path(path)
    meta = load_metadata(path)
    if meta.get("status") != "complete":
        raise DatasetError(
            f"{path}: the simulation has not finished (status {meta.get('status')!r}); "
            f"continue it with `python -m p4bg.simulate --out {path} --resume` and the same options"
        )
    xyz_parts, energy_parts = [], []
    for replica in meta["replicas"]:
        folder = path / replica["folder"]
        n_chunks = complete_chunks(folder)
        frames = 0
        for i in range(n_chunks):
            xyz, energies, _, _ = read_chunk(folder, i)
            xyz_parts.append(xyz.reshape(len(xyz), -1))
            energy_parts.append(energies)
            frames += len(xyz)
        if frames != replica["frames"]:
            raise DatasetError(
                f"{folder}: {frames} frames on disk, metadata.json expects {replica['frames']}; "
                "resume the simulation with --resume"
            )
    split_file = path / "split.json"
    if not split_file.is_file():
        raise DatasetError(
            f"{split_file} is missing; rerun the simulation with --resume to write it"
        )
    blocks = json.loads(split_file.read_text())
    split = {
        name: np.concatenate(
            [np.arange(a, b, dtype=np.int64) for a, b in blocks[name]] or [np.zeros(0, np.int64)]
        )
        for name in SPLIT_NAMES
    }
    xyz = np.concatenate(xyz_parts)
    if canonicalize:
        xyz = _canonical_labels(path, meta, xyz)
    return Dataset(xyz, np.concatenate(energy_parts), split)


def _canonical_labels(path: Path, meta: dict, xyz: np.ndarray) -> np.ndarray:
    """``xyz`` (frames, 3·n_atoms) in the PDB's labelling of the system ``meta`` names."""
    system_path = meta.get("system_path")
    name = system_path if system_path and Path(system_path).is_dir() else meta.get("system")
    if name is None:
        raise DatasetError(
            f"{path}/metadata.json names no system, so equivalent hydrogens cannot be checked; "
            'add a "system" key or load with canonicalize=False'
        )
    system = load_system(name)
    if xyz.shape[1] != system.dim:
        raise DatasetError(
            f"{path}: frames have {xyz.shape[1] // 3} atoms, system {system.name!r} has "
            f"{system.n_atoms}"
        )
    try:
        xyz, n_swapped = canonicalize_equivalent_atoms(xyz, equivalent_groups(system))
    except EquivalentAtomsError as err:
        raise DatasetError(f"{path}: {err}") from err
    if n_swapped:
        warnings.warn(
            f"{path}: {n_swapped} of {len(xyz)} frames had a methyl group's hydrogens labelled "
            f"in the other order than {system.name}'s PDB; relabelled (docs/design.md §5)",
            UserWarning,
            stacklevel=3,
        )
    return xyz


def training_frames(train: np.ndarray, fraction: float = 1.0, stride: int = 1) -> np.ndarray:
    """Indices of the training frames used: the first ``fraction`` of every contiguous block of
    ``train`` (one block per replica: a shorter MD run), then every ``stride``-th frame of each
    block (sparser saving). ``train``: sorted frame indices of the dataset's training split."""
    if len(train) == 0:
        return train
    breaks = np.flatnonzero(np.diff(train) != 1) + 1
    kept = [block[: max(1, round(len(block) * fraction))][::stride]
            for block in np.split(train, breaks)]  # fmt: skip
    return np.concatenate(kept)
