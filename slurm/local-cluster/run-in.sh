#!/usr/bin/env bash
# Run a command inside the local cluster's network namespace, with SLURM_CONF pointing
# at STATE_DIR/slurm.conf.  Working directory and the rest of the environment are kept.
#   slurm/local-cluster/run-in.sh STATE_DIR sinfo
#   slurm/local-cluster/run-in.sh STATE_DIR sbatch -N2 job.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"
state=$(lc_state_dir "${1:-}")
shift
[ "$#" -gt 0 ] || { echo "usage: run-in.sh STATE_DIR cmd [args...]" >&2; exit 2; }
pid=$(lc_ns_pid "$state")
[ -n "$pid" ] || { echo "run-in.sh: no live cluster in $state (run up.sh first)" >&2; exit 1; }
# Already inside the namespace (e.g. a job calling a wrapper again): just run it.
if [ "$(readlink "/proc/$pid/ns/net")" = "$(readlink /proc/self/ns/net)" ]; then
  exec env SLURM_CONF="$state/slurm.conf" "$@"
fi
exec nsenter -t "$pid" -n -- env SLURM_CONF="$state/slurm.conf" "$@"
