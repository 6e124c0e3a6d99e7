"""Mean ± spread over seeds of the reweighting metrics, one column per model, from the reports of
`benchmarks/reweight_seeds.sh` (runs/seeds/<preset>_<flow>_s<seed>/): the table of
docs/results.md §6.

    python benchmarks/seeds_table.py runs/seeds                       # samples at each run's τ
    python benchmarks/seeds_table.py runs/seeds \
        --report tau1.0/report_all_alanine_dipeptide_600K_reference  # samples at τ = 1
    # the four couplings x mixings at τ = 1 (docs/results.md §7; reports copied flat there)
    python benchmarks/seeds_table.py docs/results/seeds --models reweight_p4inv reweight_swap \
        spline_p4inv spline_swap --report tau1.0 .
    python benchmarks/seeds_table.py --fill docs/results.md   # every marked table there

"±" is the sample standard deviation over the seeds; [min, max] follows it. A model column
needs every listed seed's report; missing ones are named. No torch: it reads text files only.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shlex
import statistics
from pathlib import Path

# (label, how to get the value from (model metrics, reference metrics, training rows), format)
METRICS = [
    ("reverse ESS, unclipped (%)", lambda m, r, t: 100 * m["reverse_ess"], "{:.1f}"),
    ("reverse ESS, clipped top 1e-4 (%)", lambda m, r, t: 100 * m["reverse_ess_clipped"], "{:.1f}"),
    ("mean energy shift, finite samples (kT)", lambda m, r, t: m["energy_shift_finite"], "{:+.2f}"),
    ("median energy shift (kT)", lambda m, r, t: m["median_energy_shift"], "{:+.2f}"),
    ("ΔF reweighted (kT)", lambda m, r, t: m["delta_f_reweighted"], "{:.2f}"),
    ("ΔF reweighted − reference (kT)", lambda m, r, t: m["delta_f_reweighted"] - r["delta_f"],
     "{:+.2f}"),
    ("Ramachandran KL reweighted, floor size", lambda m, r, t: m["kl_rama_reweighted_matched"],
     "{:.3f}"),
    ("… ÷ MD floor", lambda m, r, t: m["kl_rama_reweighted_matched"] / r["kl_rama_floor"],
     "{:.2f}"),
    ("log Z gap forward − reverse (nat)", lambda m, r, t: m["log_z_gap"], "{:+.3f}"),
    ("share above max training energy (%)", lambda m, r, t: 100 * m["high_energy_fraction"],
     "{:.2f}"),
    ("failed energies", lambda m, r, t: m["n_failed_energies"], "{:.0f}"),
    ("D-form samples (%)", lambda m, r, t: 100 * m.get("d_form_fraction", math.nan), "{:.3f}"),
    ("final − best val NLL (nat)", lambda m, r, t: final_minus_best(t), "{:.2f}"),
    ("training wall time (h)", lambda m, r, t: float(t[-1]["seconds"]) / 3600, "{:.2f}"),
    ("BG value", lambda m, r, t: m["bg_value"], "{:,.0f}"),
]  # fmt: skip


def final_minus_best(rows: list[dict]) -> float:
    val = [float(r["val_nll"]) for r in rows if r.get("val_nll")]
    return val[-1] - min(val) if val else math.nan


def load(run: Path, report: str) -> tuple[dict, dict, list[dict]]:
    path = run / report / "metrics.json"
    data = json.loads(path.read_text())
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return next(iter(data["models"].values())), data["reference"], rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path, nargs="?",
                        help="folder of <preset>_<flow>_s<seed> runs")  # fmt: skip
    parser.add_argument("--report", nargs="+", default=["report"],
                        help="report folder inside each run; with several, each run's first "
                        "that exists")  # fmt: skip
    parser.add_argument("--models", nargs="+", default=None,
                        help="only these <preset>_<flow> models, in this order")  # fmt: skip
    parser.add_argument("--fill", type=Path, default=None, metavar="MARKDOWN",
                        help="instead of printing: rewrite every table of this file between "
                        "'<!-- NAME table: python benchmarks/seeds_table.py ARGS -->' and "
                        "'<!-- end NAME table -->' from its own ARGS")  # fmt: skip
    return parser


def table(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(notes on which runs and reports were read, the markdown table's lines)."""
    groups: dict[str, list[Path]] = {}
    for run in sorted(args.root.iterdir()):
        match = re.fullmatch(r"(.+)_s(\d+)", run.name)
        if match and run.is_dir():
            groups.setdefault(match.group(1), []).append(run)
    if not groups:
        raise SystemExit(f"{args.root}: no <preset>_<flow>_s<seed> run folders")
    if args.models:
        unknown = [m for m in args.models if m not in groups]
        if unknown:
            raise SystemExit(f"{args.root}: no runs of {unknown}; models there: {sorted(groups)}")
        groups = {m: groups[m] for m in args.models}

    def report_of(run: Path) -> str | None:
        return next((r for r in args.report if (run / r / "metrics.json").is_file()), None)

    notes: list[str] = []
    columns: dict[str, list[list[float]]] = {}
    for model, runs in groups.items():
        have = [r for r in runs if report_of(r)]
        missing = sorted(set(runs) - set(have))
        if missing:
            notes.append(f"{model}: no {' or '.join(args.report)}/metrics.json in "
                         f"{', '.join(m.name for m in missing)}")  # fmt: skip
        if have:
            used = sorted({report_of(r) for r in have})
            notes.append(f"{model}: {', '.join(r.name for r in have)} from {', '.join(used)}")
            loaded = [load(r, report_of(r)) for r in have]
            columns[f"{model} ({len(have)} seed{'s' if len(have) > 1 else ''})"] = [
                [get(*x) for x in loaded] for _, get, _ in METRICS
            ]
    lines = [f"| metric | {' | '.join(columns)} |", f"|---|{'---|' * len(columns)}"]
    for i, (label, _, fmt) in enumerate(METRICS):
        cells = []
        for values in columns.values():
            v = values[i]
            if any(math.isnan(x) for x in v):  # a report from before the metric existed
                cells.append("—")
                continue
            mean = statistics.fmean(v)
            if len(v) > 1:
                sd = statistics.stdev(v)
                cells.append(f"{fmt.format(mean)} ± {fmt.format(sd).lstrip('+')} "
                             f"[{fmt.format(min(v))}, {fmt.format(max(v))}]")  # fmt: skip
            else:
                cells.append(fmt.format(mean))
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return notes, lines


