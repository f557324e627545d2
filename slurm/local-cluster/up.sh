#!/usr/bin/env bash
# Bring up a throwaway two-node Slurm cluster on this one machine (needs root).
#
#   slurm/local-cluster/up.sh STATE_DIR      # idempotent: a live cluster is left as is
#   slurm/local-cluster/run-in.sh STATE_DIR sinfo
#   slurm/local-cluster/down.sh STATE_DIR
#
# How it works:
#  * A private network namespace (held open by `sleep infinity`) so that nothing listens
#    beyond this namespace's loopback. lo gets 127.0.0.1 and 127.0.0.2 (slurmctld fails
#    with only 127.0.0.1: "slurm_init_msg_engine_port ... Address family not supported").
#  * munged runs as user munge with its own key, socket and pid file (per cluster).
#  * slurmctld -i and two slurmd (-N n1, -N n2; Debian's build supports multiple slurmd
#    per host) share the host name; both node addresses are 127.0.0.1, ports 17001-17002.
#  * Every daemon writes a pid file into STATE_DIR; down.sh kills by those PIDs only.
# Client commands must run inside the namespace with SLURM_CONF=STATE_DIR/slurm.conf:
# use run-in.sh, or make-wrappers.sh for sbatch/squeue/... wrappers on PATH.
#
# Env knobs: LOCAL_CLUSTER_TIMEOUT (seconds to wait for idle nodes, default 60),
#            LOCAL_CLUSTER_CPUS (CPUs per node, default 2), LOCAL_CLUSTER_MEM (MB, 2000).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"
state=$(lc_state_dir "${1:-}")
timeout=${LOCAL_CLUSTER_TIMEOUT:-60}
cpus=${LOCAL_CLUSTER_CPUS:-2}
mem=${LOCAL_CLUSTER_MEM:-2000}
nodes=(n1 n2)

[ "$(id -u)" -eq 0 ] || { echo "up.sh: must run as root" >&2; exit 1; }
for b in slurmctld slurmd munged sinfo ip nsenter unshare runuser; do
  command -v "$b" >/dev/null || { echo "up.sh: $b not found (run install.sh)" >&2; exit 1; }
done

