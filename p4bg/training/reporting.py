"""What a training run reports, apart from the loop that produces it: config.toml, train.log,
metrics.csv and the progress bar.

config.toml and a rewritten metrics.csv are replaced atomically (p4bg.files), so a killed run
never leaves half of one; metrics.csv then grows by a row per logging step. The progress bar is
drawn only on a terminal: a log file or a batch system's output gets train.log's line per
interval instead of a redrawn bar per step. In a run of several processes only rank 0 writes:
the other ranks get a :class:`RunReporter` that writes nothing.
"""

from __future__ import annotations

import csv
import io
import logging
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from p4bg.files import write_atomic

__all__ = ["METRIC_COLUMNS", "MetricsCSV", "RunReporter"]

METRIC_COLUMNS = [
    "step", "phase", "loss", "nll", "kl", "val_nll", "val_nll_phi_pos", "val_nll_phi_neg",
    "val_ess", "val_ess_clipped", "val_logz_reverse", "val_logz_forward", "val_failures",
    "best_val_nll", "mean_u", "grad_norm", "lr", "w_e",
    "merges_accepted", "merges_skipped", "merges_forced", "merge_resets", "max_residual",
    "energy_failures", "skipped_steps", "clamped_coordinates", "seconds",
    "anneal_temperature", "anneal_ess",
    # target-energy evaluations (frames) so far, by phase (docs/design.md §5, "Cost")
    "evaluations_mixed", "evaluations_anneal", "evaluations_validation",
]  # fmt: skip


class MetricsCSV:
    """Appends one row per logging step to metrics.csv (header once; kept across resumes)."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        if path.exists() and resume_step > 0:  # drop rows written after the checkpoint
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            self._write(rows)
        elif not path.exists() or resume_step == 0:
            self._write([])

    def _write(self, rows: list[dict]) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.path, text.getvalue())

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, METRIC_COLUMNS).writerow({k: row.get(k, "") for k in METRIC_COLUMNS})


def _file_logger(path: Path) -> logging.Logger:
    log = logging.getLogger(f"p4bg.training.{path}")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    return log


class RunReporter:
    """The outputs of one training run in ``out``: config.toml (written at once), train.log,
    metrics.csv (rows after ``step`` dropped: a resumed run rewrites them) and a progress bar
    over ``total`` steps. ``active=False`` (ranks other than 0) writes nothing at all.
    Use as a context manager: the log's file and the bar are closed on the way out."""

    def __init__(self, out: Path, config_toml: str, step: int, total: int, active: bool = True,
                 progress: bool = True) -> None:  # fmt: skip
        self.active = active
        self.log: logging.Logger | None = None
        self.metrics: MetricsCSV | None = None
        if active:
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(out / "config.toml", config_toml)
            self.log = _file_logger(out / "train.log")
            self.metrics = MetricsCSV(out / "metrics.csv", step)
        drawn = active and progress and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=step, disable=not drawn, dynamic_ncols=True)

    def info(self, message: str, *args: Any) -> None:
        if self.log is not None:
            self.log.info(message, *args)

    def warning(self, message: str, *args: Any) -> None:
        if self.log is not None:
            self.log.warning(message, *args)

    def row(self, row: dict[str, Any]) -> None:
        """One metrics.csv row, and the bar's description."""
        if self.metrics is not None:
            self.metrics.write(row)
        self.bar.set_description(f"{row['phase']} loss {row['loss']:.3f}")

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.log is not None:
            for handler in self.log.handlers[:]:
                handler.close()
                self.log.removeHandler(handler)

    def __enter__(self) -> RunReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
