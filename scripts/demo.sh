#!/usr/bin/env bash
# The main job: set up, then train the cpu_demo model on the shared arena data on CPU, ending
# with eval metrics and a checkpoint. Extra arguments are Hydra overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" -m launch.train +experiment=cpu_demo "$@"
