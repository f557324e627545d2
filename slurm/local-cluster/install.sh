#!/usr/bin/env bash
# Install what the throwaway single-machine Slurm cluster needs (Debian/Ubuntu):
#   slurm-wlm (slurmctld, slurmd, client commands), munge (auth), iproute2 (ip).
# Idempotent and quiet: does nothing when every binary is already present.
# Needs root and a reachable apt repository.
set -euo pipefail

need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v slurmd    >/dev/null 2>&1 || need+=(slurm-wlm)
command -v sbatch    >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged    >/dev/null 2>&1 || need+=(munge)
command -v ip        >/dev/null 2>&1 || need+=(iproute2)
# unshare/nsenter come from util-linux, which is Essential on Debian.

if [ "${#need[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: need root to install: ${need[*]}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install.sh: apt-get not found; install ${need[*]} by hand" >&2
  exit 1
fi
# Deduplicate the package list.
mapfile -t pkgs < <(printf '%s\n' "${need[@]}" | sort -u)
log=$(mktemp /tmp/local-cluster-install.XXXXXX.log)
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${pkgs[@]}"; } >"$log" 2>&1; then
  echo "install.sh: apt-get install ${pkgs[*]} failed; last lines of $log:" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
rm -f "$log"
