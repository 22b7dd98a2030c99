#!/bin/bash
# MoE experts on two GPUs, split by expert (QWEN_GPTQ_EXPERT_PARALLEL=1) or by Hessian (=0),
# against one GPU: a Qwen3-30B-A3B-shaped 5-layer cut, 128 x 2048 tokens, w4g128, runs
# alternating, each a separate process; layer_seconds from each report. With TIMELINE=1 a last
# pair of two-GPU runs writes timelines (scripts/timeline_summary.py reads them).
#   bash scripts/bench_expert_parallel.sh [WORKDIR]     (on a machine with 2 GPUs)
set -eu
cd "$(dirname "$0")/.."
W=${1:-/tmp/bench-ep}
mkdir -p "$W"
[ -d "$W/cut/model" ] || python3 scripts/bench_quantize.py --shape qwen3-30b-a3b --layers 5 --samples 128 \
    --seq-len 2048 --end-to-end --keep "$W/cut" --build-only > "$W/build.log" 2>&1
run() {  # name gpus switch [timeline]
  L="python3 -m qwen_gptq"; [ "$2" = 1 ] || L="torchrun --nproc-per-node $2 -m qwen_gptq"
  QWEN_GPTQ_EXPERT_PARALLEL=$3 QWEN_GPTQ_TIMELINE=${4:-} $L quantize --bits 4 --group-size 128 --overwrite --json \
    --model_name_or_path "$W/cut/model" --data_path "$W/cut/calib.json" --num-samples 128 --max_len 2048 \
    --out_path "$W/out-$1" > "$W/$1.json" 2> "$W/$1.err" || { tail -20 "$W/$1.err"; return 1; }
  python3 -c "import json; r=json.load(open('$W/$1.json')); print('$1', r['layer_seconds'], r['layers'][-1]['mean_loss'])"
  rm -rf "$W/out-$1"
}
for k in a b; do
  run "experts-$k" 2 1; run "hessians-$k" 2 0; run "one-$k" 1 0
done
if [ "${TIMELINE:-0}" = 1 ]; then
  run experts-tl 2 1 "$W/experts-tl"; run hessians-tl 2 0 "$W/hessians-tl"
fi
