#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtualenv in .venv with the CPU build of torch
# (installed first, so nothing pulls a multi-GB CUDA build) and this project with [dev].
# Set VENV=... to use another location. On a GPU machine: pip install -e '.[gpu]' afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
pip install -q -e '.[dev]'
python - <<'PY'
import torch, transformers, hydra, wandb, submitit
print(f"environment ready: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"hydra {hydra.__version__}, wandb {wandb.__version__}, submitit {submitit.__version__}")
PY
