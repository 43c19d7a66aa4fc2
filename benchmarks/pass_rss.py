"""RSS after each pass of the default pipeline on an exported artifact.

    python benchmarks/pass_rss.py ARTIFACT [--profile jetson-orin]

Loads the graph lazily (weights stay in model.onnx.data), then runs the passes one by one and
prints, per pass, its wall time and the process's RSS (`VmRSS`, anonymous and file-backed) and
high-water mark since the previous pass (`VmHWM`, reset through /proc/self/clear_refs), in MiB.
A pass that reads or builds weights shows as a step in RssAnon / RssFile. Linux only.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _mem() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) // 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> int:
    import onnx_ir as ir

    from dsc.artifacts import load_io_spec
    from dsc.hardware import load_profile
    from dsc.passes import PassContext, PassOptions
    from dsc.passes._pipeline import build_pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--profile", default="jetson-orin")
    args = ap.parse_args()
    ctx = PassContext(load_profile(args.profile), PassOptions())
    model = ir.load(args.artifact / load_io_spec(args.artifact)["onnx"])
    print(f"{'loaded':32s} {'':>7s} {_mem()}", flush=True)
    for name, p in build_pipeline(ctx):
        _reset_peak()
        t0 = time.perf_counter()
        p(model)
        print(f"{name:32s} {time.perf_counter() - t0:6.2f}s {_mem()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
