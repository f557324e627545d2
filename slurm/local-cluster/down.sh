#!/usr/bin/env bash
# Tear down the throwaway cluster started by up.sh STATE_DIR.
#   slurm/local-cluster/down.sh STATE_DIR
# Kills only PIDs read from STATE_DIR's pid files (each checked against the expected
# command name so a recycled PID is never hit), then any process still left inside the
# cluster's private network namespace (job steps orphaned by slurmd), then the namespace
# holder.  Safe to run twice and on stale or partial state. Logs in STATE_DIR/log are kept.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"
state=$(lc_state_dir "${1:-}")

# stop_pid PIDFILE NAME: SIGTERM, wait up to 5 s, then SIGKILL.
stop_pid() {
  local pidfile=$1 name=$2 pid
  pid=$(lc_read_pid "$pidfile")
  if [ -n "$pid" ] && lc_pid_is "$pid" "$name"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do lc_pid_is "$pid" "$name" || break; sleep 0.1; done
    if lc_pid_is "$pid" "$name"; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$pidfile"
}

ns=$(lc_ns_pid "$state")

# Cancel jobs first so slurmd cleans up its steps while it is still running.
if [ -n "$ns" ] && lc_pid_is "$(lc_read_pid "$state/slurmctld.pid")" slurmctld; then
  jobs=$(lc_in_ns "$state" "$ns" timeout 10 squeue -h -o %i 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    lc_in_ns "$state" "$ns" timeout 10 scancel $jobs 2>/dev/null || true
    for _ in $(seq 20); do
      [ -z "$(lc_in_ns "$state" "$ns" timeout 5 squeue -h -t R,CG -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
fi

for f in "$state"/slurmd-*.pid; do
  [ -e "$f" ] && stop_pid "$f" slurmd
done
stop_pid "$state/slurmctld.pid" slurmctld
stop_pid "$state/munged.pid" munged

# Leftovers inside our private namespace (orphaned slurmstepd / job processes). Matching
# on the namespace, which only this cluster uses, never on a process name.
if [ -n "$ns" ]; then
  nsid=$(readlink "/proc/$ns/ns/net")
  for sig in TERM KILL; do
    left=()
    for p in /proc/[0-9]*; do
      p=${p#/proc/}
      if [ "$p" != "$ns" ] && [ "$p" != "$$" ] && [ "$p" != "$PPID" ] \
         && [ "$(readlink "/proc/$p/ns/net" 2>/dev/null)" = "$nsid" ]; then
        left+=("$p")
      fi
    done
    [ "${#left[@]}" -eq 0 ] && break
    kill "-$sig" "${left[@]}" 2>/dev/null || true
    sleep 1
  done
fi
stop_pid "$state/netns.pid" sleep

# munge runtime dir: remove the /run fallback; keep STATE_DIR/munge out of the way.
if [ -s "$state/munge.dir" ]; then
  mdir=$(cat "$state/munge.dir")
  case "$mdir" in
    /run/munge/local-cluster-*) rm -rf "$mdir" ;;
  esac
  rm -f "$state/munge.dir"
fi
rm -rf "$state/munge"
echo "down.sh: cluster in $state stopped"
