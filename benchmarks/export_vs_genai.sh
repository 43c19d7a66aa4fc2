#!/usr/bin/env bash
# dsc export (fp16) against the ONNX Runtime GenAI builder (fp16, cpu) on one checkpoint, in
# rounds on one host: GenAI builder, dsc with the trace cache warm, [dsc warm with
# dsc/models/weights.py from $OLD_WEIGHTS_REV], dsc with the trace cache off
# (DSC_TRACE_CACHE=0), dsc as on a first export of the checkpoint (the trace cache and the
# checkpoint's sha256 cache both off: DSC_TRACE_CACHE=0 DSC_HASH_CACHE=0). Each run under GNU time (../shared/peers/measure.sh: wall, peak RSS; the
# .time logs hold user and system CPU); every dsc output is compared byte for byte with the
# first and deleted; `sync` and 5 s between runs. Prints one row per run:
# tag, user s, system s, wall, peak RSS KB.
#
# usage: bash benchmarks/export_vs_genai.sh CKPT [ROUNDS]
#   CKPT: e.g. python -c "import sys; from dsc.fixtures import random_checkpoint;
#         random_checkpoint(sys.argv[1], sys.argv[2], dtype='bf16')" \
#         examples/configs/DeepSeek-R1-Distill-Qwen-1.5B CKPT
#   needs: bash ../shared/peers/setup_venvs.sh ortgenai
#   PREWRITE_AB=1: adds dsc with onnx_ir writing model.onnx.data after the trace, in this
#   process (DSC_PREWRITE=0), warm and as a first export; the files have the same tensors
#   in another order, so "DIFFERENT BYTES" is expected for those runs.
#   DIRECT_AB=1: adds dsc with the data file written through the page cache
#   (DSC_DIRECT_IO=0), warm and as a first export; same bytes expected.
#   OLD_WEIGHTS_REV=<commit>: swaps that revision's weights.py in for the "old" runs (restored
#   on exit); the editable install takes the checkout's file, so no second venv is needed.
set -u
cd "$(dirname "$0")/.."
CK=$1; ROUNDS=${2:-3}
M=$(cd ../shared/peers && pwd)/measure.sh; V=/tmp/peer-venvs; O=${TMPDIR:-/tmp}/dsc-export-vs-genai
export PEER_RESULTS=$O-results; rm -rf "$O" "$PEER_RESULTS"; mkdir -p "$O"
cp dsc/models/weights.py "$O.weights.py"
trap 'cp "$O.weights.py" dsc/models/weights.py; rm -rf "$O"' EXIT
settle() { sync; sleep 5; }
dscx() {
  tag=$1; shift
  env DSC_CACHE_DIR="$O/cache" "$@" "$M" "$tag" 2400 .venv/bin/dsc export "$CK" -o "$O/$tag" --dtype fp16 > /dev/null
  # the stage's own peak: this process and its data-file writer (dsc.export.prewrite) at once
  echo "$tag: stage peak RSS $(grep -o '"peak_rss_bytes": [0-9]*' "$O/$tag/manifest.json" | grep -o '[0-9]*$') bytes"
  if [ -e "$O/ref" ]; then
    cmp -s "$O/ref/model.onnx.data" "$O/$tag/model.onnx.data" && cmp -s "$O/ref/model.onnx" "$O/$tag/model.onnx" \
      && echo "$tag: same bytes" || echo "$tag: DIFFERENT BYTES"
    rm -rf "${O:?}/$tag"
  else mv "$O/$tag" "$O/ref"; fi
  settle
}
genai() {
  "$M" "$1" 2400 $V/ortgenai/bin/python -m onnxruntime_genai.models.builder -i "$CK" -o "$O/$1" \
    -p fp16 -e cpu -c "$O/gcache" > /dev/null
  rm -rf "${O:?}/$1" "$O/gcache"; settle
}
new() { cp "$O.weights.py" dsc/models/weights.py; }
old() { git show "$OLD_WEIGHTS_REV:dsc/models/weights.py" > dsc/models/weights.py; }
cat "$CK"/*.safetensors > /dev/null  # the checkpoint in the page cache for every run
new; dscx new-fill  # fills the trace cache and the checkpoint hash cache
if [ -n "${OLD_WEIGHTS_REV:-}" ]; then old; dscx old-first; fi
for r in $(seq "$ROUNDS"); do
  genai "genai-$r"
  new; dscx "new-warm-$r"
  if [ -n "${OLD_WEIGHTS_REV:-}" ]; then old; dscx "old-warm-$r"; fi
  new; dscx "new-off-$r" DSC_TRACE_CACHE=0
  new; dscx "new-first-$r" DSC_TRACE_CACHE=0 DSC_HASH_CACHE=0
  if [ -n "${DIRECT_AB:-}" ]; then
    dscx "cached-warm-$r" DSC_DIRECT_IO=0
    dscx "cached-first-$r" DSC_DIRECT_IO=0 DSC_TRACE_CACHE=0 DSC_HASH_CACHE=0
  fi
  if [ -n "${PREWRITE_AB:-}" ]; then
    dscx "onnxir-warm-$r" DSC_PREWRITE=0
    dscx "onnxir-first-$r" DSC_PREWRITE=0 DSC_TRACE_CACHE=0 DSC_HASH_CACHE=0
  fi
done
for t in $(cut -f1 "$PEER_RESULTS/measure.tsv"); do
  printf "%s\t" "$t"
  grep -E "User time|System time|Elapsed|Maximum resident" "/tmp/peer-logs/$t.time" | awk -F': ' '{printf "%s\t", $2}'
  echo
done
