#!/usr/bin/env bash
# Creates .venv in the project root and installs mlc into it (editable) with the demo, test and bench extras.
# Where no NVIDIA GPU is visible, the CPU build of torch is installed first so pip does not pull CUDA.
# usage: bash scripts/install.sh            (re-running it is cheap: it only adds what is missing)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install "torch==${MLC_TORCH_VERSION:-2.13.0}"
  else
    # CPU build: PyTorch's CPU index is tried briefly; pip's own sources (and local wheels) still count.
    pip install "torch==${MLC_TORCH_VERSION:-2.13.0}" --timeout 10 --retries 0 \
      --extra-index-url "${MLC_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
  fi
fi
pip install -q -e ".[demo,test,bench]"
echo "mlc installed in $root/.venv (activate with: . .venv/bin/activate)"
