#!/usr/bin/env bash
# The GPU check (docs/gpu.md): verify and measure the CUDA paths in one command, 8 minutes at most.
#
#   bash scripts/gpu-check.sh [OUTDIR]                 on a CUDA machine (default OUTDIR: gpu-check-out)
#   bash scripts/gpu-check.sh --cpu-selftest [OUTDIR]  the same code paths on CPU, tiny shapes (CI)
#   extra options go to bench.gpu_check, e.g. --only env,train
#
# On a machine without hydra-core / omegaconf / submitit, the wheels that scripts/gpu-wheels.sh
# put in .whl/ are installed into a temporary prefix (nothing is downloaded). Where ../shared is
# not beside the checkout, the fixtures copied into .whl/shared (or ARENA_SHARED=DIR) are linked there.
set -uo pipefail
cd "$(dirname "$0")/.."

SELFTEST=()
OUT=gpu-check-out
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-selftest) SELFTEST=(--cpu-selftest) ;;
    --*) EXTRA+=("$1") ; if [ $# -gt 1 ] && [[ "$2" != --* ]]; then EXTRA+=("$2"); shift; fi ;;
    *) OUT=$1 ;;
  esac
  shift
done

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

if ! "$PY" -c "import hydra, omegaconf, torchao" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
      echo "error: hydra-core/omegaconf are not importable and .whl/ holds no wheels: run scripts/gpu-wheels.sh where pip works, carry .whl" >&2
      exit 2
    fi
    echo "gpu-check: warning: torchao is not importable and .whl/ holds no wheels: the lora part's QLoRA run will fail" >&2
  fi
fi
if ! "$PY" -c "import hydra, omegaconf, torchao" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  SITE=$(mktemp -d /tmp/gpu-check-site.XXXXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 2
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu-check: installed $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ ! -d ../shared/fixtures ]; then
  SRC=${ARENA_SHARED:-$PWD/.whl/shared}
  if [ -d "$SRC/fixtures" ] && [ ! -e ../shared ]; then
    ln -s "$(cd "$SRC" && pwd)" ../shared && echo "gpu-check: linked ../shared -> $SRC"
  else
    echo "error: ../shared/fixtures not found (and no $SRC/fixtures to link): run scripts/gpu-wheels.sh here and carry .whl" >&2
    exit 2
  fi
fi

exec "$PY" -m bench.gpu_check --out "$OUT" "${SELFTEST[@]}" "${EXTRA[@]}"
