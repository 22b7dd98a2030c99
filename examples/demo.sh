#!/usr/bin/env bash
# The whole job on the shipped example, on CPU, with nothing to download:
# install into .venv, quantize examples/qwen2-tiny to 4 bits, verify the result
# against the original. About three minutes on two CPU cores, most of it the install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
Q="${VENV:-$ROOT/.venv}/bin/qwen-gptq"
OUT="${OUT:-$ROOT/out/qwen2-tiny-gptq-int4}"
mkdir -p "$(dirname "$OUT")"
"$Q" quantize \
  --model_name_or_path "$ROOT/examples/qwen2-tiny" \
  --data_path "$ROOT/examples/calib.json" \
  --out_path "$OUT" --overwrite \
  --bits 4 --group-size 128 --max_len 512 --num-samples 128
"$Q" verify "$OUT" \
  --original "$ROOT/examples/qwen2-tiny" \
  --eval-text "$ROOT/examples/eval.txt"
