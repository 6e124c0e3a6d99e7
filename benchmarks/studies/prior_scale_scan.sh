#!/usr/bin/env bash
# Sample one trained run from a cooler prior N(0, τ²I) at several τ and score each against the
# run's own validation split (never the test split or the evaluation reference): the scan that
# chose the `reweight` preset's prior_scale. log q stays exact at every τ, so the weights stay
# exact; τ < 1 trades reverse ESS for sample energies nearer MD's.
#
#   bash benchmarks/studies/prior_scale_scan.sh runs/seeds/reweight_p4inv_s0             # τ = 0.94 … 1
#   TAUS="0.96 1.0" REF=data/alanine_dipeptide_600K_reference SPLIT=all \
#       bash benchmarks/studies/prior_scale_scan.sh RUN                           # against a reference
#
# Each τ gets its own folder RUN/tau<τ>/ (a copy of the checkpoint, its samples and report/);
# finished ones are skipped, so a killed scan continues when rerun.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
RUN=${1:?usage: bash benchmarks/studies/prior_scale_scan.sh RUN}
TAUS=${TAUS:-"0.94 0.95 0.96 0.97 0.98 1.0"}
N=${N:-100000}
SPLIT=${SPLIT:-val}
REF=${REF:-$($PY -c "import sys, tomllib; print(tomllib.load(open(sys.argv[1], 'rb'))['data'])" \
    "$RUN/config.toml")}
REPORT=report_${SPLIT}_$(basename "$REF")

for tau in $TAUS; do
    dir=$RUN/tau$tau
    mkdir -p "$dir"
    [ -f "$dir/checkpoint.pt" ] || cp "$RUN/checkpoint.pt" "$RUN/metrics.csv" "$dir/"
    # the copy is its own run folder: config.toml names it as the output
    sed "s#^out = .*#out = \"$dir\"#" "$RUN/config.toml" > "$dir/config.toml"
    [ -f "$dir/samples.json" ] && grep -q '"status": "complete"' "$dir/samples.json" \
        || $PY -m p4bg.sample "$dir" --n "$N" --prior-scale "$tau" --overwrite --no-progress
    [ -f "$dir/$REPORT/metrics.json" ] \
        || $PY -m p4bg.analyze "$dir" --reference "$REF" --split "$SPLIT" --out "$dir/$REPORT" \
            >/dev/null
done

echo "$RUN against $REF ($SPLIT split), $N samples per τ"
$PY - "$RUN" "$REPORT" $TAUS <<'PYEOF'
import json, sys
run, report, taus = sys.argv[1], sys.argv[2], sys.argv[3:]
print("| τ | reverse ESS | mean shift (kT) | median shift (kT) | ΔF reweighted (kT) | Rama KL rew. @floor |")
print("|---|---|---|---|---|---|")
for tau in taus:
    m = json.load(open(f"{run}/tau{tau}/{report}/metrics.json"))
    md, r = m["reference"], next(iter(m["models"].values()))
    print(f"| {tau} | {100 * r['reverse_ess']:.1f} % | {r['energy_shift_finite']:+.2f} | "
          f"{r['median_energy_shift']:+.2f} | {r['delta_f_reweighted']:.2f} ± "
          f"{r['delta_f_reweighted_err']:.2f} (MD {md['delta_f']:.2f} ± {md['delta_f_err']:.2f}) | "
          f"{r['kl_rama_reweighted_matched']:.3f} (floor {md['kl_rama_floor']:.3f}) |")
PYEOF
