# Sourced by the launchers (not run): with ROOT set to the repository, make framework/ importable, keep one OpenMP
# thread per rank, and pick the torchrun command: $PYTHON -m torch.distributed.run, else torchrun, else python3.
# Sets TORCHRUN (array) and EXTRA (array, from $TORCHRUN_ARGS).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [[ -n ${PYTHON:-} ]]; then
    TORCHRUN=("$PYTHON" -m torch.distributed.run)
elif command -v torchrun >/dev/null 2>&1; then
    TORCHRUN=(torchrun)
else
    TORCHRUN=(python3 -m torch.distributed.run)
fi
read -r -a EXTRA <<<"${TORCHRUN_ARGS:-}"
