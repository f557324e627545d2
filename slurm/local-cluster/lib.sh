# shellcheck shell=bash
# Shared helpers for the throwaway local Slurm cluster scripts (sourced, not run).
#
# Layout of STATE_DIR (everything the cluster owns lives here):
#   slurm.conf            generated config (point SLURM_CONF at it)
#   netns.pid             PID of the `sleep infinity` that holds the network namespace
#   munged.pid            munged's pid file (munge.dir names munge's runtime dir)
#   slurmctld.pid         slurmctld's pid file
#   slurmd-n1.pid, -n2    slurmd pid files (one slurmd per simulated node)
#   log/                  munged.log, slurmctld.log, slurmd-n1.log, slurmd-n2.log
#   state/, spool/        slurmctld StateSaveLocation, slurmd spool dirs

# Resolve STATE_DIR (first argument) to an absolute path; fail with usage text.
lc_state_dir() {
  if [ -z "${1:-}" ]; then
    echo "usage: $(basename "$0") STATE_DIR ..." >&2
    exit 2
  fi
  mkdir -p "$1"
  (cd "$1" && pwd -P)
}

# Is PID alive and is its command the one we expect?  We only ever signal PIDs read
# from our own pid files; the name check guards against a recycled PID.
lc_pid_is() {  # lc_pid_is PID NAME
  local pid=$1 name=$2 comm
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ -r "/proc/$pid/comm" ] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [ "$comm" = "$name" ] || return 1
  # A zombie (exited, not yet reaped by its parent/init) counts as dead.
  local st
  st=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$pid/status" 2>/dev/null)
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# Read a pid file; prints the pid or nothing.
lc_read_pid() {
  [ -s "$1" ] || return 0
  tr -dc '0-9' <"$1"
}

# PID of the namespace holder, if it is alive (else nothing).
lc_ns_pid() {  # lc_ns_pid STATE_DIR
  local pid
  pid=$(lc_read_pid "$1/netns.pid")
  # (Callers may themselves be inside that namespace, e.g. a job using a wrapper.)
  if [ -n "$pid" ] && lc_pid_is "$pid" sleep; then
    echo "$pid"
  fi
}

# Run a command inside the cluster's network namespace with SLURM_CONF set.
lc_in_ns() {  # lc_in_ns STATE_DIR NSPID cmd...
  local state=$1 pid=$2
  shift 2
  nsenter -t "$pid" -n -- env SLURM_CONF="$state/slurm.conf" "$@"
}
