"""Peak memory and wall time of `dsc export` on a model with real DeepSeek dimensions.

Builds a random-weight checkpoint from a real config.json (default: DeepSeek-R1-Distill-Qwen-1.5B)
in fp16, then runs `dsc export --dtype fp16` in a child process and reads the child's peak RSS
from the kernel (getrusage RUSAGE_CHILDREN). The budget is 2.5x the fp16 weight bytes.

    python benchmarks/export_memory.py \
        [--config examples/configs/DeepSeek-R1-Distill-Qwen-1.5B/config.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--config",
        type=Path,
        default=REPO / "examples/configs/DeepSeek-R1-Distill-Qwen-1.5B/config.json",
    )
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--budget", type=float, default=2.5)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dsc-export-mem-"))
    ckpt, out = work / "ckpt", work / "onnx"
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from dsc.fixtures import random_checkpoint; "
            "random_checkpoint(sys.argv[1], sys.argv[2], dtype='fp16')",
            str(args.config),
            str(ckpt),
        ],
        check=True,
        cwd=REPO,
    )
    make_s = time.perf_counter() - t0
    weight_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "dsc", "export", str(ckpt), "-o", str(out), "--dtype", "fp16"],
        check=True,
        cwd=REPO,
    )
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    if peak <= before * 1024:
        print("warning: the export child did not exceed the checkpoint maker's peak RSS")
    onnx_bytes = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))
    result = {
        "config": str(
            args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config
        ),
        "weight_bytes_fp16": weight_bytes,
        "export_wall_s": round(wall, 1),
        "peak_rss_bytes": peak,
        "peak_rss_over_weights": round(peak / weight_bytes, 2),
        "budget": args.budget,
        "onnx_bytes": onnx_bytes,
        "external_data": (out / "model.onnx.data").exists(),
        "make_checkpoint_s": round(make_s, 1),
    }
    print(json.dumps(result, indent=2))
    return 0 if peak <= args.budget * weight_bytes else 1


if __name__ == "__main__":
    sys.exit(main())
