#!/usr/bin/env bash
# Warm `dsc export --dtype fp16` of one checkpoint by two revisions of dsc, alternating, in one
# run: OLD_REV from a temporary git worktree, the checkout as it is (uncommitted changes
# included), both through this checkout's .venv (`python -m dsc` run from each tree, so each
# imports its own dsc). Each revision fills its own trace cache first ("fill-*" rows: a trace
# and, for the first, the checkpoint's hash). Every output's model.onnx.data is compared byte
# for byte with the first. Prints: tag, wall s, user s, system s, peak RSS KB.
#
# usage: bash benchmarks/ab_export.sh CKPT ROUNDS OLD_REV
set -u
cd "$(dirname "$0")/.."
CK=$1; ROUNDS=$2; OLD=$3
T=$(mktemp -d); NEW=$(pwd)
trap 'git worktree remove --force "$T/old" >/dev/null 2>&1; rm -rf "$T"' EXIT
git worktree add -q --detach "$T/old" "$OLD"
run() { tag=$1; dir=$2
  rm -rf "$T/out"; sync; sleep 3
  ( cd "$dir" && env DSC_CACHE_DIR="$T/cache-$(basename "$dir")" /usr/bin/time -f "$tag %e %U %S %M" \
      "$NEW/.venv/bin/python" -m dsc export "$CK" -o "$T/out" --dtype fp16 2>&1 >/dev/null | tail -1 )
  if [ -e "$T/ref" ]; then
    cmp -s "$T/ref/model.onnx.data" "$T/out/model.onnx.data" || echo "$tag: DIFFERENT model.onnx.data"
  else mv "$T/out" "$T/ref"; fi
}
cat "$CK"/*.safetensors > /dev/null  # the checkpoint in the page cache for every run
run fill-old "$T/old"; run fill-new "$NEW"
for r in $(seq "$ROUNDS"); do run "old-warm-$r" "$T/old"; run "new-warm-$r" "$NEW"; done
