#!/usr/bin/env bash
# A CI pipeline step: quantize, verify, and fail the pipeline when either fails.
#
#   MODEL=/models/Qwen2.5-7B-Instruct DATA=calib.json OUT=/models/Qwen2.5-7B-Instruct-GPTQ-Int4 \
#   EVAL=eval.txt bash scripts/ci_quantize_and_verify.sh
#
# Exit codes pass through: 0 ok, 1 a check failed (or quantization failed), 2 bad input.
set -euo pipefail
: "${MODEL:?set MODEL}" "${DATA:?set DATA}" "${OUT:?set OUT}"
BITS="${BITS:-4}"
QWEN_GPTQ="${QWEN_GPTQ:-qwen-gptq}"

"$QWEN_GPTQ" quantize --model_name_or_path "$MODEL" --data_path "$DATA" --out_path "$OUT" \
  --bits "$BITS" --group-size 128 --max_len "${MAX_LEN:-8192}" --overwrite --json -q > quantize.json
echo "quantized in $(python3 -c 'import json; print(round(json.load(open("quantize.json"))["wall_seconds"]))') s"

verify_args=("$OUT" --json -q)
if [ -n "${EVAL:-}" ]; then
  verify_args+=(--original "$MODEL" --eval-text "$EVAL" --max-ppl-increase "${MAX_PPL_INCREASE:-5}")
fi
set +e
"$QWEN_GPTQ" verify "${verify_args[@]}" > verify.json
status=$?
set -e
python3 - <<'PY'
import json
r = json.load(open("verify.json"))
for c in r["checks"]:
    print(f"{c['status']:5s} {c['name']:12s} {c['message']}")
PY
exit $status
