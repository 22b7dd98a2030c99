#!/usr/bin/env bash
# Create (or reuse) .venv with qwen-gptq installed. Sourced by demo.sh and test.sh.
#   EXTRAS=dev,gptqmodel  which optional dependency groups to install (default: none)
#   VENV=.venv            where the virtual environment lives
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip_q() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
# torch first, pinned: on CPU machines this is the local CPU build; without the pin
# pip would resolve `torch` to a multi-GB CUDA build. On a GPU box install your CUDA
# torch into the venv before running this script; an installed torch is kept.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  pip_q "torch==${TORCH_VERSION:-2.13.0}"
fi
spec="$ROOT"
[ -n "${EXTRAS:-}" ] && spec="$ROOT[$EXTRAS]"
pip_q -e "$spec"
