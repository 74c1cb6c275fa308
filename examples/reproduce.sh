#!/usr/bin/env bash
# Reproduce docs/results.md (findings F1-F9, the prior estimators and Branch-Train-MiX at small
# scale) on ../shared/corpus.
#   bash examples/reproduce.sh [RUNS_DIR] [forest|grow|sweeps|moe|all]
# "forest" runs F1 F2 F4 F5 F8 F9 and the prior estimators, "grow" runs F7, "sweeps" runs F3 and
# F6, "moe" the Branch-Train-MiX comparison (docs/moe.md); the parts can run side by side in
# separate shells. Every step resumes: re-running skips what is finished. Ends with one
# side-by-side report in RUNS_DIR/report/report.md.
#
# Seeds and sizes (docs/results.md, method):
#   SEEDS="1 2 3"  reruns every finding once per seed (--set seed=S) into RUN.seedS run
#                  directories; `btm report` groups runs that differ only in seed and shows
#                  mean, std and min-max. Unset: one run per finding, as before (seed 1, the
#                  configs' own seed, in the plain RUN directories).
#   SIZES="tiny small"  also runs F1, F2 and F3 (btm-forest and the seed-fraction sweep) with
#                  each preset (--set model.preset=P) into RUN.P[.seedS]; tiny keeps the plain
#                  names. Same corpus and token budget at every size (the paper's rule).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
runs="${1:-runs}"
part="${2:-all}"
btm="${BTM:-btm}"
seeds="${SEEDS:-}"
sizes="${SIZES:-tiny}"
mkdir -p "$runs"

# run_dir BASE SIZE SEED: the run directory of one repeat ("" seed: no suffix).
run_dir() {
    local dir="$runs/$1"
    [ "$2" = tiny ] || dir="$dir.$2"
    [ -z "$3" ] || dir="$dir.seed$3"
    echo "$dir"
}

# btm_run CONFIG DIR SIZE SEED [--set ...]: `btm run`, resumable, with the size and seed set.
btm_run() {
    local config="$1" dir="$2" size="$3" seed="$4"
    shift 4
    local extra=()
    [ "$size" = tiny ] || extra+=(--set model.preset="$size")
    [ -z "$seed" ] || extra+=(--set seed="$seed")
    "$btm" run "$here/$config" --run-dir "$dir" --no-progress "${extra[@]}" "$@"
}

# priors RUN: the three prior estimators (docs/evaluation.md) on the valid and test splits, from
# the run's cached scores (mixing only): the whole-document posterior untempered (T = 1),
# DEMix's block-end estimator, and the document one tempered with T chosen on valid (the
# default, so the run's own test rows). The rows keep the config's name in the results' run
# column (btm eval's default is the directory's).
priors() {
    local split
    for split in valid test; do
        "$btm" eval "$1" --run-name btm-forest --split "$split" --methods ensemble_prior,ensemble_posterior \
            --prior-temperature 1
        "$btm" eval "$1" --run-name btm-forest --split "$split" --methods ensemble_prior,ensemble_posterior \
            --prior-estimator block_end --prior-block-tokens 128 --prior-temperature 1
        "$btm" eval "$1" --run-name btm-forest --split "$split" --methods ensemble_prior,ensemble_posterior \
            --prior-temperature 1 --prior-temperature 3 --prior-temperature 10 \
            --prior-temperature 30 --prior-temperature 100
    done
}

# F9: merge methods beyond linear averaging, each with the posterior weights of F2.
merges=merge_task_arithmetic_posterior,merge_ties_posterior,merge_dare_ties_posterior
merges+=,merge_dare_linear_posterior,merge_model_stock_posterior

forest() {  # forest SEED
    local seed="$1" size dir
    for size in $sizes; do  # F1 F2 F4 F5 at every size
        dir="$(run_dir btm-forest "$size" "$seed")"
        btm_run btm-forest.yaml "$dir" "$size" "$seed"
        # F5: top-k for k = 1..6 costs only mixing over the scores cached by the run's eval.
        "$btm" eval "$dir" --run-name btm-forest --methods topk_prior --top-k 1,2,3,4,5,6
        priors "$dir"
        "$btm" forest ablate "$dir"  # F8: expert removal, from the cached scores
        # F9 at tiny (one merged model per domain and method; merges and scores are reused on a re-run).
        [ "$size" != tiny ] || "$btm" eval "$dir" --run-name btm-forest --methods "$merges"
    done
}

grow() {  # grow SEED: F7
    local seed="$1" posterior seedrule
    posterior="$(run_dir grow-posterior tiny "$seed")"
    seedrule="$(run_dir grow-seed tiny "$seed")"
    btm_run grow.yaml "$posterior" tiny "$seed"
    btm_run grow.yaml "$seedrule" tiny "$seed" --set branching.rule=seed --set name=grow-seed
    # F7: the new expert's starting point itself (init.pt, before training) on its domain.
    "$btm" eval "$(run_dir f7-init tiny "$seed")" --data "$posterior/data" --domains fiction --methods expert \
        --experts "posterior=$posterior/experts/fiction/init.pt,seed=$seedrule/experts/fiction/init.pt"
}

moe() {  # moe SEED: btm-forest's forest made one MoE, router started from zero and from data
    local seed="$1" init
    for init in zero data; do
        btm_run btm-forest.yaml "$(run_dir "moe-$init" tiny "$seed")" tiny "$seed" \
            --set moe.enabled=true --set moe.router_init="$init" --set name="moe-$init" \
            --set 'baselines=[dense]' --set evaluation.top_k=2
    done
}

sweeps() {  # sweeps SEED
    local seed="$1" k sf size
    for k in 1 2 4 8; do
        btm_run cbtm.yaml "$(run_dir "cbtm$k" tiny "$seed")" tiny "$seed" \
            --set clusters.k="$k" --set name="cbtm$k"
    done
    # F3: seed fraction 0.5 is btm-forest's own forest (same training settings).
    for size in $sizes; do
        for sf in 0 10 30 70 90; do
            btm_run seed-fraction.yaml "$(run_dir "sf$sf" "$size" "$seed")" "$size" "$seed" \
                --set budget.seed_fraction="0.$sf" --set name="sf$sf"
        done
    done
}

for seed in ${seeds:-_}; do
    [ "$seed" != _ ] || seed=""  # no SEEDS: one run per finding, plain directories
    case "$part" in
        forest) forest "$seed" ;;
        grow) grow "$seed" ;;
        sweeps) sweeps "$seed" ;;
        moe) moe "$seed" ;;
        all) forest "$seed"; grow "$seed"; sweeps "$seed"; moe "$seed" ;;
        *) echo "unknown part '$part': expected forest, grow, sweeps, moe or all" >&2; exit 2 ;;
    esac
done
if [ "$part" = all ]; then
    "$btm" report "$runs"/btm-forest* "$runs"/grow-* "$runs"/cbtm* "$runs"/sf* "$runs"/moe-* --out "$runs/report"
fi
