#!/usr/bin/env bash
# Data-parallel scaling of registration training (NCC and DeepSim-seg at 160×192×224, the 1 mm brain grid):
# benchmarks/ddp_scaling.py under torchrun on 1, 2, 4 and 8 GPUs of this host (as many as it has), then the table.
#
#   bash benchmarks/ddp_scaling.sh                                   # -> benchmarks/results/ddp_scaling/
#   bash benchmarks/ddp_scaling.sh OUT_DIR --precision bf16 --steps 50   # extra arguments go to ddp_scaling.py
#   DDP_MAX_PROCS=2 bash benchmarks/ddp_scaling.sh /tmp/ddp_cpu --size 32 32 32 --steps 3 --warmup 1   # CPU, gloo
#
# Every N writes OUT_DIR/n<N>.json and rewrites OUT_DIR/ddp_scaling.md (efficiency against N = 1 of the same run
# settings). One thread per process for every N (torchrun's own default for N > 1), so N = 1 is comparable.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/ddp_scaling}
shift $(( $# > 0 ? 1 : 0 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
TORCHRUN=torchrun
command -v torchrun > /dev/null || TORCHRUN="python3 -m torch.distributed.run"
# DDP_MAX_PROCS: the largest N (default: the GPU count); DDP_MAX_PROCS=2 on a GPU-less host runs CPU processes (gloo)
MAX=${DDP_MAX_PROCS:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
[ "$MAX" -ge 1 ] || { echo "no CUDA GPU visible; set DDP_MAX_PROCS=2 for a CPU (gloo) check" >&2; exit 2; }
for N in 1 2 4 8; do
  [ "$N" -le "$MAX" ] || break
  # shellcheck disable=SC2206
  cmd=($TORCHRUN --standalone --nproc_per_node="$N" benchmarks/ddp_scaling.py --out "$OUT" "$@")
  "${cmd[@]}" --launch-command "OMP_NUM_THREADS=$OMP_NUM_THREADS ${cmd[*]}"
done
cat "$OUT/ddp_scaling.md"
