#!/usr/bin/env bash
# One torchrun agent per machine, joined by a c10d rendezvous. Run it on every node with the same settings
# except NODE_RANK:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=8 launchers/multinode.sh CONFIG [--set key=value ...]
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 NPROC_PER_NODE=8 launchers/multinode.sh CONFIG [--set key=value ...]
#
# Environment (the first four are required):
#   NNODES            number of machines
#   NODE_RANK         this machine's index; node 0 must be MASTER_ADDR and hosts the rendezvous store
#   MASTER_ADDR       address of node 0, reachable from every node
#   NPROC_PER_NODE    processes per machine (GPUs per node; 1 or a few on CPU)
#   MASTER_PORT       rendezvous port on node 0 (default 29500)
#   MAX_RESTARTS      restarts of the whole job after a failure (default 0); each restart resumes from the latest
#                     checkpoint of run.dir, which must be on storage every node sees
#   RDZV_ID           job id shared by the nodes (default expertrain-MASTER_PORT)
#   PYTHON, OMP_NUM_THREADS, TORCHRUN_ARGS   as in launchers/local.sh
set -euo pipefail

usage() {
    echo "usage: NNODES=N NODE_RANK=R MASTER_ADDR=HOST NPROC_PER_NODE=P [MASTER_PORT=29500] [MAX_RESTARTS=0] \\" >&2
    echo "       $0 CONFIG [--set key=value ...]" >&2
    exit 2
}
[[ $# -ge 1 ]] || usage
for var in NNODES NODE_RANK MASTER_ADDR NPROC_PER_NODE; do
    [[ -n ${!var:-} ]] || { echo "$0: environment variable $var is not set" >&2; usage; }
done
CONFIG=$1
shift
[[ -f $CONFIG ]] || { echo "$0: config file '$CONFIG' not found" >&2; exit 2; }
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}
RDZV_ID=${RDZV_ID:-expertrain-$MASTER_PORT}
IS_HOST=$([[ $NODE_RANK == 0 ]] && echo 1 || echo 0)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# torch >= 2.5 lets the workers share the rendezvous store of the agents; a restarted job then can read the previous
# attempt's addresses from it and fail to connect (pytorch/pytorch#135712). A fresh store per attempt avoids that.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

# shellcheck source=launchers/_torchrun.sh
source "$ROOT/launchers/_torchrun.sh"

exec "${TORCHRUN[@]}" \
    --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
    --rdzv-conf "is_host=$IS_HOST" --max-restarts "$MAX_RESTARTS" ${EXTRA[@]+"${EXTRA[@]}"} \
    -m framework.train --config "$CONFIG" "$@"
