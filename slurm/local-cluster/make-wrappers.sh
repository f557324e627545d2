#!/usr/bin/env bash
# Write wrapper scripts for the Slurm client commands into BIN_DIR.  Each wrapper runs the
# real command inside the local cluster's network namespace with SLURM_CONF set, so a
# process outside the namespace (a shell, pytest, submitit) can use the cluster:
#   slurm/local-cluster/make-wrappers.sh STATE_DIR /tmp/slurm-bin
#   PATH=/tmp/slurm-bin:$PATH sbatch job.sh; squeue
# Jobs inherit PATH; inside the namespace the wrappers just exec the real command.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"
state=$(lc_state_dir "${1:-}")
bin=${2:?usage: make-wrappers.sh STATE_DIR BIN_DIR}
mkdir -p "$bin"
for cmd in sbatch squeue scontrol scancel srun sinfo sacct salloc sstat; do
  real=$(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin command -v "$cmd" || true)
  [ -n "$real" ] || continue
  cat >"$bin/$cmd" <<WRAP
#!/usr/bin/env bash
exec "$here/run-in.sh" "$state" "$real" "\$@"
WRAP
  chmod +x "$bin/$cmd"
done
