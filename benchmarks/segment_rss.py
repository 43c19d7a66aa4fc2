"""Peak RSS of each segment's run when `SegmentedCausalLM` steps a graph one layer at a time.

    python benchmarks/segment_rss.py ART [KEEP_BYTES]

Runs the accuracy gate's kinds of step on ART's graph (random token ids): a prefill of 3
windows of 128 tokens, a prompt of 8 x 64, then two teacher-forced decode steps of batch 8, and
for each step prints its wall time and the largest peak RSS (VmHWM, reset before each segment's
run) with the segment it came from; then every segment of the last step: (segment, RSS before
its run, peak during it, RSS after), GiB. Used to find what the gate holds (docs/BENCHMARKS.md,
session 7).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from dsc.backends.onnxruntime.segmented import KEEP_BYTES, artifact_runner
from dsc.pipeline.progress import peak_rss_bytes, reset_peak_rss

GIB = 1 << 30


def rss() -> int:
    text = Path("/proc/self/status").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def main() -> None:
    art = Path(sys.argv[1])
    keep = int(sys.argv[2]) if len(sys.argv) > 2 else KEEP_BYTES
    runner = artifact_runner(art, by_layer=True, keep_bytes=keep)
    sizes = [s >> 20 for s in runner._sizes]
    print(f"{len(sizes)} segments, weights MiB {sizes}; kept: {sorted(runner._keep)}")
    rows: list[tuple[int, float, float, float]] = []
    make = runner._session

    def session(k, feeds):
        sess, outs, inputs = make(k, feeds)

        class Timed:
            @staticmethod
            def run(names, feed):
                before = rss()
                reset_peak_rss()
                got = sess.run(names, feed)
                rows.append((k, before / GIB, peak_rss_bytes() / GIB, rss() / GIB))
                return got

        return Timed, outs, inputs

    runner._session = session

    def step(name, ids, mask, pos, past):
        rows.clear()
        t = time.perf_counter()
        out = runner.step(ids, mask, pos, past)
        k, before, peak, _ = max(rows, key=lambda r: r[2])
        print(
            f"{name}: {time.perf_counter() - t:.1f} s; largest peak {peak:.2f} GiB in segment "
            f"{k} (RSS before its run {before:.2f})"
        )
        return out

    rng = np.random.default_rng(0)
    ids = rng.integers(0, int(runner.io.get("vocab_size", 32000)), size=(8, 128))
    w = ids[:3]
    arange = np.broadcast_to(np.arange(128), w.shape).copy()
    step("prefill 3 x 128", w, np.ones_like(w), arange, runner.empty_past(3))
    p = ids[:, :64]
    pos = np.broadcast_to(np.arange(64), p.shape).copy()
    out = step("prompt 8 x 64", p, np.ones_like(p), pos, runner.empty_past(8))
    for k in range(2):
        mask = np.ones((8, 65 + k), dtype=np.int64)
        pos = np.full((8, 1), 64 + k, dtype=np.int64)
        out = step(f"decode {k}", ids[:, 64 + k : 65 + k], mask, pos, out.present)
    for k, before, peak, after in rows:
        print(f"segment {k}: before {before:.2f}, peak {peak:.2f}, after {after:.2f} GiB")


if __name__ == "__main__":
    main()
