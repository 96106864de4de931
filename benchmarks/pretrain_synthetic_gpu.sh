#!/usr/bin/env bash
# One call of the synthetic-pair pretraining chain on one GPU: several training jobs side by side, each resumed from
# its models folder under STATE_DIR when a training state is there, each stopped after SECONDS; afterwards STATE_DIR
# is packed into PACK_DIR as chain.tgz.part-* (files of at most 15 MiB, what the device tool brings back).
#
#   bash benchmarks/pretrain_synthetic_gpu.sh STATE_DIR SECONDS PACK_DIR JOB [JOB ...]
#
# A JOB is NAME:ARGS, ARGS the options of `python -m deepsim.workflows.pretrain` after --out, with commas for
# spaces, e.g. "reg_dice_1mm:--bank,.gpudata/bank_1mm.npz,--loss,dice". Unpack here with
#   cat PACK_DIR/chain.tgz.part-* | tar -xz -C STATE_DIR
set -uo pipefail
STATE=${1:?state dir}; SECONDS_LIMIT=${2:?seconds}; PACK=${3:?pack dir}; shift 3
mkdir -p "$STATE" "$PACK"
pids=()
for job in "$@"; do
  name=${job%%:*}; args=${job#*:}
  mkdir -p "$STATE/$name"
  resume=()
  ls "$STATE/$name"/*.state.pt >/dev/null 2>&1 && resume=(--resume)
  # shellcheck disable=SC2086
  python3 -m deepsim.workflows.pretrain --out "$STATE/$name" --time-limit "$SECONDS_LIMIT" "${resume[@]}" \
    ${args//,/ } > "$STATE/$name/call.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for job in "$@"; do
  name=${job%%:*}
  echo "== $name"; grep -v "non-tuple" "$STATE/$name/call.log" | tail -n 4
  tail -n 6 "$STATE/$name"/*.curve.csv 2>/dev/null
done
tar -cz -C "$STATE" . | split -b 15M - "$PACK/chain.tgz.part-"
ls -la "$PACK"
exit $status
