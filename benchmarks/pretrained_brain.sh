#!/usr/bin/env bash
# Train the pretrained brain model that `deepsim register` uses by default (bundles/brain_mri/models/pretrained/),
# on one GPU: profile configs/profiles/pretrained_brain.json (1 mm, diffeomorphic, contrast randomisation of the
# network inputs, training stopped by the stages' time limits). Two candidate losses train side by side:
#
#   bash benchmarks/pretrained_brain.sh OUT_DIR
#
# OUT_DIR/ncc and OUT_DIR/deepsim-seg are ordinary `deepsim run` output folders (data/, models/, report/,
# mlflow.db); the second reuses the first's prepared data (same profile, so the same cached dataset).
set -euo pipefail
OUT=$(realpath -m "${1:?usage: pretrained_brain.sh OUT_DIR}")
mkdir -p "$OUT/deepsim-seg"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / 2 ))}
python3 -m deepsim.cli run --profile pretrained_brain --losses ncc --out "$OUT/ncc" --device cuda --no-progress \
  > "$OUT/ncc.log" 2>&1 &
first=$!
until [ -f "$OUT/ncc/data/datalist.json" ]; do  # the data is written to a temporary folder, then renamed
  kill -0 "$first" 2>/dev/null || { tail -5 "$OUT/ncc.log" >&2; exit 1; }
  sleep 5
done
ln -sfn "$OUT/ncc/data" "$OUT/deepsim-seg/data"
python3 -m deepsim.cli run --profile pretrained_brain --losses deepsim-seg --out "$OUT/deepsim-seg" --device cuda \
  --no-progress > "$OUT/deepsim-seg.log" 2>&1 &
second=$!
wait "$first" || { tail -5 "$OUT/ncc.log" >&2; exit 1; }
wait "$second" || { tail -5 "$OUT/deepsim-seg.log" >&2; exit 1; }
tail -n 12 "$OUT/ncc.log" "$OUT/deepsim-seg.log"
