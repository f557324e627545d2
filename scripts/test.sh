#!/usr/bin/env bash
# The test suite: set up, then run pytest. Extra arguments go to pytest (e.g. -m "not slow").
# The suite needs ../shared/fixtures beside the checkout: it fails, rather than skips, without it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d ../shared/fixtures ]; then
  echo "error: ../shared/fixtures not found beside $(pwd): the tests need the shared fixtures" >&2
  exit 1
fi
bash scripts/setup.sh
# Real Slurm daemons for the launcher tests (Debian's slurm-wlm + munge), when we can install them.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  bash slurm/local-cluster/install.sh
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${VENV:-.venv}/bin/python" -m pytest tests "$@"
