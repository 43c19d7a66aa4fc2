#!/usr/bin/env bash
# What direct I/O in the export costs the next stage: `dsc export --dtype fp16` then
# `dsc optimize` on its output, with the data file written directly (O_DIRECT, the default) and
# through the page cache (DSC_DIRECT_IO=0), alternating, in one run. A direct write leaves
# model.onnx.data out of the page cache, so `dsc optimize` reads it from the device; a buffered
# write leaves (some of) it cached. The checkpoint is read into the page cache before every
# pair; the trace cache is warm (filled first). Prints one line per command:
# tag stage wall_s user_s system_s peak_rss_kb, then each pair's export + optimize sum.
#
# usage: bash benchmarks/direct_io_downstream.sh CKPT [ROUNDS]
set -u
cd "$(dirname "$0")/.."
CK=$1; ROUNDS=${2:-2}
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
export DSC_CACHE_DIR="$T/cache"
step() { tag=$1; stage=$2; shift 2
  /usr/bin/time -f "$tag $stage %e %U %S %M" "$@" 2>&1 >/dev/null | tail -1 | tee -a "$T/times"
}
pair() { tag=$1; direct=$2
  rm -rf "$T/exp" "$T/opt"; cat "$CK"/*.safetensors > /dev/null; sync; sleep 3
  step "$tag" export env DSC_DIRECT_IO="$direct" .venv/bin/dsc export "$CK" -o "$T/exp" --dtype fp16
  step "$tag" optimize .venv/bin/dsc optimize "$T/exp" -o "$T/opt"
}
pair fill 1
for r in $(seq "$ROUNDS"); do pair "direct-$r" 1; pair "cached-$r" 0; done
awk '$1 != "fill" { s[$1] += $3 } END { for (t in s) printf "%s export+optimize %.2f s\n", t, s[t] }' \
  "$T/times" | sort
