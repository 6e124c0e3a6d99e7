#!/usr/bin/env bash
# The `quick` preset (make demo's recipe) trained with each target energy, seeds 0 and 1: does
# TorchEnergy train to the same metrics as the OpenMM workers, within seed noise? Each run is
# trained, sampled (20,000) and scored against the demo dataset's test split; every step is
# skipped or resumed when its output exists, so a killed comparison continues with the same command.
#
#   bash benchmarks/studies/quick_energy_compare.sh
#   ENERGIES=torch SEEDS=0 OMP_NUM_THREADS=1 bash benchmarks/studies/quick_energy_compare.sh &   # queues
#   python benchmarks/seeds_table.py runs/quick_energy          # mean ± sd over the seeds
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/demo_alanine_dipeptide_600K}
ENERGIES=${ENERGIES:-"torch openmm"}
SEEDS=${SEEDS:-"0 1"}
$PY -m p4bg.simulate --ns 4 --save-every-ps 0.04 --out "$DATA" --resume --no-progress
for energy in $ENERGIES; do
    for seed in $SEEDS; do
        run=runs/quick_energy/quick_${energy}_s${seed}
        if [ -f "$run/checkpoint.pt" ]; then
            $PY -m p4bg.train --resume "$run" --no-progress
        else
            $PY -m p4bg.train --preset quick --mixing p4inv --data "$DATA" --energy="$energy" \
                --seed "$seed" --out "$run" --no-progress
        fi
        [ -f "$run/samples.json" ] && grep -q '"status": "complete"' "$run/samples.json" \
            || $PY -m p4bg.sample "$run" --n 20000 --overwrite --no-progress
        [ -f "$run/report/metrics.json" ] \
            || $PY -m p4bg.analyze "$run" --reference "$DATA" --energy "$energy" --out "$run/report"
    done
done
