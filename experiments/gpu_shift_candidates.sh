#!/usr/bin/env bash
# The candidates for a shifted site, three seeds each, on a lent GPU in one call: the paper and tuned
# recipes with and without intensity augmentation (`pneumoscan compare`, validation split), then
# experiments/operating_points.py (threshold rules cross-fitted on validation patients) on each
# candidate's seeds, and experiments/prevalence_shift.py on the paper recipe's. The tuned candidate
# with the higher mean validation ROC AUC has its three best.pt copied to OUT (for ensembles and
# test-time augmentation, measured on a CPU); everything else comes back as OUT/results.tgz.
#
#   bash experiments/gpu_shift_candidates.sh DATA_ROOT OUT [BUDGET_SECONDS] [DEVICE] [EXTRA_COMPARE_FLAGS...]
#
# DEVICE `cpu` with a tiny data set and "--epochs 1 --seeds 0 1" checks the script itself without a GPU.
set -u
DATA=$1 OUT=$2 BUDGET=${3:-480} DEVICE=${4:-cuda}
shift $(( $# < 4 ? $# : 4 ))
WORK=$(mktemp -d) START=$SECONDS
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PNEUMOSCAN_CACHE=$WORK/cache
mkdir -p "$OUT" "$WORK/logs"
left() { local n=$((BUDGET - (SECONDS - START))); echo $((n > 5 ? n : 5)); }
ANALYSIS=${ANALYSIS_SECONDS:-120}  # kept back from the trainings for the analyses after them
pack() {
  tar czf "$OUT/results.tgz.tmp" --exclude='*.pt' --exclude=cache --exclude='*.png' --exclude=split.json \
    --exclude='report.html' -C "$WORK" . && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
}
INTENSITY=(--gamma 0.3 --contrast 0.3 --brightness 0.1)
candidate() {  # candidate NAME RECIPE [FLAGS...]: one background compare over three seeds
  local name=$1 recipe=$2; shift 2
  OMP_NUM_THREADS=3 timeout "$(($(left) - ANALYSIS))" python3 -m pneumoscan compare --data "$DATA" --device "$DEVICE" --no-progress \
    --recipe "$recipe" --activations prelu --out "$WORK/$name" "$@" >"$WORK/logs/$name.log" 2>&1 &
}
nvidia-smi -L 2>/dev/null; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
candidate paper paper "$@"
candidate paper-intensity paper "${INTENSITY[@]}" "$@"
candidate tuned tuned "$@"
candidate tuned-intensity tuned "${INTENSITY[@]}" "$@"
while [ -n "$(jobs -r)" ]; do sleep 15; pack; echo "$(left) s left: $(find "$WORK" -name summary.json | wc -l) runs done"; done
for name in paper paper-intensity tuned tuned-intensity; do
  echo "== $name"; tail -n 25 "$WORK/logs/$name.log"
  ckpts=("$WORK/$name"/prelu-s*/best.pt)
  [ -f "${ckpts[0]}" ] || continue
  timeout "$(left)" python3 experiments/operating_points.py "${ckpts[@]}" --data "$DATA" >"$WORK/logs/operating-$name.log" 2>&1 &
done
for c in "$WORK"/paper/prelu-s*/best.pt; do
  [ -f "$c" ] && timeout "$(left)" python3 experiments/prevalence_shift.py "$c" --data "$DATA" \
    >"$WORK/logs/prevalence-$(basename "$(dirname "$c")").log" 2>&1 &
done
wait; pack
for f in "$WORK"/logs/operating-*.log "$WORK"/logs/prevalence-*.log; do echo "== $f"; grep -v '^{' "$f" | tail -n 14; done
best=$(python3 - "$WORK" <<'PY'
import json, sys, pathlib
scores = {}
for name in ("tuned", "tuned-intensity"):
    f = pathlib.Path(sys.argv[1], name, "compare.json")
    if f.is_file():
        scores[name] = json.loads(f.read_text())["table"]["prelu"]["roc_auc"]["mean"]
print(max(scores, key=scores.get) if scores else "")
PY
)
echo "== chosen on validation ROC AUC: ${best:-none}"
for c in "$WORK/$best"/prelu-s*/best.pt; do [ -f "$c" ] && cp "$c" "$OUT/$best-$(basename "$(dirname "$c")").pt"; done
echo "== done after $((SECONDS - START)) s"
