#!/usr/bin/env bash
# The GPU part of the paper reproduction (benchmarks/results/paper_gpu.md), on one H100/H200.
#
#   bash benchmarks/paper_gpu.sh sweep OUT_DIR       # λ sweep of the seven losses on the 2 mm brains (validation
#                                                     # pairs); writes the chosen λ into paper_brain(_1mm).json
#   bash benchmarks/paper_gpu.sh reproduce OUT_DIR   # 1 mm brains, 3 seeds, noise study, report
#   bash benchmarks/paper_gpu.sh reproduce OUT_DIR paper_cpu brain_mri   # another experiment config / dataset
#
# Several processes share the one GPU (each alone leaves most of it idle: the networks are small). Concurrent
# processes log to their own SQLite MLflow stores (SQLite has one writer); the final reproduce call finds every
# seed's results, writes the report and logs it under one parent run in OUT_DIR/mlflow.db.
set -euo pipefail
PHASE=${1:?usage: paper_gpu.sh sweep|reproduce OUT_DIR}
OUT=$(realpath -m "${2:-gpu_out}")
mkdir -p "$OUT"
# three processes on one machine: split the CPU threads between them (16 threads each thrash 16 cores)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / 3 ))}
PROFILES=$(python3 -c "import deepsim.configs, os; print(os.path.dirname(deepsim.configs.__file__))")/profiles

wait_all() {  # wait for every pid given; fail with the log tail of the first that failed
  local i=0 pid
  for pid in "$@"; do
    wait "$pid" || { echo "job $i failed; see $OUT/job$i.log" >&2; tail -5 "$OUT/job$i.log" >&2; exit 1; }
    i=$((i + 1))
  done
}

if [ "$PHASE" = sweep ]; then
  pids=()
  i=0
  for losses in "mse ncc ncc-sup" "nmi mind" "deepsim-ae deepsim-seg"; do
    # shellcheck disable=SC2086
    python3 -m deepsim.cli sweep --profile paper_brain --losses $losses --relative 0.25 0.5 1 2 4 \
      --out "$OUT/sweep$i" --device cuda --no-progress \
      --update-profile "$PROFILES/paper_brain.json" "$PROFILES/paper_brain_1mm.json" > "$OUT/job$i.log" 2>&1 &
    pids+=($!)
    i=$((i + 1))
    sleep 20  # the three processes update the same profile files at their ends; stagger their starts
  done
  wait_all "${pids[@]}"
  cat "$OUT"/sweep*/sweep/sweep.md
elif [ "$PHASE" = reproduce ]; then
  CONFIG=${3:-paper_gpu}
  DATASETS=${4:-brain_mri}
  pids=()
  for seed in 0 1 2; do
    python3 -m deepsim.cli reproduce --config "$CONFIG" --datasets "$DATASETS" --seeds "$seed" --out "$OUT" \
      --device cuda --no-progress --tracking-uri "sqlite:///$OUT/mlflow_seed$seed.db" > "$OUT/job$seed.log" 2>&1 &
    pids+=($!)
  done
  wait_all "${pids[@]}"
  python3 -m deepsim.cli reproduce --config "$CONFIG" --datasets "$DATASETS" --out "$OUT" --device cuda --no-progress
else
  echo "unknown phase $PHASE; use sweep or reproduce" >&2
  exit 2
fi
