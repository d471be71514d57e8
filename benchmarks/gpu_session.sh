#!/usr/bin/env bash
# Everything this project measures on a lent GPU, in one call (the device is lent for minutes, not hours):
# the GPU tests and benchmarks/bench_gpu.py on an otherwise idle machine, then the experiments as
# several `pneumoscan compare` processes sharing the GPU (each run is small: one process leaves the GPU
# mostly idle). Every process stops when the time budget runs out. Results (JSON, Markdown, CSV, logs,
# comparison reports; no weights, no per-run plots) are packed into OUT/results.tgz every 20 s, so a
# call stopped at its limit still returns what had finished. `pneumoscan compare` on the unpacked
# folders then rebuilds each table from those files.
#
#   [PARTS="speed experiments"] bash benchmarks/gpu_session.sh DATA_ROOT OUT [BUDGET_SECONDS] [DEVICE]
#
# PARTS: `speed` is the GPU tests, bench_gpu.py and bench_setup.py; `experiments` the comparisons.
# DEVICE defaults to cuda; `cpu` with a tiny data set and SESSION_FLAGS="--epochs 1 --seeds 0 --batch-size 8"
# (appended to every comparison) checks the script itself on a machine without a GPU.
set -u
DATA=$1 OUT=$2 BUDGET=${3:-480} DEVICE=${4:-cuda} PARTS=${PARTS:-speed experiments}
WORK=$(mktemp -d) START=$SECONDS
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PNEUMOSCAN_CACHE=$WORK/cache
mkdir -p "$OUT" "$WORK/logs"
left() { echo $((BUDGET - (SECONDS - START))); }
pack() {
  tar czf "$OUT/results.tgz.tmp" --exclude='*.pt' --exclude=cache --exclude='*.png' --exclude=split.json \
    --exclude='eval-val/report.html' -C "$WORK" . && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
}
run() {  # run NAME COMMAND...: in the foreground, under the remaining budget
  local name=$1; shift
  echo "== $name ($(left) s left)"
  timeout "$(left)" "$@" >"$WORK/logs/$name.log" 2>&1
  echo "== $name: exit $?"; tail -n 30 "$WORK/logs/$name.log"; pack
}
experiments() {  # experiments NAME COMPARE_ARGS [; COMPARE_ARGS ...]: one background process, comparisons in turn
  local name=$1; shift
  (
    while [ $# -gt 0 ]; do
      args=(); while [ $# -gt 0 ] && [ "$1" != ";" ]; do args+=("$1"); shift; done; [ $# -gt 0 ] && shift
      echo "-- ${args[*]}"
      OMP_NUM_THREADS=3 timeout "$(left)" python3 -m pneumoscan compare --data "$DATA" --device "$DEVICE" --no-progress \
        "${args[@]}" ${SESSION_FLAGS:-}
      echo "-- exit $?"
    done
  ) >"$WORK/logs/$name.log" 2>&1 &
}

run info bash -c 'nvidia-smi; python3 -c "import torch, sys; print(sys.version, torch.__version__, torch.cuda.is_available())"'
if [[ $PARTS == *speed* && $DEVICE == cuda ]]; then
  run gpu-tests python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
  run bench-gpu python3 benchmarks/bench_gpu.py --full --data "$DATA" --json "$WORK/bench_gpu.json"
fi
[[ $PARTS == *speed* ]] && run bench-setup python3 benchmarks/bench_setup.py --data "$DATA"
[[ $PARTS == *experiments* ]] || { echo "== done after $((SECONDS - START)) s"; exit 0; }
python3 -c "import sys; sys.path.insert(0, 'src'); from pneumoscan.io.data import *" || exit 1
# Table IV over three seeds, the large-batch recipe (against table-iv's prelu runs), class imbalance
# (unweighted = table-iv's prelu), the recipes chosen on validation. Everything on the validation split.
experiments table-a --out "$WORK/table-iv" --activations relu leaky_relu
experiments table-b --out "$WORK/table-iv" --activations leaky_relu_30 prelu
experiments large --out "$WORK/large-batch" --activations prelu --recipe large-batch \
  ";" --out "$WORK/class-weight" --activations prelu --class-weight balanced
experiments resnet --out "$WORK/resnet18-224" --activations prelu --recipe resnet18-224
experiments other --out "$WORK/balanced-sampling" --activations prelu --sampling balanced \
  ";" --out "$WORK/tuned" --activations prelu --recipe tuned
while [ -n "$(jobs -r)" ]; do sleep 20; pack; echo "$(left) s left: $(find "$WORK" -name summary.json | wc -l) runs done"; done
for f in "$WORK"/logs/{table-a,table-b,large,resnet,other}.log; do echo "== $f"; grep -E "^--|Error|error" "$f" | tail -n 8; done
echo "== done after $((SECONDS - START)) s"
pack
