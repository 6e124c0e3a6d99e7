"""Reverse ESS against what bought it: energy evaluations, optimizer steps, flow size (issue 30's
"one plot per system" that locates a missed target).

    python benchmarks/ess_budget.py RUN [RUN ...] --out docs/results/ess_budget_SYSTEM.png
    python benchmarks/ess_budget.py runs/studies/anneal_reuse_alanine_dipeptide_ff96/* \\
        --labels fresh_1200 ...

Each RUN is a sampled run folder (``samples.npz`` from ``p4bg.sample``). Its cost is the whole
chain that made it: a run started from another (``init``) adds that run's, back to the first,
whose dataset's MD is counted too (p4bg.demo_report.generator_evaluations: the trainer's own
counts where the runs have them). The reverse ESS is of the run's samples, unclipped and with
the top 1e-4 of the weights clipped. Prints a markdown table (evaluations by part, steps,
trainable parameters, ESS) and draws ESS against evaluations and against steps, one point per
run, labelled.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from analysis.weights import reverse_ess, reverse_ess_clipped


def chain(run: Path) -> list[Path]:
    """The runs that made ``run``, first to last (following each one's ``init``)."""
    from p4bg.runs import read_config

    runs = [run]
    while True:
        config, _ = read_config(runs[0])
        if not config.init:
            return runs
        parent = Path(config.init)
        if parent in runs:
            raise SystemExit(f"ess_budget: {run}: the runs' init form a loop at {parent}")
        runs.insert(0, parent)


def run_budget(run: Path) -> dict[str, Any]:
    """ESS and cost of one sampled run."""
    from p4bg.demo_report import generator_evaluations
    from p4bg.flows import count_parameters
    from p4bg.runs import CHECKPOINT, load_run, read_checkpoint, read_config

    samples = run / "samples.npz"
    if not samples.is_file():
        raise SystemExit(f"ess_budget: {run} has no samples.npz; sample it first: python -m "
                         f"p4bg.sample {run} --n-samples 100000")  # fmt: skip
    with np.load(samples) as s:
        log_w = s["log_w"]
    runs = chain(run)
    first, _ = read_config(runs[0])
    counts = generator_evaluations(Path(first.data), runs, len(log_w))
    steps = sum(int(read_checkpoint(r / CHECKPOINT, ("step",))["step"]) for r in runs)
    loaded = load_run(run, device="cpu")
    return {
        "run": str(run),
        "evaluations": counts,
        "steps": steps,
        "parameters": count_parameters(loaded.bg.flow)["total"],
        "n_samples": len(log_w),
        "reverse_ess": reverse_ess(log_w),
        "reverse_ess_clipped": reverse_ess_clipped(log_w),
    }


def table(rows: list[dict[str, Any]], labels: list[str]) -> str:
    """Markdown: one line per run."""
    lines = ["| run | MD | annealing | validation | other | all | steps | parameters | "
             "reverse ESS | clipped |", "|" + "---|" * 10]  # fmt: skip
    for label, r in zip(labels, rows, strict=True):
        c = r["evaluations"]
        md = next(v for k, v in c.items() if k.endswith("MD"))
        other = c["generator, all"] - md - c["annealing"] - c["validation"]
        lines.append(f"| {label} | {md:,} | {c['annealing']:,} | {c['validation']:,} | "
                     f"{other:,} | {c['generator, all']:,} | {r['steps']:,} | "
                     f"{r['parameters']:,} | {100 * r['reverse_ess']:.1f} % | "
                     f"{100 * r['reverse_ess_clipped']:.1f} % |")  # fmt: skip
    return "\n".join(lines)


def plot(path: Path, rows: list[dict[str, Any]], labels: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    ess = [100 * r["reverse_ess"] for r in rows]
    for ax, key, name in ((axes[0], "evaluations", "energy evaluations, MD included"),
                          (axes[1], "steps", "optimizer steps, all stages")):  # fmt: skip
        x = [r[key]["generator, all"] if key == "evaluations" else r[key] for r in rows]
        ax.scatter(x, ess)
        for xi, yi, label in zip(x, ess, labels, strict=True):
            ax.annotate(label, (xi, yi), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("reverse ESS at the target temperature (%)")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one per run (default: the run folders' names)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="the figure (.png)")
    parser.add_argument("--json", type=Path, default=None, help="the rows, as JSON")
    parser.add_argument("--title", default="reverse ESS against its cost")
    args = parser.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    from p4bg.config import ConfigError

    try:
        rows = [run_budget(r) for r in args.runs]
    except ConfigError as err:  # a folder that is not a run, or a run without its checkpoint
        raise SystemExit(f"ess_budget: {err}") from err
    print(table(rows, labels))
    if args.json:
        args.json.write_text(json.dumps(dict(zip(labels, rows, strict=True)), indent=1) + "\n")
    if args.out:
        plot(args.out, rows, labels, args.title)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
