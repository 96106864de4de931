#!/usr/bin/env bash
# The CPU part of the paper reproduction: the command behind benchmarks/results/paper_cpu.md (2-core machine).
#
#   bash benchmarks/paper_cpu.sh [OUT_DIR]
#
# 1. brains (2 mm): 7 losses x 3 seeds, noise study (λ from the GPU sweep, see results/sweep_brain_2mm.md)
# 2. cells (2D): λ sweep of the 7 losses on the validation frames, written into configs/profiles/paper_cells.json
# 3. cells: 7 losses x 3 seeds, noise study; then the report of both datasets (seeds found are reused).
set -euo pipefail
OUT=$(realpath -m "${1:-deepsim_reproduce}")
REPO=$(cd "$(dirname "$0")/.." && pwd)
deepsim reproduce --datasets brain_mri --out "$OUT" --no-progress
deepsim sweep --profile paper_cells --relative 0.25 1 4 --out "$OUT/cells_sweep" --no-progress \
  --update-profile "$REPO/configs/profiles/paper_cells.json"
deepsim reproduce --out "$OUT" --no-progress
