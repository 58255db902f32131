#!/usr/bin/env bash
# The transfer benchmark's full table on one GPU machine (README, "Transfer to new people and cameras").
#
#   benchmarks/run_transfer_gpu.sh REAL_DIR OUT_DIR [more bench_transfer.py flags]
#
# REAL_DIR is the YOLO export (images/{train,val}, labels/{train,val}); OUT_DIR receives the datasets,
# every run, results.json, table.md and bench_transfer.log. Run it again with the same OUT_DIR to
# finish an interrupted table: finished runs are reused, unfinished ones resume. JOBS (default 8)
# training runs share the GPU, each with nproc / JOBS CPU threads; PYTHON picks the interpreter.
set -euo pipefail
real=${1:?usage: $0 REAL_DIR OUT_DIR [bench_transfer.py flags]}
out=${2:?usage: $0 REAL_DIR OUT_DIR [bench_transfer.py flags]}
shift 2
jobs=${JOBS:-8}
threads=$(( $(nproc) / jobs > 0 ? $(nproc) / jobs : 1 ))
mkdir -p "$out"
out=$(cd "$out" && pwd)
real=$(cd "$real" && pwd)
cd "$(dirname "$0")/.."
unset MLFLOW_TRACKING_URI  # 50-odd short runs: no MLflow
"${PYTHON:-python}" benchmarks/bench_transfer.py --real-dir "$real" --work-dir "$out" --jobs "$jobs" \
    --threads "$threads" --workers "$jobs" --device cuda --data-on-device on --no-compile "$@" \
    2>&1 | tee -a "$out/bench_transfer.log"
