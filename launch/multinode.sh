#!/usr/bin/env bash
# One torchrun agent per node: run this same line on every node of the job (by hand, by pdsh, or from
# launch/slurm.sbatch through srun). The agents meet at a c10d rendezvous on MASTER_ADDR:MASTER_PORT, start
# NPROC_PER_NODE workers each, and restart the whole group up to MAX_RESTARTS times when a worker dies; the workers
# resume from the newest complete checkpoint of the run folder outputs/$RUN_ID (train.resume=auto).
#
#   NNODES=2 NPROC_PER_NODE=8 MASTER_ADDR=node0 RUN_ID=exp42 launch/multinode.sh parallel=dualpipe train.steps=1000
#
# Environment (defaults in brackets):
#   NNODES [1]          nodes in the job
#   NPROC_PER_NODE      workers per node [GPUs visible on this node, else 1]
#   MASTER_ADDR         host of the rendezvous (any node of the job, the same on all) [127.0.0.1]
#   MASTER_PORT [29500] its port
#   RUN_ID              the job's id: rendezvous id and run folder name, stable across restarts and requeues [required]
#   MAX_RESTARTS [0]    group restarts torchrun may do after a failure
#   TORCHRUN            the torchrun executable [torchrun on PATH, else .venv/bin/torchrun]
set -euo pipefail
cd "$(dirname "$0")/.."

: "${RUN_ID:?set RUN_ID to the job id (the same on every node)}"
NNODES="${NNODES:-1}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | grep -c '^GPU') || echo 1)
    [[ "$NPROC_PER_NODE" -ge 1 ]] || NPROC_PER_NODE=1
fi
TORCHRUN="${TORCHRUN:-$(command -v torchrun || echo .venv/bin/torchrun)}"

# torchrun's workers would otherwise reuse the agent's TCP store, and a restarted group then fails to connect
# ("Gloo connectFullMesh failed"): each group gets its own store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# every rank, on every node and after every restart, composes the same run folder: outputs/$DUET_RUN_ID
export DUET_RUN_ID="$RUN_ID"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

exec "$TORCHRUN" --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RUN_ID" \
    --max-restarts="$MAX_RESTARTS" -m launch.train "$@"
