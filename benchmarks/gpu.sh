#!/usr/bin/env bash
# The prepared GPU check of docs/gpu.md, one command, under 8 minutes on one H100:
#   1. tests/gpu (what `make test-gpu` runs), capped at TESTS_S seconds;
#   2. benchmarks/gpu_throughput.py (tokens/s and bf16 MFU, dense and MoE, against the anchors), which starts no new
#      run once the total passes TOTAL_S - 90 s and writes its rows after each run.
# Results: benchmarks/results/gpu.{json,md} and benchmarks/results/gpu_tests.log (copied to $OUT when that is set).
# Python: $PY if given, else .venv/bin/python if its torch sees a GPU, else python3; the repository goes on PYTHONPATH,
# so a machine whose python3 holds a CUDA torch and the project's dependencies needs no install.
set -uo pipefail
cd "$(dirname "$0")/.."
TESTS_S=${TESTS_S:-270}
TOTAL_S=${TOTAL_S:-470}

has_cuda() { "$1" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
if [ -z "${PY:-}" ]; then
    for candidate in .venv/bin/python python3; do
        if command -v "$candidate" >/dev/null && has_cuda "$candidate"; then PY=$candidate; break; fi
    done
fi
if [ -z "${PY:-}" ] || ! has_cuda "$PY"; then
    echo "gpu.sh: no python here whose torch sees a CUDA device; set PY=/path/to/python" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
mkdir -p benchmarks/results
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

timeout "$TESTS_S" "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu 2>&1 | tee benchmarks/results/gpu_tests.log
tests_rc=${PIPESTATUS[0]}
elapsed=$(( $(date +%s) - start ))
echo "tests/gpu: exit $tests_rc after ${elapsed} s"

budget=$(( TOTAL_S - 90 - elapsed ))
if [ "$budget" -lt 30 ]; then budget=30; fi
timeout $(( TOTAL_S - elapsed > 60 ? TOTAL_S - elapsed : 60 )) "$PY" benchmarks/gpu_throughput.py --budget-s "$budget"
bench_rc=$?
echo "benchmark: exit $bench_rc; total $(( $(date +%s) - start )) s"

if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/gpu.json benchmarks/results/gpu.md benchmarks/results/gpu_tests.log "$OUT"/ 2>/dev/null
fi
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