# Print the node states as "name state" lines (empty if slurmctld does not answer).
node_states() {
  lc_in_ns "$state" "$1" sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true
}
all_idle() {  # all_idle NSPID
  local s
  s=$(node_states "$1")
  for n in "${nodes[@]}"; do
    grep -qx "$n idle" <<<"$s" || return 1
  done
}
daemons_alive() {
  lc_pid_is "$(lc_read_pid "$state/munged.pid")" munged || return 1
  lc_pid_is "$(lc_read_pid "$state/slurmctld.pid")" slurmctld || return 1
  for n in "${nodes[@]}"; do
    lc_pid_is "$(lc_read_pid "$state/slurmd-$n.pid")" slurmd || return 1
  done
}
dump_logs() {
  echo "---- node states:" >&2
  [ -n "${ns:-}" ] && node_states "$ns" >&2
  for f in "$state"/log/*.log; do
    [ -f "$f" ] || continue
    echo "---- tail of $f:" >&2
    tail -n 25 "$f" >&2
  done
}
fail() {
  echo "up.sh: $*" >&2
  dump_logs
  echo "up.sh: stopping what was started (logs kept in $state/log)" >&2
  "$here/down.sh" "$state" >&2 || true
  exit 1
}

# --- Already up? (second run of up.sh) -------------------------------------------------
ns=$(lc_ns_pid "$state")
if [ -n "$ns" ] && daemons_alive && all_idle "$ns" 2>/dev/null; then
  echo "up.sh: cluster in $state is already up"
  exit 0
fi
# Anything left over (half-started or stale pid files): stop it and start clean.
"$here/down.sh" "$state" >/dev/null 2>&1 || true
rm -rf "$state/state" "$state/spool"
mkdir -p "$state/log" "$state/state" "$state/spool"

# --- 1. Network namespace ----------------------------------------------------------------
# The child writes its own PID (after unshare, before exec) so setsid forking or not
# does not matter. stdio to /dev/null so callers capturing our output do not hang.
rm -f "$state/netns.pid"
# shellcheck disable=SC2016  # $$ is expanded by the inner sh
setsid unshare -n sh -c 'echo $$ > "$1"; exec sleep infinity' sh "$state/netns.pid" \
  </dev/null >/dev/null 2>&1 &
for _ in $(seq 50); do
  ns=$(lc_ns_pid "$state")
  [ -n "$ns" ] && break
  sleep 0.1
done
[ -n "$ns" ] || fail "network namespace holder did not start"
nsenter -t "$ns" -n ip link set lo up
nsenter -t "$ns" -n ip addr add 127.0.0.2/8 dev lo

# --- 2. munge -----------------------------------------------------------------------------
# munged runs as user munge, so its directory must be reachable by that user. Prefer
# STATE_DIR/munge (STATE_DIR made traversable, 0711); if a parent directory is private
# (e.g. a 0700 pytest tmp dir), fall back to /run/munge/local-cluster-<hash>.
chmod 0711 "$state"
mdir="$state/munge"
mkdir -p "$mdir"
chown munge:munge "$mdir"
chmod 0711 "$mdir"   # others may traverse to the socket (munged warns otherwise)
if ! runuser -u munge -- test -w "$mdir"; then
  rm -rf "$mdir"
  install -d -o munge -g munge -m 0755 /run/munge
  mdir="/run/munge/local-cluster-$(printf '%s' "$state" | sha1sum | cut -c1-12)"
  rm -rf "$mdir"
  install -d -o munge -g munge -m 0711 "$mdir"
fi
echo "$mdir" >"$state/munge.dir"
# Own key: 1 KiB random, readable by munge only.
dd if=/dev/urandom of="$mdir/munge.key" bs=1024 count=1 status=none
chown munge:munge "$mdir/munge.key"
chmod 0400 "$mdir/munge.key"
touch "$state/log/munged.log" && chown munge:munge "$state/log/munged.log"
# The log dir must not be group/world writable for munged; it is 0755 root, file owned by munge.
chmod 0755 "$state/log"
rm -f "$mdir/munged.pid"
nsenter -t "$ns" -n -- runuser -u munge -- munged \
  --socket="$mdir/munge.socket" --key-file="$mdir/munge.key" \
  --pid-file="$mdir/munged.pid" --seed-file="$mdir/munged.seed" \
  --log-file="$state/log/munged.log" --force </dev/null >>"$state/log/munged.log" 2>&1 \
  || fail "munged failed to start"
for _ in $(seq 50); do [ -s "$mdir/munged.pid" ] && [ -S "$mdir/munge.socket" ] && break; sleep 0.1; done
[ -s "$mdir/munged.pid" ] || fail "munged wrote no pid file"
cp "$mdir/munged.pid" "$state/munged.pid"

# --- 3. slurm.conf ------------------------------------------------------------------------
host=$(hostname -s)
cat >"$state/slurm.conf" <<CONF
# Generated by slurm/local-cluster/up.sh for a throwaway single-machine cluster.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$mdir/munge.socket
CredType=cred/munge
SlurmctldPort=6817
StateSaveLocation=$state/state
SlurmdSpoolDir=$state/spool/%n
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd-%n.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
# Hardware seen by slurmd may differ from what is configured here: trust the config.
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# Finished jobs stay visible to scontrol/squeue this long (no accounting database).
MinJobAge=120
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
SlurmctldTimeout=60
MessageTimeout=10
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

# --- 4. slurmctld and slurmd ----------------------------------------------------------------
lc_in_ns "$state" "$ns" slurmctld -i </dev/null >>"$state/log/slurmctld.log" 2>&1 \
  || fail "slurmctld failed to start"
for _ in $(seq 100); do
  lc_pid_is "$(lc_read_pid "$state/slurmctld.pid")" slurmctld && break
  sleep 0.1
done
lc_pid_is "$(lc_read_pid "$state/slurmctld.pid")" slurmctld || fail "slurmctld is not running"
for n in "${nodes[@]}"; do
  lc_in_ns "$state" "$ns" slurmd -N "$n" </dev/null >>"$state/log/slurmd-$n.log" 2>&1 \
    || fail "slurmd -N $n failed to start"
done

# --- 5. Wait for both nodes idle --------------------------------------------------------------
deadline=$((SECONDS + timeout))
until all_idle "$ns"; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    fail "nodes not idle after ${timeout}s"
  fi
  daemons_alive || { sleep 1; daemons_alive || fail "a daemon died during start-up"; }
  sleep 0.5
done
echo "up.sh: cluster up in $state (nodes: ${nodes[*]} idle)"
