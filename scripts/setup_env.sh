#!/usr/bin/env bash
# Idempotent environment setup for btm: creates .venv in the repository root and installs,
# in this order, torch, the build tools fairseq needs, fairseq-fixed (pinned by version and
# sha256), then btm itself with its extras. A second run only checks and finishes in seconds.
#
#   scripts/setup_env.sh            # runtime: torch, fairseq, btm[fairseq]
#   scripts/setup_env.sh --test     # also the test extras (pytest, hypothesis, ...)
#
# Variables:
#   BTM_TORCH_SPEC   pip requirement for torch (default: torch==2.13.0, the CPU build on these
#                    machines). On a GPU cluster e.g.
#                    BTM_TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#   BTM_PYTHON       interpreter used to create the venv (default: python3)
#   BTM_VENV         venv location (default: <repo>/.venv)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BTM_VENV:-$repo/.venv}"
python="${BTM_PYTHON:-python3}"
torch_spec="${BTM_TORCH_SPEC:-torch==2.13.0}"
fairseq_spec="fairseq-fixed==0.12.3.1"
# sha256 of the fairseq-fixed 0.12.3.1 sdist; pip refuses any other file.
fairseq_sha256="c607577a54ab30e2ee0f0b0a754ea5cdbc6ad0a9f99a1726638a2201445bc1cc"
extras="fairseq,hf"
[ "${1:-}" = "--test" ] && extras="fairseq,hf,test"

log() { printf '[setup_env] %s\n' "$*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check)

# A stamp records what was installed; when it matches, everything below is already done.
stamp="$venv/.btm-setup-stamp"
want="torch=$torch_spec fairseq=$fairseq_spec:$fairseq_sha256 extras=$extras setup=$(sha256sum "$repo/setup.py" | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c 'import torch, fairseq, launcher, fairseq_ext, analysis' 2>/dev/null; then
  log "environment up to date ($venv)"
  exit 0
fi

log "installing $torch_spec"
# shellcheck disable=SC2086  # the spec may carry pip options such as --index-url
"${pip[@]}" install -q $torch_spec
log "installing build tools for fairseq"
"${pip[@]}" install -q "cython>=3" "numpy>=1.26" "setuptools<81" wheel

if ! "$py" -c 'import fairseq' 2>/dev/null; then
  log "building $fairseq_spec from sdist (about 3 minutes, once)"
  req="$(mktemp)"
  trap 'rm -f "$req"' EXIT
  printf '%s --hash=sha256:%s\n' "$fairseq_spec" "$fairseq_sha256" >"$req"
  # --no-deps + explicit deps: fairseq's own metadata pins versions new pip rejects.
  "${pip[@]}" install -q --no-build-isolation --no-deps --no-binary fairseq-fixed --require-hashes -r "$req"
  "${pip[@]}" install -q cffi "hydra-core==1.3.2" "omegaconf==2.3.0" "antlr4-python3-runtime==4.9.3" bitarray regex "sacrebleu>=1.4.12" tqdm scikit-learn packaging
fi

log "installing btm[$extras] (editable)"
# The constraint keeps pip from replacing the torch chosen above while resolving the extras.
constraints="$(mktemp)"
"$py" -c 'import torch; print(f"torch=={torch.__version__}")' >"$constraints"
"${pip[@]}" install -q --no-build-isolation -c "$constraints" -e "$repo[$extras]"
rm -f "$constraints"
# fairseq-fixed's metadata names torchaudio; a build that cannot load beside this torch breaks
# every library that imports it when present (transformers does), so none is better than that.
if "${pip[@]}" show -q torchaudio >/dev/null 2>&1 && ! "$py" -c 'import torchaudio' >/dev/null 2>&1; then
  log "removing a torchaudio that does not load with this torch"
  "${pip[@]}" uninstall -q -y torchaudio
fi
"$py" -c 'import torch, fairseq, launcher, fairseq_ext, analysis'
printf '%s' "$want" >"$stamp"
log "done: $venv"
