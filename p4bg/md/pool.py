"""The worker pool: MD jobs (replicas, chains, windows) in parallel processes, one progress bar
on a terminal, and a log line a minute where there is none (a file, a pipe, ``--no-progress``).

Each job runs in a fresh interpreter (``spawn``: no OpenMM or thread state inherited) and talks
to the pool through a queue: frames done, its result, or its traceback. A job that fails stops
the whole run with that traceback; a pool that is killed leaves workers that notice it at their
next report and stop without writing anything partial.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

__all__ = ["Progress", "run_jobs"]

REPORT_EVERY = 50  # frames between progress messages from a worker
LOG_EVERY_S = 60.0  # seconds between progress lines when no bar is drawn


class Progress:
    """A worker's channel to the pool: frames done (in batches of ``every``), and a check that
    the pool still lives. With ``queue`` None (a job run in the calling process) it is silent."""

    def __init__(self, queue: Any, index: int, label: str, every: int = REPORT_EVERY) -> None:
        self.queue, self.index, self.label, self.every = queue, index, label, every
        self.parent = os.getppid()
        self.pending = 0

    def resumed(self, frames: int) -> None:
        """Frames found on disk from an earlier run (they fill the bar at once)."""
        if self.queue is not None and frames:
            self.queue.put(("resumed", self.index, frames))

    def frame(self) -> None:
        """One more frame; every ``every`` frames, tell the pool and stop if it is gone."""
        self.pending += 1
        if self.queue is not None and self.pending == self.every:
            self.flush()
            if os.getppid() != self.parent:  # the pool was killed: stop, write nothing partial
                raise SystemExit(f"{self.label}: parent process gone, stopping")

    def flush(self) -> None:
        """Report the frames not reported yet (at the end of a chunk)."""
        if self.queue is not None and self.pending:
            self.queue.put(("frames", self.index, self.pending))
        self.pending = 0


def _work(run: Callable[[Any, Progress], dict], job: Any, queue: Any) -> None:
    """A worker process's body: run one job, send back its result or its traceback."""
    try:
        progress = Progress(queue, job.index, f"{job.kind} {job.index}")
        queue.put(("done", job.index, run(job, progress)))
    except BaseException:
        queue.put(("error", job.index, traceback.format_exc()))


def _start_with(proc: Any, env: dict[str, str]) -> None:
    """Start a spawned process with ``env`` added to the environment it inherits, leaving this
    process's own environment as it was."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_jobs(
    jobs: Sequence[Any],
    run: Callable[[Any, Progress], dict],
    *,
    workers: int,
    ps_per_frame: float,
    label: str = "MD",
    progress_bar: bool = True,
    log_every_s: float = LOG_EVERY_S,
) -> list[dict]:
    """Run every job as ``run(job, progress)`` in up to ``workers`` processes; their results in
    the order of ``jobs``. A worker's error is raised here as a ``RuntimeError`` with its
    traceback.

    jobs: picklable, with ``index`` (unique), ``kind`` ("replica", "chain", "window") and
    ``frames`` (for the bar); run: a module-level function (it is pickled by name);
    ps_per_frame: MD time per frame, for the bar's ns/day. The bar is drawn on a terminal
    only (``progress_bar`` and stderr a tty); otherwise a line goes to stderr every
    ``log_every_s`` seconds: frames done, ns/day, the time left.
    """
    ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited OpenMM or thread state
    # OpenMM's CPU platform takes every core in each process unless told: share them out
    # among the processes that run at once (a setting of the user's own is kept); set in the
    # children's environment only
    at_once = max(1, min(workers, len(jobs)))
    threads = os.environ.get("OPENMM_CPU_THREADS") or str(max(1, (os.cpu_count() or 1) // at_once))
    queue: Any = ctx.Queue()
    pending = list(jobs)
    kinds = {job.index: job.kind for job in jobs}
    running: dict[int, Any] = {}
    results: dict[int, dict] = {}
    total = sum(j.frames for j in jobs)
    drawn = progress_bar and sys.stderr.isatty()
    bar = tqdm(total=total, unit="frame", disable=not drawn, dynamic_ncols=True, desc=label)
    start = last_line = time.perf_counter()
    new_frames = done_frames = 0
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                proc = ctx.Process(target=_work, args=(run, job, queue), daemon=True)
                _start_with(proc, {"OPENMM_CPU_THREADS": threads})
                running[job.index] = proc
            try:
                kind, index, payload = queue.get(timeout=1.0)
            except queue_module.Empty:
                for index, proc in list(running.items()):
                    if not proc.is_alive() and proc.exitcode not in (0, None):
                        raise RuntimeError(
                            f"{kinds[index]} {index}: worker died (exit code {proc.exitcode})"
                        ) from None
                continue
            if kind == "frames":
                new_frames += payload
                done_frames += payload
                bar.update(payload)
                now = time.perf_counter()
                ns_per_day = new_frames * ps_per_frame * 1e-3 / ((now - start) / 86400.0)
                bar.set_postfix_str(f"{ns_per_day:,.0f} ns/day")
                if not drawn and now - last_line >= log_every_s:
                    last_line = now
                    left = (total - done_frames) * (now - start) / new_frames
                    print(f"{label}: {done_frames:,}/{total:,} frames "
                          f"({100 * done_frames / total:.0f} %), {ns_per_day:,.0f} ns/day, "
                          f"about {left / 60:.0f} min left", file=sys.stderr,
                          flush=True)  # fmt: skip
            elif kind == "resumed":
                done_frames += payload
                bar.update(payload)
            elif kind == "done":
                results[index] = payload
                running.pop(index).join()
            elif kind == "error":
                raise RuntimeError(f"{kinds[index]} {index} failed:\n{payload}")
    finally:
        bar.close()
        for proc in running.values():
            proc.terminate()
        for proc in running.values():
            proc.join(timeout=10)
        queue.close()
        queue.join_thread()
    return [results[j.index] for j in jobs]
