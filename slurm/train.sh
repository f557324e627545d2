#!/usr/bin/env bash
# arena-trainer: Slurm batch script for a (multi-node) FSDP2 training run.
#
#   mkdir -p logs          # Slurm opens -o logs/... before this script runs
#   sbatch slurm/train.sh +experiment=NAME [hydra overrides...]
#   sbatch --nodes=4 --time=12:00:00 slurm/train.sh +experiment=NAME optim.lr=1e-5
#   # CPU / no-GPU cluster (gloo): 2 ranks per node
#   GPUS_PER_NODE=2 sbatch --gpus-per-node=0 --cpus-per-task=2 slurm/train.sh +experiment=NAME
#
# Every #SBATCH default below can be overridden on the sbatch command line. Arguments after
# the script are Hydra overrides handed unchanged to `python -m launch.train`.
#
# What it runs: one srun task per node, each a torchrun agent that starts
# $GPUS_PER_NODE ranks; rendezvous is c10d on the first node of the allocation, keyed by
# the job id (--rdzv-id=$SLURM_JOB_ID, so TORCHELASTIC_RUN_ID == SLURM_JOB_ID on all ranks).
#
# Environment knobs (all optional):
#   RUN_DIR            run directory [runs/$SLURM_JOB_NAME-$SLURM_JOB_ID, under the submit dir];
#                      passed as trainer.run_dir=... unless the overrides already set it.
#   GPUS_PER_NODE      ranks per node [$SLURM_GPUS_ON_NODE, else 8]
#   MASTER_PORT        rendezvous port on the head node [20000 + job id % 20000]
#   TORCHRUN           launcher command [torchrun]
#   SRUN_ARGS          extra srun options, word-split, e.g. for pyxis/enroot containers:
#                      SRUN_ARGS="--container-image=/shared/arena-trainer.sqsh
#                      --container-mounts=/shared:/shared --container-workdir=$PWD"
#   SHUTDOWN_TIMEOUT   seconds torchrun waits for ranks after a TERM before SIGKILL [120]
#   OMP_NUM_THREADS    [cpus-per-task / ranks per node, at least 1]
#
# ---- Preemption / requeue contract (with launch.train) --------------------------------------
# 1. Slurm sends SIGUSR1 to this batch shell 300 s before the time limit
#    (--signal=B:USR1@300); an admin or user can do the same at any time with
#    `scancel --batch --signal=USR1 JOBID`.
# 2. The shell forwards SIGUSR1 to the srun step; Slurm delivers it to every process of the
#    step. The torchrun agents IGNORE it (started with SIGUSR1 set to SIG_IGN), so only the
#    training ranks act on it; ranks that installed no handler ignore it too.
# 3. launch.train, on SIGUSR1 (it may arrive more than once; the handler only sets a flag):
#    finishes the current optimizer step, saves a checkpoint into trainer.run_dir (all
#    ranks, collectively), rank 0 then writes the marker file <run_dir>/.preempted, all
#    ranks barrier and exit with code 0.
# 4. When srun returns and <run_dir>/.preempted exists, this shell runs
#    `scontrol requeue $SLURM_JOB_ID` and exits 0. The job keeps its id, so RUN_DIR (keyed
#    by job id) is the same in the next allocation; SLURM_RESTART_COUNT grows by one.
# 5. At the start of every allocation this shell deletes a stale <run_dir>/.preempted, and
#    launch.train resumes automatically from the latest complete checkpoint in run_dir
#    (starting fresh when there is none).
# 6. Exit codes: srun's exit code becomes the job's (0 = finished, not preempted; non-zero =
#    failed, no requeue). A SIGTERM to this shell (scancel, or Slurm preempting/requeueing
#    the job itself) is forwarded to srun and never leads to a self-requeue.
# --------------------------------------------------------------------------------------------
#SBATCH --job-name=arena-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -uo pipefail

log() { echo "[train.sh $(date +%FT%T) job=${SLURM_JOB_ID:-?} restart=${SLURM_RESTART_COUNT:-0}] $*"; }

if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "train.sh: not inside a Slurm job; submit it with sbatch" >&2
  exit 2
fi

