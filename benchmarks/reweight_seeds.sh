#!/usr/bin/env bash
# docs/results.md §6's seed table (issue "Samples that reweight"): a preset × flow × seed
# grid, each run trained, sampled (100,000 samples) and scored against the independent
# reference. Every step resumes or is skipped when its output exists, so a killed campaign is
# continued by running the same command again.
#
#   bash benchmarks/reweight_seeds.sh                          # the whole grid, one run at a time
#   PRESETS=reweight FLOWS=swap SEEDS="0 1" bash benchmarks/reweight_seeds.sh
#   # two queues on the 2 cores, one thread each:
#   FLOWS=p4inv OMP_NUM_THREADS=1 bash benchmarks/reweight_seeds.sh &
#   FLOWS=swap  OMP_NUM_THREADS=1 bash benchmarks/reweight_seeds.sh &
#   python benchmarks/studies/runs_table.py runs/seeds/*/               # the side-by-side table
#
# Runs go to runs/seeds/<preset>_<flow>_s<seed>/, reports to .../report/ (samples at the run's
# sample_prior_scale) and .../tau<τ>/report_all_<reference>/ (samples at each τ in TAUS). The `paper` preset
# trains on its own 80,000-frame dataset (`python -m p4bg.simulate --ns 20 --replicas 2`);
# `reweight` and the spline presets on the 100 ns dataset; both are simulated first when missing
# (`--resume` skips finished ones). The spline models of docs/results.md §7:
#   PRESETS=spline FLOWS=p4inv TAUS= OMP_NUM_THREADS=1 bash benchmarks/reweight_seeds.sh &
#   PRESETS=spline FLOWS=swap  TAUS= OMP_NUM_THREADS=1 bash benchmarks/reweight_seeds.sh &
#   # the same flows with the reweight preset's energy phase, in runs/seeds/spline_<flow>_energy_s<seed>
#   PRESETS=spline FLOWS=p4inv TAUS= TRAIN_ARGS=--mixed_steps=2000 TAG=_energy \
#       OMP_NUM_THREADS=1 bash benchmarks/reweight_seeds.sh &
# Every run is also scored against the fresh reference REF2 (4 x 25 ns, seed 3, simulated when
# missing; REF2= skips it) into .../report_all_<REF2's name>/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REF=${REF:-data/alanine_dipeptide_600K_reference}
N=${N:-100000}
PRESETS=${PRESETS:-"reweight paper"}
FLOWS=${FLOWS:-"p4inv swap"}
SEEDS=${SEEDS:-"0 1 2"}
TAUS=${TAUS-"1.0 0.96"}  # prior scales sampled besides the run's own sample_prior_scale
REF2=${REF2-data/alanine_dipeptide_600K_reference_s3}
TRAIN_ARGS=${TRAIN_ARGS:-}  # extra --key=value overrides of new runs
TAG=${TAG:-}  # run folder suffix for those: runs/seeds/<preset>_<flow><TAG>_s<seed>

# Two queues started together must not simulate the same dataset twice: the datasets are made
# under one lock, the second queue then finds them complete.
mkdir -p data
exec 9>data/.reweight_seeds.lock
flock 9
case " $PRESETS " in *" paper "*)  # the paper preset's own 80,000-frame dataset
    $PY -m p4bg.simulate --ns 20 --save-every-ps 0.2 --replicas 2 --seed 0 \
        --out data/alanine_dipeptide_600K --resume --no-progress ;;
esac
case " $PRESETS " in *" reweight "*|*" spline"*)  # reweight, spline, spline_swap
    $PY -m p4bg.simulate --ns 100 --save-every-ps 0.04 --replicas 2 --seed 0 --chunk-frames 12500 \
        --out data/alanine_dipeptide_600K_100ns --resume --no-progress ;;
esac
[ -d "$REF" ] || $PY -m p4bg.simulate --ns 40 --save-every-ps 0.2 --replicas 4 --seed 1 \
    --out "$REF" --resume --no-progress
[ -z "$REF2" ] || [ -d "$REF2" ] || $PY -m p4bg.simulate --ns 100 --save-every-ps 0.5 --replicas 4 \
    --seed 3 --out "$REF2" --resume --no-progress
flock -u 9

for preset in $PRESETS; do
    for flow in $FLOWS; do
        for seed in $SEEDS; do
            run=runs/seeds/${preset}_${flow}${TAG}_s${seed}
            if [ -f "$run/checkpoint.pt" ]; then
                $PY -m p4bg.train --resume "$run" --no-progress
            else
                # shellcheck disable=SC2086  # TRAIN_ARGS is a list of overrides
                $PY -m p4bg.train --preset "$preset" --mixing "$flow" --seed "$seed" --out "$run" \
                    $TRAIN_ARGS --no-progress
            fi
            [ -f "$run/samples.json" ] && grep -q '"status": "complete"' "$run/samples.json" \
                || $PY -m p4bg.sample "$run" --n "$N" --overwrite --no-progress
            [ -f "$run/report/metrics.json" ] \
                || $PY -m p4bg.analyze "$run" --reference "$REF" --split all --out "$run/report"
            fresh=$run/report_all_$(basename "${REF2:-none}")
            [ -z "$REF2" ] || [ -f "$fresh/metrics.json" ] \
                || $PY -m p4bg.analyze "$run" --reference "$REF2" --split all --out "$fresh"
            # the same model from the prior N(0, τ²I) at other τ, against the same reference
            [ -z "$TAUS" ] || TAUS="$TAUS" REF="$REF" SPLIT=all N="$N" \
                bash benchmarks/studies/prior_scale_scan.sh "$run"
        done
    done
done
