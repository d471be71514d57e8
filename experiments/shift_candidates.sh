#!/usr/bin/env bash
# The shift benchmark's tables in docs/experiments.md ("Honest at a new site"). Runs of `tuned` on all of
# train (seeds 0-2) are scored at the synthetic sites with every adaptation option. Runs of `tuned` and of
# `tuned` with appearance augmentation trained without the NORMAL2-IM- normals (seeds 0-2) are scored at the
# site of those normals with every option, and at the synthetic sites without and with `adapt`.
# Resumable: finished runs and benchmark files are kept. Single-threaded processes, so that two can share
# a 2-core machine without stalling each other; about 3 hours there.
#
#     PNEUMOSCAN_DATA=/path/to/chest_xray experiments/shift_candidates.sh runs/shift
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/shift}
DATA=${PNEUMOSCAN_DATA:?set PNEUMOSCAN_DATA}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=.venv/bin/python
BENCH="$PY benchmarks/shift_benchmark.py --data $DATA"
mkdir -p "$OUT"
GROUP="$OUT/data-without-NORMAL2"
[ -d "$GROUP/train" ] || $BENCH --checkpoints none --make-group-root NORMAL2 "$GROUP"

declare -A FLAGS=([tuned]="--recipe tuned" [tuned-appearance]="--recipe tuned --gamma 0.3 --contrast 0.3 --brightness 0.1")
SHIFTS=(none "site A (flat, dark, soft, noisy)" "site B (bright, harsh, lossy)" "brightness +40" "gamma 1.6" "jpeg q15")

train() {  # name data seed out
  [ -f "$4/summary.json" ] && return 0
  .venv/bin/pneumoscan train ${FLAGS[$1]} --data "$2" --seed "$3" --out "$4" --overwrite --no-progress > "$4.log" 2>&1
}
sites() {  # json methods... -- checkpoints...
  local json=$1; shift; local methods=(); while [ "$1" != -- ]; do methods+=("$1"); shift; done; shift
  [ -f "$json" ] || $BENCH --checkpoints "$@" --shifts "${SHIFTS[@]}" --mixes 0.3 0.9 --methods "${methods[@]}" \
      --json "$json" > "${json%.json}.txt"
}
group() {  # json checkpoints...
  local json=$1; shift
  [ -f "$json" ] || $BENCH --checkpoints "$@" --group-site NORMAL2 --shifts none --mixes 0.3 0.6 0.9 \
      --json "$json" > "${json%.json}.txt"
}

for seed in 0 1 2; do train tuned "$DATA" "$seed" "$OUT/tuned-s$seed"; done
sites "$OUT/tuned-sites.json" none em bn adapt labels -- "$OUT"/tuned-s{0,1,2}/best.pt
for name in tuned tuned-appearance; do
  for seed in 0 1 2; do train "$name" "$GROUP" "$seed" "$OUT/$name-group-s$seed"; done
  group "$OUT/$name-group.json" "$OUT/$name"-group-s{0,1,2}/best.pt
  sites "$OUT/$name-group-sites.json" none adapt -- "$OUT/$name"-group-s{0,1,2}/best.pt
done