_MARKED = re.compile(
    r"(<!-- (?P<name>[\w-]+) table: python benchmarks/seeds_table.py (?P<args>[^>]*?) -->\n)"
    r".*?(<!-- end (?P=name) table -->)",
    re.S,
)


def fill(path: Path, parser: argparse.ArgumentParser) -> None:
    """Regenerate the marked tables of a markdown file in place (docs/results.md)."""
    text = path.read_text()

    def redo(m: re.Match) -> str:
        args = parser.parse_args(shlex.split(m.group("args")))
        if args.root is None or args.fill is not None:
            raise SystemExit(f"{path}: table {m.group('name')!r}: give a root and no --fill")
        notes, lines = table(args)
        print(f"{m.group('name')} table: " + "; ".join(notes))
        return m.group(1) + "\n".join(lines) + "\n" + m.group(4)

    new, n = _MARKED.subn(redo, text)
    if n == 0:
        raise SystemExit(f"{path}: no '<!-- NAME table: python benchmarks/seeds_table.py ... -->'")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(path)
    print(f"{path}: {n} table(s) rewritten")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fill is not None:
        fill(args.fill, parser)
        return
    if args.root is None:
        parser.error("give the runs folder (or --fill MARKDOWN)")
    notes, lines = table(args)
    print("\n".join(notes))
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
