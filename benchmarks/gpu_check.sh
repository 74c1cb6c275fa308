#!/usr/bin/env bash
# The whole GPU check in one command, for a machine lent for minutes that reaches no package
# index: set up from carried wheels, then the GPU tests, training speed, scoring speed and a tiny
# pipeline on the GPU. Everything it prints goes to $OUT/gpu_check.log (OUT defaults to
# benchmarks/out). It stops within $BTM_GPU_CHECK_SECONDS (default 460 s, under 8 minutes; 3600
# with --quick, whose step limits are 6x, for a small shared CPU machine): each step runs under
# its own limit, cut to what is left of that budget, so a step that hangs costs only its limit
# and the next ones still run.
#
#   bash benchmarks/gpu_check.sh --inventory  # seconds: what the machine has -> $OUT/gpu_inventory.txt
#   bash benchmarks/gpu_check.sh              # the check (GPU sizes: 125m preset)
#   bash benchmarks/gpu_check.sh --quick      # tiny sizes; on a CPU machine the GPU parts skip
#
# Setup: when the interpreter ($BTM_PYTHON, default python3) cannot import fairseq, the script
# makes a venv that sees the machine's packages (its torch) and installs, with no index, every
# wheel in benchmarks/gpu_wheels/ and then builds fairseq-fixed from the sdist there. Fill that
# (git-ignored) folder beforehand, on a machine with an index, from the inventory:
# `bash benchmarks/gpu_wheels.sh gpu_inventory.txt` (docs/benchmarks.md, "GPU check").
# btm itself is used from this checkout (PYTHONPATH), never installed.
set -uo pipefail
started=$SECONDS

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-$repo/benchmarks/out}"
mkdir -p "$out"
log="$out/gpu_check.log"
exec > >(tee -a "$log") 2>&1
py="${BTM_PYTHON:-python3}"
wheels="$repo/benchmarks/gpu_wheels"
mode=full
case "${1:-}" in
  --inventory) mode=inventory ;;
  --quick) mode=quick ;;
  "") ;;
  *) echo "usage: $0 [--inventory | --quick]" >&2; exit 2 ;;
esac

cd "$repo"
budget="${BTM_GPU_CHECK_SECONDS:-$([ "$mode" = quick ] && echo 3600 || echo 460)}"
scale=$([ "$mode" = quick ] && echo 6 || echo 1)  # step limits are for a GPU machine
say() { printf '\n[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
say "mode $mode, repo $repo, log $log, load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

if [ "$mode" = inventory ]; then
  { "$py" -c 'import sys, platform; print("python", sys.version.split()[0], platform.machine())'
    "$py" -m pip list --format=freeze 2>/dev/null; } >"$out/gpu_inventory.txt"
  command -v g++ >/dev/null && echo "g++ present" || echo "no g++: fairseq-fixed cannot be built here"
  cat "$out/gpu_inventory.txt"
  exit 0
fi

# ---- setup: only what this interpreter lacks, from the carried folder, no index -------------
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c 'import torch, fairseq, sentencepiece, pytest' 2>/dev/null; then
  say "setup from $wheels"
  ls "$wheels"/fairseq[-_]fixed-*.tar.gz >/dev/null 2>&1 \
    || { say "no fairseq-fixed sdist in $wheels: fill it with benchmarks/gpu_wheels.sh"; exit 1; }
  venv="${BTM_GPU_VENV:-$(mktemp -d -t btm-gpu-venv.XXXXXX)}"  # mktemp -t: under $TMPDIR
  "$py" -m venv --system-site-packages "$venv" || { say "cannot create a venv with $py"; exit 1; }
  py="$venv/bin/python"
  pip=("$py" -m pip install -q --disable-pip-version-check --no-index --find-links "$wheels")
  if ls "$wheels"/*.whl >/dev/null 2>&1; then  # none when the machine lacks only fairseq
    "${pip[@]}" "$wheels"/*.whl || { say "installing the wheels failed"; exit 1; }
  fi
  say "building fairseq-fixed from its sdist"
  "${pip[@]}" --no-build-isolation --no-deps "$wheels"/fairseq[-_]fixed-*.tar.gz || { say "fairseq build failed"; exit 1; }
fi
"$py" -c 'import torch, fairseq; print("torch", torch.__version__, "cuda", torch.version.cuda,
"device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (GPU parts skip)")'

# ---- the steps --------------------------------------------------------------------------------
failed=()
step() {  # step NAME SECONDS CMD...: run CMD under a time limit, log its time and status
  local name="$1" limit=$(($2 * scale)); shift 2
  local left=$((budget - (SECONDS - started)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    failed+=("$name (not run: the ${budget}s budget is spent)"); say "step $name: no time left"; return
  fi
  say "step $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  [ $rc -eq 0 ] || failed+=("$name (exit $rc$([ $rc -eq 124 ] && echo ', time limit'))")
  say "step $name: exit $rc after $((SECONDS - t0)) s"
}

work="$(mktemp -d -t btm-gpu-check.XXXXXX)"
if [ "$mode" = quick ]; then
  corpus_chars=20000 vocab=300 preset=tiny
  train_args=(--sequences 2 --updates 6 --skip 2 --log-interval 2)
  score_args=(--split test --repeats 1)
  pipeline_set=(--set budget.total_updates=4 --set budget.save_interval_updates=2 --set corpus.vocab_size=300)
else
  corpus_chars=500000 vocab=8000 preset=125m
  train_args=(--sequences 8 --updates 30 --skip 10 --log-interval 5)
  score_args=(--split train --batch-size 16 --repeats 3)
  pipeline_set=(--set budget.total_updates=40 --set budget.save_interval_updates=20 --max-parallel 4)
fi

step data 90 "$py" -c "
import os, sys
from launcher.demo_corpus import build_demo_corpus
from fairseq_ext.data_prep import prepare_data
build_demo_corpus('$work/corpus', size=$corpus_chars)
prepare_data('$work/corpus', '$work/data', vocab_size=$vocab, workers=min(8, os.cpu_count()), progress=False)
print('data ready:', '$work/data')"

step gpu-tests 120 "$py" -m pytest -q -p no:cacheprovider -m gpu "$repo/tests/test_gpu.py"
step train-speed 150 "$py" "$repo/benchmarks/train_speed.py" --data "$work/data" --domain python_code \
  --preset "$preset" "${train_args[@]}"
step score-speed 75 "$py" "$repo/benchmarks/score_speed.py" --data "$work/data" --domain python_code \
  --preset "$preset" "${score_args[@]}"
step pipeline 150 "$py" -m launcher run demo --run-dir "$work/pipeline" --corpus "$work/corpus" \
  --executor local --no-progress "${pipeline_set[@]}"

rm -rf "$work"
if [ ${#failed[@]} -gt 0 ]; then
  say "FAILED: ${failed[*]}"
  exit 1
fi
say "all steps passed; log: $log"
