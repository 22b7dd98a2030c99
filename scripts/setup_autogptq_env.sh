#!/usr/bin/env bash
# A separate environment with AutoGPTQ 0.7.1 itself, to prove it loads our output.
# AutoGPTQ is archived: it installs only beside transformers 4.44 and cannot quantize
# without CUDA, but it loads GPTQ checkpoints on CPU. BUILD_CUDA_EXT=0 skips its kernels.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AUTOGPTQ_VENV:-$ROOT/.venv-autogptq}"
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
pip_q() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip_q "torch==${TORCH_VERSION:-2.13.0}"
# pyarrow<18: newer pyarrow needs NumPy 2, which datasets<3 does not allow.
BUILD_CUDA_EXT=0 pip_q auto-gptq==0.7.1 transformers==4.44.2 peft==0.12.0 "datasets<3" "optimum<1.23" "pyarrow<18"
echo "$VENV/bin/python"
