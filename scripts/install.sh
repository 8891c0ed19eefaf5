#!/usr/bin/env bash
# Create .venv (if missing) and install the project into it.
#
# torch is installed first and on its own, because its build decides gigabytes:
#   - no NVIDIA GPU: the CPU build. `torch==2.13.0` resolves to a CPU wheel where one lies in pip's
#     find-links (as on the project's dev/CI machines); elsewhere set
#     TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to get the CPU build from PyTorch's index.
#   - NVIDIA GPU (nvidia-smi works): the default PyPI build, which is the CUDA one.
#   - TIDE_TORCH_SPEC overrides the requirement (e.g. "torch==2.14.1").
# The project's own dependency range (torch>=2.13,<2.15) accepts either, so pip keeps what is here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
# pip warns once per package about this machine's extra local index folders; those lines are noise.
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }
$PIP install --quiet --disable-pip-version-check --upgrade pip 2>&1 | quiet
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TIDE_TORCH_SPEC:-}" ]; then
    spec="$TIDE_TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="torch>=2.13,<2.15"
    echo "[install] NVIDIA GPU found: installing the CUDA build of torch"
  else
    spec="torch==2.13.0"
    echo "[install] no GPU: installing the CPU build of torch"
  fi
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    $PIP install --quiet "$spec" --index-url "$TORCH_INDEX_URL" 2>&1 | quiet
  else
    $PIP install --quiet "$spec" 2>&1 | quiet
  fi
fi
$PIP install --quiet -e '.[dev]' 2>&1 | quiet
.venv/bin/python -c "import torch, tide_core; print('[install] torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
touch .venv/.installed
