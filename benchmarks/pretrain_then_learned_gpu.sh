#!/usr/bin/env bash
# One GPU call that trains on synthetic pairs, packs the chain's state, then scores the new networks on the 24
# held-out 1 mm pairs (benchmarks/learned_1mm_gpu.py), for sessions with one short device call:
#
#   bash benchmarks/pretrain_then_learned_gpu.sh SECONDS OUT_DIR JOB [JOB ...]     (JOBs: pretrain_synthetic_gpu.sh)
#
# The 1 mm networks of jobs named reg_<loss>_1mm and the feature nets of seg_1mm / ae_1mm become the synthetic
# models folder; .gpudata/brain1mm is the run folder of `compare_1mm_gpu.py prepare`.
set -uo pipefail
SECONDS_LIMIT=${1:?seconds}; OUT_DIR=${2:?out dir}; shift 2
bash "$(dirname "$0")/pretrain_synthetic_gpu.sh" /tmp/chain "$SECONDS_LIMIT" "$OUT_DIR" "$@"
models=/tmp/synthetic_models; mkdir -p "$models"; losses=()
for job in "$@"; do
  name=${job%%:*}
  case $name in
    reg_*_1mm) loss=${name#reg_}; loss=${loss%_1mm}; cp /tmp/chain/"$name"/registration_"$loss".pt "$models"/ && losses+=("$loss");;
    seg_1mm|ae_1mm) cp /tmp/chain/"$name"/feature_*.pt "$models"/;;
  esac
done
python3 benchmarks/learned_1mm_gpu.py run --run-dir .gpudata/brain1mm --synthetic-models "$models" \
  --losses "${losses[@]}" --out /tmp/learned --base-methods identity affine affine+io ncc+io fireants
cp /tmp/learned/results*.csv "$OUT_DIR"/ 2>/dev/null
ls -la "$OUT_DIR"
