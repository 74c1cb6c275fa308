#!/usr/bin/env bash
# Reproduce docs/results.md (findings F1-F7 at small scale) on ../shared/corpus.
#   bash examples/reproduce.sh [RUNS_DIR] [forest|sweeps|all]
# "forest" runs F1 F2 F4 F5 F7, "sweeps" runs F3 and F6; the two halves can run side by side
# in two shells. Every step resumes: re-running skips what is finished. Ends with one
# side-by-side report in RUNS_DIR/report/report.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
runs="${1:-runs}"
part="${2:-all}"
btm="${BTM:-btm}"
mkdir -p "$runs"

forest() {
    "$btm" run "$here/btm-forest.yaml" --run-dir "$runs/btm-forest" --no-progress
    # F5: top-k for k = 1..6 costs only mixing over the scores cached by the run's eval.
    "$btm" eval "$runs/btm-forest" --methods topk_prior --top-k 1,2,3,4,5,6
    "$btm" run "$here/grow.yaml" --run-dir "$runs/grow-posterior" --no-progress
    "$btm" run "$here/grow.yaml" --run-dir "$runs/grow-seed" --no-progress \
        --set branching.rule=seed --set name=grow-seed
    # F7: the new expert's starting point itself (init.pt, before training) on its domain.
    "$btm" eval "$runs/f7-init" --data "$runs/grow-posterior/data" --domains fiction --methods expert \
        --experts "posterior=$runs/grow-posterior/experts/fiction/init.pt,seed=$runs/grow-seed/experts/fiction/init.pt"
}

sweeps() {
    for k in 1 2 4 8; do
        "$btm" run "$here/cbtm.yaml" --run-dir "$runs/cbtm$k" --no-progress \
            --set clusters.k="$k" --set name="cbtm$k"
    done
    # F3: seed fraction 0.5 is btm-forest's own forest (same training settings).
    for sf in 0 10 30 70 90; do
        "$btm" run "$here/seed-fraction.yaml" --run-dir "$runs/sf$sf" --no-progress \
            --set budget.seed_fraction="0.$sf" --set name="sf$sf"
    done
}

case "$part" in
    forest) forest ;;
    sweeps) sweeps ;;
    all) forest; sweeps ;;
    *) echo "unknown part '$part': expected forest, sweeps or all" >&2; exit 2 ;;
esac
if [ "$part" = all ]; then
    "$btm" report "$runs"/btm-forest "$runs"/grow-* "$runs"/cbtm* "$runs"/sf* --out "$runs/report"
fi
