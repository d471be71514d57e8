#!/usr/bin/env bash
# Create the *separate* TensorFlow/Keras venv used only by benchmarks/keras_baseline.py.
# TensorFlow is never a dependency of pneumoscan itself; this venv lives at .venv-tf/ (gitignored).
#
#   bash benchmarks/setup_tf.sh            # creates /work/main/.venv-tf (repo-root/.venv-tf)
#   VENV_TF=/some/where bash benchmarks/setup_tf.sh
#
# Then:  .venv-tf/bin/python benchmarks/keras_baseline.py train --data DATA/train --steps 60
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_TF="${VENV_TF:-$ROOT/.venv-tf}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ ! -x "$VENV_TF/bin/python" ]; then
    "$PYTHON" -m venv "$VENV_TF"
fi
PIP=("$VENV_TF/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip

# tensorflow-cpu has no CUDA wheels to drag in (much smaller); fall back to tensorflow
# where tensorflow-cpu is not published for this Python/platform.
# scipy is required by ImageDataGenerator's zoom (affine transform); pillow by load_img.
EXTRA=(pillow scipy numpy)
if ! "${PIP[@]}" install "tensorflow-cpu${TF_VERSION:+==$TF_VERSION}" "${EXTRA[@]}"; then
    echo "tensorflow-cpu not installable here; trying tensorflow" >&2
    "${PIP[@]}" install "tensorflow${TF_VERSION:+==$TF_VERSION}" "${EXTRA[@]}"
fi

TF_CPP_MIN_LOG_LEVEL=3 "$VENV_TF/bin/python" - <<'PY'
import tensorflow as tf, keras, scipy, PIL, numpy
print(f"tensorflow {tf.__version__}  keras {keras.__version__}  numpy {numpy.__version__}  "
      f"scipy {scipy.__version__}  pillow {PIL.__version__}")
PY
du -sh "$VENV_TF" 2>/dev/null || true
