#!/usr/bin/env bash
# Prepare, here, what the GPU check needs on a CUDA machine that has torch, transformers, peft,
# safetensors, tokenizers, numpy and pytest but cannot download anything (docs/gpu.md):
#   .whl/*.whl         the wheels it lacks, for Python 3.12, pinned to the versions this checkout
#                      is tested with: pure-Python hydra-core, omegaconf, antlr4, submitit, and
#                      torchao (QLoRA's NF4 tensor; an abi3 wheel whose NF4 code is pure Python);
#   .whl/shared/...    a copy of ../shared/fixtures (tokenizer, arena CSVs, Gemma 2 configs), which
#                      does not travel with the checkout.
# .whl/ is git-ignored; carry it to the GPU machine with the checkout (well under 64 MiB).
#
#   bash scripts/gpu-wheels.sh            then, there:  bash scripts/gpu-check.sh OUTDIR
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
# One version of each: two of the same package stop the install on the GPU machine.
WHEELS=(hydra-core==1.3.8 omegaconf==2.3.1 submitit==1.5.4)
SDIST_ONLY=(antlr4-python3-runtime==4.9.3)  # hydra/omegaconf pin 4.9.*; PyPI has only an sdist: built here
BINARY=(torchao==0.18.0)  # cp310-abi3 manylinux_2_28: its optional C++ kernels may not load there; NF4 needs none

rm -rf .whl
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .whl "${BINARY[@]}"
"$PY" -m pip wheel -q --no-deps -w .whl "${SDIST_ONLY[@]}"
for w in .whl/*.whl; do
  case "$w" in
    *-py3-none-any.whl|*-py2.py3-none-any.whl|.whl/torchao-*-abi3-*.whl) ;;
    *) echo "error: $w is neither pure Python nor an expected abi3 wheel" >&2; exit 1 ;;
  esac
done

if [ ! -d ../shared/fixtures ]; then
  echo "error: ../shared/fixtures not found beside $(pwd): the GPU check reads the tokenizer and arena data" >&2
  exit 1
fi
mkdir -p .whl/shared
cp -rL ../shared/fixtures .whl/shared/fixtures
chmod -R u+w .whl/shared

echo "prepared .whl/ ($(du -sh .whl | cut -f1)):"
ls -1 .whl/*.whl
echo "carry .whl to the GPU machine with the checkout, then run: bash scripts/gpu-check.sh OUTDIR"
