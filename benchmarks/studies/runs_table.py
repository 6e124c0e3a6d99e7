"""Side-by-side table of training runs from their own metrics.csv and config.toml: what each run
was given (frames, steps, schedule) and what its validation saw (NLL best/final, the train–val
gap, reverse ESS of fresh samples, mean sample energy, wall time).

    python benchmarks/studies/runs_table.py runs/study_* [--markdown]

The reverse ESS of one validation (4,096 samples) is noisy, so the table shows the median of the
last three validations beside the last one. No torch: it reads text files only.
"""

from __future__ import annotations

import argparse
import csv
import math
import tomllib
from pathlib import Path


def _float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def summarise(run: Path) -> dict[str, object]:
    """One row of the table for the run folder ``run``."""
    config = tomllib.loads((run / "config.toml").read_text())
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{run}/metrics.csv has no rows yet")
    val = [r for r in rows if r.get("val_nll") and not math.isnan(_float(r["val_nll"]))]
    nll_rows = [r for r in rows if r.get("phase") == "nll"]
    best = min(val, key=lambda r: _float(r["val_nll"])) if val else None
    last = val[-1] if val else None
    ess = [_float(r.get("val_ess", "")) for r in val]
    tail = sorted(e for e in ess[-3:] if not math.isnan(e))
    train_tail = [_float(r["nll"]) for r in nll_rows[-5:]] if nll_rows else []
    train_nll = sum(train_tail) / len(train_tail) if train_tail else math.nan
    return {
        "run": run.name,
        "flow": config.get("mixing", config.get("flow")),
        "train_fraction": config.get("train_fraction", 1.0),
        "train_stride": config.get("train_stride", 1),
        "steps": f"{config.get('nll_steps')}+{config.get('mixed_steps')}",
        "schedule": config.get("lr_schedule", "constant"),
        "weight_decay": config.get("weight_decay", 0.0),
        "step": int(rows[-1]["step"]),
        "train_nll_end": train_nll,
        "best_val": _float(best["val_nll"]) if best else math.nan,
        "best_step": int(best["step"]) if best else 0,
        "final_val": _float(last["val_nll"]) if last else math.nan,
        "ess_last": ess[-1] if ess else math.nan,
        "ess_median3": tail[len(tail) // 2] if tail else math.nan,
        "mean_u": _float(last.get("mean_u", "")) if last else math.nan,
        "seconds": _float(rows[-1]["seconds"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    header = ("run | flow | train frac/stride | steps | lr | wd | at step | train NLL (NLL phase "
              "end) | best val NLL (step) | final val NLL | final − best | reverse ESS last / "
              "median of 3 | mean u (kT) | wall s")  # fmt: skip
    print("| " + header + " |")
    print("|" + "---|" * (header.count("|") + 1))
    for run in args.runs:
        s = summarise(run)
        print(
            f"| {s['run']} | {s['flow']} | {s['train_fraction']:g}/{s['train_stride']} | "
            f"{s['steps']} | {s['schedule']} | {s['weight_decay']:g} | {s['step']:,} | "
            f"{s['train_nll_end']:.2f} | {s['best_val']:.2f} ({s['best_step']:,}) | "
            f"{s['final_val']:.2f} | {s['final_val'] - s['best_val']:.2f} | "
            f"{100 * s['ess_last']:.2f} % / {100 * s['ess_median3']:.2f} % | "
            f"{s['mean_u']:.2f} | {s['seconds']:,.0f} |"
        )


if __name__ == "__main__":
    main()
