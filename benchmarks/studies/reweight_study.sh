#!/usr/bin/env bash
# The measurements behind the `reweight` preset (issue "Samples that reweight"), all on one
# 100 ns dataset saved every 0.04 ps (2 replicas x 50 ns, 2,500,000 frames) and scored against
# the independent reference (4 replicas x 10 ns, own seeds, never trained on):
#
#   data volume   the same recipe (STUDY_STEPS = 8,000 NLL steps, cosine-decayed lr) on
#                   16 ns every 0.2 ps  (train_fraction 0.2, stride 5:    80,000 frames; the
#                                        training part of the old 20 ns default)
#                   16 ns every 0.04 ps (train_fraction 0.2, stride 1:   400,000; denser saving)
#                   80 ns every 0.2 ps  (train_fraction 1,   stride 5:   400,000; longer runs)
#                   80 ns every 0.04 ps (train_fraction 1,   stride 1: 2,000,000; both)
#   recipe        the paper's constant lr against the cosine schedule on the old data volume
#   flow size     conditioners of hidden width 128 instead of 60, on all 2,000,000 frames
#   energy phase  2,000 mixed steps at lr 1e-4, w_e/w_l = 1 and 0.25, from the 2,000,000-frame
#                 model
#
#   bash benchmarks/studies/reweight_study.sh                 # all of it; reruns resume or skip
#   RUNS="data_80ns_0.04ps" bash benchmarks/studies/reweight_study.sh
#   python benchmarks/studies/runs_table.py runs/study/*      # the side-by-side table
#
# Every training resumes after a kill (--resume); samples and reports are redone only when
# missing. Runs go to runs/study/, reports to runs/study/<run>/report/.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DATA=data/alanine_dipeptide_600K_100ns
REF=data/alanine_dipeptide_600K_reference
STEPS=${STUDY_STEPS:-8000}
N=${N:-100000}
ALL="data_16ns_0.2ps data_16ns_0.04ps data_80ns_0.2ps data_80ns_0.04ps recipe_16ns_0.2ps_constant
     size_80ns_0.04ps_hidden128 energy_from_80ns_0.04ps energy025_from_80ns_0.04ps"
RUNS=${RUNS:-$ALL}

$PY -m p4bg.simulate --ns 100 --save-every-ps 0.04 --replicas 2 --seed 0 --chunk-frames 12500 \
    --out "$DATA" --resume --no-progress
$PY -m p4bg.simulate --ns 40 --save-every-ps 0.2 --replicas 4 --seed 1 --out "$REF" --resume \
    --no-progress

args_of() {
    local common="--nll_steps=$STEPS --mixed_steps=0 --val_every=250 --val_frames=20000"
    case $1 in
        data_16ns_0.2ps) echo "$common --lr_schedule=cosine --train_fraction=0.2 --train_stride=5" ;;
        data_16ns_0.04ps) echo "$common --lr_schedule=cosine --train_fraction=0.2" ;;
        data_80ns_0.2ps) echo "$common --lr_schedule=cosine --train_stride=5" ;;
        data_80ns_0.04ps) echo "$common --lr_schedule=cosine" ;;
        recipe_16ns_0.2ps_constant) echo "$common --train_fraction=0.2 --train_stride=5" ;;
        size_80ns_0.04ps_hidden128) echo "$common --lr_schedule=cosine --hidden=128" ;;
        energy_from_80ns_0.04ps) echo "--init=runs/study/data_80ns_0.04ps --nll_steps=0 \
            --mixed_steps=2000 --mixed_lr=1e-4 --lr_schedule=cosine --energy_weight_ratio=1.0 \
            --energy_ramp_steps=200 --val_every=250 --val_frames=20000" ;;
        energy025_from_80ns_0.04ps) echo "--init=runs/study/data_80ns_0.04ps --nll_steps=0 \
            --mixed_steps=2000 --mixed_lr=1e-4 --lr_schedule=cosine --energy_weight_ratio=0.25 \
            --energy_ramp_steps=200 --val_every=250 --val_frames=20000" ;;
        *) echo "unknown study run $1" >&2; exit 2 ;;
    esac
}

for name in $RUNS; do args_of "$name" >/dev/null; done  # every name known before any training
for name in $RUNS; do
    run=runs/study/$name
    args=$(args_of "$name")
    if [ -f "$run/checkpoint.pt" ]; then
        $PY -m p4bg.train --resume "$run" --no-progress
    else
        # shellcheck disable=SC2046
        $PY -m p4bg.train --preset paper --mixing p4inv --data "$DATA" --out "$run" --no-progress \
            $args
    fi
    [ -f "$run/samples.json" ] && grep -q '"status": "complete"' "$run/samples.json" \
        || $PY -m p4bg.sample "$run" --n "$N" --overwrite --no-progress
    [ -f "$run/report/metrics.json" ] \
        || $PY -m p4bg.analyze "$run" --reference "$REF" --split all --out "$run/report"
done
$PY benchmarks/studies/runs_table.py runs/study/*/
