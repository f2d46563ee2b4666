#!/usr/bin/env bash
# One machine, NPROC training processes under torchrun (--standalone: no rendezvous server to set up).
#
#   launchers/local.sh NPROC CONFIG [--set key=value ...]
#   launchers/local.sh 2 examples/configs/quickstart.yaml --set train.steps=100
#
# Everything after CONFIG goes to `python -m framework.train` unchanged. Environment:
#   PYTHON            interpreter that runs torchrun and the workers (default: torchrun from PATH, else python3)
#   OMP_NUM_THREADS   threads per process (default 1, as torchrun would set)
#   TORCHRUN_ARGS     extra torchrun options, e.g. "--max-restarts=3" (split on spaces)
set -euo pipefail

usage() {
    echo "usage: $0 NPROC CONFIG [--set key=value ...]   (e.g. $0 2 examples/configs/quickstart.yaml)" >&2
    exit 2
}
[[ $# -ge 2 ]] || usage
NPROC=$1
CONFIG=$2
shift 2
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || { echo "$0: NPROC must be a positive integer, got '$NPROC'" >&2; usage; }
[[ -f $CONFIG ]] || { echo "$0: config file '$CONFIG' not found" >&2; exit 2; }

# framework/ is importable from the repository without installing it; relative paths stay relative to $PWD.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# shellcheck source=launchers/_torchrun.sh
source "$ROOT/launchers/_torchrun.sh"

exec "${TORCHRUN[@]}" --standalone --nproc_per_node "$NPROC" ${EXTRA[@]+"${EXTRA[@]}"} \
    -m framework.train --config "$CONFIG" "$@"
