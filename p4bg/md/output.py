"""A chunked MD run's dataset folder: the options every such run takes, the checks before it
writes (a folder in use, a resume with other options), and its record in ``metadata.json``.

Plain MD (:mod:`p4bg.md.plain`) and replica exchange (:mod:`p4bg.md.exchange`) both write a
dataset this way; the record says what was run (the plan), on what (platform, versions, command
line), how fast, and whether it finished (``status``: running, interrupted, complete).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p4bg.cli import option
from p4bg.data import DatasetError, load_metadata, make_split
from p4bg.files import write_json
from p4bg.md.platform import versions
from p4bg.md.pool import run_jobs

__all__ = ["MDRunOptions", "command_line", "prepare_output", "run_and_record", "start_record"]


@dataclass(kw_only=True)
class MDRunOptions:
    """What every chunked, resumable MD command takes (p4bg.simulate, p4bg.remd)."""

    system: str = option("alanine_dipeptide", "name under systems/ or a folder")
    seed: int = option(0)
    out: str = option(help="dataset folder, e.g. data/alanine_dipeptide_600K")
    resume: bool = option(False, "continue a killed run in --out")
    equilibration_ps: float = option(100.0, "not saved")
    platform: str = option("auto", "auto (measured), Reference, CPU, CUDA, OpenCL")
    workers: int = option(0, "parallel processes (default: one per core)")
    split: tuple[float, float, float] = option((0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    no_progress: bool = option(False)
    # testing hook: stop each replica or chain after this many chunks, as a kill would
    stop_after_chunks: int | None = option(None, hidden=True)
    stop_file: str | None = option(
        None, "stop after the current chunk once this file exists (the run resumes later like "
        "a killed one)", metavar="PATH")  # fmt: skip


def command_line(module: str) -> str:
    """This process's command line as ``python -m module ARGS`` (for the record)."""
    return " ".join([Path(sys.executable).name, "-m", module, *sys.argv[1:]])


def prepare_output(out: Path, plan: dict, keys: Sequence[str], resume: bool) -> dict | None:
    """Make ``out`` ready for the run ``plan`` describes; the old record if that run is complete
    (nothing to do), else None.

    A folder in use needs ``resume``, and then the same values of ``keys`` in its plan as in
    ``plan`` (the frames on disk must continue the same dynamics). Refusals are ``SystemExit``
    messages that say what to do.
    """
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise SystemExit(
                f"--out {out} exists and is not empty; add --resume to continue that run, "
                "or choose another --out"
            )
        try:
            old = load_metadata(out)
        except DatasetError as err:
            raise SystemExit(f"--resume: {err}") from err
        changed = [k for k in keys if old.get(k) != plan[k]]
        if changed:
            raise SystemExit(
                f"--resume: {out} was made with different {', '.join(changed)}; "
                "use the same options as the original run, or another --out"
            )
        if old.get("status") == "complete":  # nothing to do; keep its record as it is
            return old
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise SystemExit(
            f"--out {out}: cannot write there ({err.strerror}); choose another --out"
        ) from err
    return None


def start_record(
    out: Path, plan: dict, platform: str, rates: dict[str, float], command: str
) -> dict[str, Any]:
    """Write (and return) the record of a run that starts now: ``status`` running."""
    meta = {
        **plan,
        "platform": platform,
        "platform_steps_per_second": rates,
        "versions": versions(),
        "command": command,
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(out / "metadata.json", meta)
    return meta


def run_and_record(
    out: Path,
    meta: dict,
    jobs: Sequence[Any],
    run: Callable[..., dict],
    args: MDRunOptions,
    md_steps_per_frame: int,
) -> bool:
    """Run the jobs in the worker pool and add the outcome to ``meta`` (not written yet: the
    caller adds its estimates); whether every job finished. A finished run gets its
    ``split.json`` (contiguous time blocks of every replica, :func:`p4bg.data.make_split`).

    md_steps_per_frame: MD steps one saved frame costs over all its replicas (for the rates).
    """
    workers = args.workers or min(len(jobs), os.cpu_count() or 1)
    start = time.perf_counter()
    results = run_jobs(jobs, run, workers=workers, ps_per_frame=meta["save_every_ps"],
                       label=meta.get("progress_label", "MD"),
                       progress_bar=not args.no_progress)  # fmt: skip
    wall = time.perf_counter() - start
    finished = all(r["frames_done"] == j.frames for r, j in zip(results, jobs, strict=True))
    new_steps = sum(r["new_frames"] for r in results) * md_steps_per_frame
    meta.update(
        status="complete" if finished else "interrupted",
        wall_seconds=wall,
        steps_per_second_total=new_steps / wall if wall > 0 else math.nan,
        steps_per_second_per_replica=[r["steps_per_second"] for r in results],
        workers=workers,
    )
    if finished:
        write_json(out / "split.json", make_split([j.frames for j in jobs], tuple(args.split)))
    return finished
