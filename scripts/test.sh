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
# Disk: a passing test's files are removed as it ends (pyproject.toml: tmp_path_retention_policy),
# but the real-width rehearsal holds ~9 GB while it runs. Say what there is, so a full disk is
# the first thing a failed log shows, not eleven "checkpoint not saved" errors.
tmp="${TMPDIR:-/tmp}"
free_gb=$(df -Pk "$tmp" | awk 'NR==2 {printf "%.1f", $4 / 1048576}')
echo "test.sh: ${free_gb} GB free in $tmp; the suite needs ~10 GB there at its peak"
if awk -v f="$free_gb" 'BEGIN {exit !(f < 10)}'; then
  echo "test.sh: warning: less than 10 GB free in $tmp: tests that save checkpoints may fail for space" >&2
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${VENV:-.venv}/bin/python" -m pytest tests "$@"
