#!/usr/bin/env bash
# Install qwen-gptq with its test dependencies into .venv and run the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# (SETUP_DONE=1: the caller has just run setup_env.sh, as .ci/run does)
[ -n "${SETUP_DONE:-}" ] || EXTRAS="${EXTRAS:-dev}" bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "${VENV:-$ROOT/.venv}/bin/python" -m pytest -q "$@"
