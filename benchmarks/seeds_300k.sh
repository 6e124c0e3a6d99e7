#!/usr/bin/env bash
# docs/results.md §8 (issue "The field's standard temperature"): 300 K samplers from 600 K data,
# per seed: the 600 K spline model (runs/seeds/spline_p4inv_s<seed>, the `spline` preset, trained
# here when missing), the `spline300` annealing that starts from it, 100,000 samples, and the
# reports against the 300 K replica-exchange reference (ΔF by MBAR) and against plain 300 K MD
# (MD's effective samples per second). The cooled prior (the 600 K model sampled at
# τ = sqrt(300/600), weighted at 300 K) is scored beside it, for comparison. Every step resumes or
# is skipped when its output exists: a killed campaign continues with the same command.
#
#   bash benchmarks/seeds_300k.sh                                  # seeds 0 1 2, one at a time
#   SEEDS=0 OMP_NUM_THREADS=1 bash benchmarks/seeds_300k.sh &       # two queues, one thread each
#   SEEDS="1 2" OMP_NUM_THREADS=1 bash benchmarks/seeds_300k.sh &
#   python benchmarks/seeds_table.py --fill docs/results.md
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REF=${REF:-data/alanine_dipeptide_300K_remd}
MD=${MD:-data/alanine_dipeptide_300K_md}
N=${N:-100000}
SEEDS=${SEEDS:-"0 1 2"}
TRAIN_ARGS=${TRAIN_ARGS:-}  # extra --key=value overrides of the annealing runs
TAG=${TAG:-}  # run folder suffix for those: runs/seeds/spline300<TAG>_s<seed>
COOLED=${COOLED:-1}  # 0: skip the cooled-prior comparison
REMD_NS=${REMD_NS:-9}  # replica exchange: ns per temperature per chain
UMBRELLA_NS=${UMBRELLA_NS:-0.05}  # umbrella: ns per window

mkdir -p data
exec 9>data/.seeds_300k.lock
flock 9
$PY -m p4bg.simulate --ns 100 --save-every-ps 0.04 --replicas 2 --seed 0 --chunk-frames 12500 \
    --out data/alanine_dipeptide_600K_100ns --resume --no-progress
$PY -m p4bg.remd --ns "$REMD_NS" --chains 2 --n-temperatures 5 --exchange-every-ps 0.25 --seed 0 \
    --out "$REF" --resume --no-progress
$PY -m p4bg.simulate --ns 1 --replicas 2 --seed 7 --out data/alanine_dipeptide_600K_umbrella_check \
    --resume --no-progress
$PY -m p4bg.umbrella "$REF" --windows 18 --psi-windows 12 --k 100 --k-psi 50 --ns "$UMBRELLA_NS" \
    --save-every-ps 0.2 --equilibration-ps 10 \
    --start-frames data/alanine_dipeptide_600K_umbrella_check --no-progress
$PY -m p4bg.simulate --temperature 300 --ns 20 --save-every-ps 0.5 --replicas 2 --seed 5 \
    --out "$MD" --resume --no-progress
flock -u 9

for seed in $SEEDS; do
    base=runs/seeds/spline_p4inv_s${seed}
    if [ -f "$base/checkpoint.pt" ]; then
        $PY -m p4bg.train --resume "$base" --no-progress
    else
        $PY -m p4bg.train --preset spline --seed "$seed" --out "$base" --no-progress
    fi
    run=runs/seeds/spline300${TAG}_s${seed}
    if [ -f "$run/checkpoint.pt" ]; then
        $PY -m p4bg.train --resume "$run" --no-progress
    else
        # shellcheck disable=SC2086  # TRAIN_ARGS is a list of overrides
        $PY -m p4bg.train --preset spline300 --init "$base" --seed "$seed" --out "$run" \
            $TRAIN_ARGS --no-progress
    fi
    [ -f "$run/samples.json" ] && grep -q '"status": "complete"' "$run/samples.json" \
        || $PY -m p4bg.sample "$run" --n "$N" --overwrite --no-progress
    for ref in "$REF" "$MD"; do
        out=$run/report_all_$(basename "$ref")
        [ -f "$out/metrics.json" ] \
            || $PY -m p4bg.analyze "$run" --reference "$ref" --split all --out "$out"
    done
    # the cooled prior: the 600 K model itself, τ = sqrt(300/600), weighted at 300 K
    [ "$COOLED" = 1 ] || continue
    cooled=runs/seeds/spline_cooled300_s${seed}
    if [ ! -f "$cooled/samples.json" ] || ! grep -q '"status": "complete"' "$cooled/samples.json"; then
        mkdir -p "$cooled"
        cp "$base/checkpoint.pt" "$base/config.toml" "$cooled/"
        $PY -m p4bg.sample "$cooled" --n "$N" --overwrite --no-progress --target-temperature 300 \
            --prior-scale 0.7071
    fi
    for ref in "$REF" "$MD"; do
        out=$cooled/report_all_$(basename "$ref")
        [ -f "$out/metrics.json" ] \
            || $PY -m p4bg.analyze "$cooled" --reference "$ref" --split all --out "$out"
    done
done