# ---- run directory (stable across requeues: the job id does not change) -------------------
run_dir=${RUN_DIR:-runs/${SLURM_JOB_NAME:-arena-train}-$SLURM_JOB_ID}
have_run_dir_override=0
for a in "$@"; do
  case "$a" in
    trainer.run_dir=*|+trainer.run_dir=*|++trainer.run_dir=*)
      run_dir=${a#*=}; have_run_dir_override=1 ;;
  esac
done
case "$run_dir" in
  /*) ;;
  *) run_dir="${SLURM_SUBMIT_DIR:-$PWD}/$run_dir" ;;
esac
mkdir -p "$run_dir"
overrides=("$@")
[ "$have_run_dir_override" = 1 ] || overrides+=("trainer.run_dir=$run_dir")
# A marker left by the previous allocation was consumed by its requeue: drop it so that
# only a fresh preemption of this allocation triggers the next requeue.
rm -f "$run_dir/.preempted"

# ---- topology -------------------------------------------------------------------------------
nnodes=${SLURM_NNODES:-1}
nproc=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
if ! [[ "$nproc" =~ ^[0-9]+$ ]] || [ "$nproc" -lt 1 ]; then
  echo "train.sh: ranks per node is '$nproc'; set GPUS_PER_NODE (e.g. GPUS_PER_NODE=2 on CPU)" >&2
  exit 2
fi
head_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# Use the head node's NodeAddr, not its name: names need not resolve on the compute
# network (on the local test cluster every node is 127.0.0.1).
head_addr=$(scontrol show node -o "$head_host" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
head_addr=${head_addr:-$head_host}
port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# ---- environment for the ranks --------------------------------------------------------------
export PYTHONUNBUFFERED=1
cpus=${SLURM_CPUS_PER_TASK:-$nproc}
threads=$((cpus / nproc))
[ "$threads" -ge 1 ] || threads=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
# NCCL: with async error handling a failed/timed-out collective (detected by the NCCL
# watchdog, default timeout from init_process_group) aborts the communicator and kills the
# rank, so a dead peer fails the job (srun --kill-on-bad-exit) instead of hanging until the
# time limit. TORCH_NCCL_BLOCKING_WAIT is NOT set: it makes every collective wait
# synchronously on the CPU, which kills compute/communication overlap in FSDP; the watchdog
# gives the same hang protection. (NCCL_ASYNC_ERROR_HANDLING is the deprecated old name.)
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# How long torchrun gives the ranks to exit after it forwards a SIGTERM (scancel, time
# limit) before SIGKILL; read by torch >= 2.9, harmless before (30 s there).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}}

log "nodes=$nnodes ranks/node=$nproc head=$head_host($head_addr:$port) run_dir=$run_dir"
log "overrides: ${overrides[*]}"

# ---- signals ----------------------------------------------------------------------------------
srun_pid=
usr1=0
term=0
# shellcheck disable=SC2317  # invoked by trap
on_usr1() {
  usr1=1
  log "SIGUSR1: asking the ranks to checkpoint and stop"
  [ -n "$srun_pid" ] && kill -USR1 "$srun_pid" 2>/dev/null
}
# shellcheck disable=SC2317  # invoked by trap
on_term() {
  term=1
  log "SIGTERM: forwarding to srun (no self-requeue)"
  [ -n "$srun_pid" ] && kill -TERM "$srun_pid" 2>/dev/null
}
trap on_usr1 USR1
trap on_term TERM

# ---- launch -----------------------------------------------------------------------------------
# `trap '' USR1` before exec: the agent (and its children until they install a handler)
# ignore SIGUSR1, so the signal reaches the ranks without killing torchrun.
# shellcheck disable=SC2016,SC2086
srun ${SRUN_ARGS:-} --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c 'trap "" USR1; exec "$@"' torchrun-wrapper \
  ${TORCHRUN:-torchrun} \
  --nnodes="$nnodes" --nproc_per_node="$nproc" \
  --rdzv-backend=c10d --rdzv-endpoint="$head_addr:$port" --rdzv-id="$SLURM_JOB_ID" \
  --max-restarts=0 \
  -m launch.train "${overrides[@]}" &
srun_pid=$!
# A USR1 that arrived before srun existed is passed on now.
[ "$usr1" = 1 ] && kill -USR1 "$srun_pid" 2>/dev/null

# `wait` returns early (status > 128) whenever a trapped signal arrives; keep waiting
# until srun has really ended, and keep its real exit status.
while :; do
  wait "$srun_pid"; rc=$?
  [ "$rc" -gt 128 ] || break
  kill -0 "$srun_pid" 2>/dev/null && continue
  wait "$srun_pid"; rc2=$?
  [ "$rc2" -ne 127 ] && rc=$rc2
  break
done
log "srun exited with $rc"

if [ -f "$run_dir/.preempted" ] && [ "$term" = 0 ]; then
  log "found $run_dir/.preempted: requeueing job $SLURM_JOB_ID"
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0
  fi
  log "scontrol requeue failed; resubmit by hand (the run resumes from $run_dir)"
  exit 1
fi
exit "$rc"
