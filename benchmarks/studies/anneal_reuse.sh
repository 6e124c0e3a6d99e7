#!/usr/bin/env bash
# Reused annealing draws (anneal_refill_every, docs/guide.md): the same 600 K model annealed to
# 300 K by the demo300 recipe with fresh draws every step, and with its draws reused so that the
# same energy evaluations buy 5-10x the optimizer steps. Each variant is scored by the reverse ESS
# of 100,000 fresh samples of its own at 300 K (no reference frames: nothing of a test split).
#
#   OMP_NUM_THREADS=1 bash benchmarks/studies/anneal_reuse.sh                 # the ff96 dipeptide
#   INIT=runs/bench/alanine_tetrapeptide/bg600 SYSTEM=alanine_tetrapeptide \
#       DATA=data/alanine_tetrapeptide_600K bash benchmarks/studies/anneal_reuse.sh
#
# INIT is a 600 K run (benchmark_system.py's bg600); each variant trains into OUT/NAME (default
# runs/studies/anneal_reuse_SYSTEM/NAME), resumes when killed and is skipped once sampled. The
# table at the end: steps, annealing evaluations (counted by the trainer), wall seconds, ESS.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
SYSTEM=${SYSTEM:-alanine_dipeptide_ff96}
INIT=${INIT:-runs/bench/$SYSTEM/bg600}
DATA=${DATA:-data/${SYSTEM}_600K}
OUT=${OUT:-runs/studies/anneal_reuse_$SYSTEM}
N=${N:-100000}
SEED=${SEED:-0}

# name: overrides of the demo300 preset (same stages, learning rate and final decay)
declare -A VARIANTS=(
    [fresh_1200]="--anneal_steps=1200"
    [fresh_6000]="--anneal_steps=6000"
    [reuse5_6000]="--anneal_steps=6000 --anneal_refill_every=5"
    [reuse25_6000]="--anneal_steps=6000 --anneal_refill_every=25 --anneal_samples=10240"
    [reuse10_12000]="--anneal_steps=12000 --anneal_refill_every=10"
    [reuse10_12000_lr1e-4]="--anneal_steps=12000 --anneal_refill_every=10 --anneal_lr=1e-4"
)
# reuse10_12000 (lr 3e-4) collapsed as reuse25_6000 did and was stopped at step 4,695 in the
# study (results.md §12); ORDER=reuse10_12000 runs it to the end
ORDER=${ORDER:-"fresh_1200 reuse5_6000 reuse25_6000 fresh_6000 reuse10_12000_lr1e-4"}

for name in $ORDER; do
    run=$OUT/$name
    if [ -f "$run/samples.json" ] && grep -q '"status": "complete"' "$run/samples.json"; then
        echo "$name: done before"
        continue
    fi
    if [ -f "$run/checkpoint.pt" ]; then
        $PY -m p4bg.train --resume "$run" --no-progress
    else
        # shellcheck disable=SC2086  # the overrides are words
        $PY -m p4bg.train --preset demo300 --system="$SYSTEM" --seed="$SEED" --data="$DATA" \
            --init="$INIT" --out "$run" --no-progress --val_every=1000 ${VARIANTS[$name]}
    fi
    $PY -m p4bg.sample "$run" --n-samples "$N" --seed "$SEED" --overwrite --no-progress
done

$PY - "$OUT" $ORDER <<'EOF'
import csv, json, sys
from pathlib import Path

import numpy as np

from analysis.weights import reverse_ess, reverse_ess_clipped

out, names = Path(sys.argv[1]), sys.argv[2:]
print("| variant | steps | refill every | draws per refill | annealing evaluations | "
      "training wall (s) | reverse ESS | clipped |")
print("|---|---|---|---|---|---|---|---|")
for name in names:
    run = out / name
    if not (run / "samples.npz").is_file():
        print(f"| {name} | not run |")
        continue
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    config = (run / "config.toml").read_text()
    get = lambda key: next(l.split("=")[1].strip() for l in config.splitlines()
                           if l.startswith(key + " "))
    with np.load(run / "samples.npz") as s:
        log_w = s["log_w"]
    print(f"| {name} | {rows[-1]['step']} | {get('anneal_refill_every')} | "
          f"{int(get('anneal_samples')):,} | {int(rows[-1]['evaluations_anneal']):,} | "
          f"{float(rows[-1]['seconds']):.0f} | {100 * reverse_ess(log_w):.1f} % | "
          f"{100 * reverse_ess_clipped(log_w):.1f} % |")
EOF
