#!/usr/bin/env bash
# The shift benchmark's table in docs/experiments.md ("Honest at a new site"): training options x 3 seeds,
# each trained on all of train (scored at synthetic sites) and on train without the NORMAL2-IM- normals
# (scored at a site of those normals), every adaptation option on every site. Resumable: finished runs and
# benchmark files are kept. About 4 hours on 2 CPU cores.
#
#     PNEUMOSCAN_DATA=/path/to/chest_xray experiments/shift_candidates.sh runs/shift
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/shift}
DATA=${PNEUMOSCAN_DATA:?set PNEUMOSCAN_DATA}
PY=.venv/bin/python
mkdir -p "$OUT"
GROUP="$OUT/data-without-NORMAL2"
[ -d "$GROUP/train" ] || $PY benchmarks/shift_benchmark.py --data "$DATA" --checkpoints none --make-group-root NORMAL2 "$GROUP"

declare -A FLAGS=(
  [paper]="--recipe paper"
  [tuned]="--recipe tuned"
  [tuned-appearance]="--recipe tuned --gamma 0.3 --contrast 0.3 --brightness 0.1"
)
SHIFTS=(none "site A (flat, dark, soft, noisy)" "site B (bright, harsh, lossy)" "brightness +40" "gamma 1.6" "jpeg q15")

train() {  # name data seed out
  [ -f "$4/summary.json" ] && return 0
  .venv/bin/pneumoscan train ${FLAGS[$1]} --data "$2" --seed "$3" --out "$4" --overwrite --no-progress > "$4.log" 2>&1
}

for name in tuned tuned-appearance paper; do
  for seed in 0 1 2; do
    train "$name" "$DATA" "$seed" "$OUT/$name-s$seed"
    train "$name" "$GROUP" "$seed" "$OUT/$name-group-s$seed"
  done
  ckpts=("$OUT/$name"-s{0,1,2}/best.pt)
  [ -f "$OUT/$name-sites.json" ] || $PY benchmarks/shift_benchmark.py --data "$DATA" --checkpoints "${ckpts[@]}" \
      --shifts "${SHIFTS[@]}" --mixes 0.3 0.9 --json "$OUT/$name-sites.json" > "$OUT/$name-sites.txt"
  groups=("$OUT/$name"-group-s{0,1,2}/best.pt)
  [ -f "$OUT/$name-group.json" ] || $PY benchmarks/shift_benchmark.py --data "$DATA" --checkpoints "${groups[@]}" \
      --group-site NORMAL2 --shifts none --mixes 0.3 0.6 0.9 --json "$OUT/$name-group.json" > "$OUT/$name-group.txt"
done
