#!/usr/bin/env bash
# The demo, end to end on a fresh machine: set up .venv, then take the tiny DeepSeek-V3 model
# trained on CPU (examples/models/tiny-deepseek-v3) through dsc and generate text from the result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
OUT=${DSC_DEMO_OUT:-demo-out}
MODEL=examples/models/tiny-deepseek-v3

echo "== dsc plan: does DeepSeek-R1-Distill-Qwen-1.5B fit a Jetson Orin Nano 8GB (Super) at INT8?"
dsc plan examples/configs/DeepSeek-R1-Distill-Qwen-1.5B --profile jetson-orin-nano-8gb-super \
  --precision int8 --batch 1 --context 4096

echo "== dsc export: checkpoint -> ONNX with a KV cache (MLA latent)"
dsc export "$MODEL" -o "$OUT/export" --dtype fp32 --force

echo "== dsc run: greedy generation through ONNX Runtime"
dsc run "$OUT/export" --prompt "And God said" --max-new-tokens 40

echo "== dsc build --int8: graph passes, SmoothQuant INT8 Q/DQ, a TensorRT-RTX engine for an"
echo "   RTX 4090 (SM89) compiled here without a GPU, and the accuracy gate against fp16"
dsc build "$MODEL" --profile rtx-4090 --int8 -o "$OUT/build"
dsc inspect "$OUT/build"
dsc verify "$OUT/build"
echo "engine: $OUT/build/engines/rtx-4090/model.engine   report: $OUT/build/report.html"
