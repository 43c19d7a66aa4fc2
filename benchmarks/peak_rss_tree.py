"""Run a command and report the largest sum of its and its descendants' resident sets.

GNU time reports the peak of one process (the largest); `dsc export` runs a second process
that writes model.onnx.data while the first traces (`dsc.export.prewrite`), so their peaks
at once are what a host must hold. Samples every 50 ms (psutil); growth between samples is
missed, and filling 1 GB of new pages takes longer than that.

usage: .venv/bin/python benchmarks/peak_rss_tree.py dsc export CKPT -o OUT --dtype fp16
prints: rc, wall s, the peak sum in GiB and when it was reached, each process's own peak.
"""

import subprocess
import sys
import time

import psutil


def main(argv: list[str]) -> int:
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(p.pid)
    peak_sum, when, peaks = 0, 0.0, {}
    t0 = time.time()
    while p.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        total = 0
        for q in procs:
            try:
                rss = q.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            peaks[q.pid] = max(peaks.get(q.pid, 0), rss)
        if total > peak_sum:
            peak_sum, when = total, time.time() - t0
        time.sleep(0.05)
    each = ", ".join(f"{v / 2**30:.2f}" for v in peaks.values())
    print(
        f"rc={p.returncode} wall={time.time() - t0:.1f}s peak_sum={peak_sum / 2**30:.2f} GiB "
        f"at {when:.1f}s; each process's peak (GiB): {each}"
    )
    return p.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
