"""AWQ's clip search at real shapes: this checkout's `search_clip` against another commit's.

    python benchmarks/awq_clip_search.py [--ref 243cb4a] [--down]

Random calibration rows [1024 x in] with 8 outlier channels and weights with outliers, at the
R1-Distill-Qwen-1.5B linear shapes ([1536 x 1536], [1536 x 8960], with --down [8960 x 1536]).
Prints per shape: seconds of each, their errors and the fraction of identical clip ratios.
`--ref` names the commit whose passes/quant/awq.py is the reference (default 243cb4a, the
residual-scoring search before the Gram form).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", default="243cb4a")
    ap.add_argument("--down", action="store_true", help="also [8960 x 1536] (slow for the ref)")
    args = ap.parse_args()
    from dsc.passes.quant import awq as new
    from dsc.passes.quant.qdq import QuantScheme

    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(
        ["git", "-C", str(root), "show", f"{args.ref}:passes/quant/awq.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("awq_ref", f.name)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    int4 = QuantScheme("int4", weight_only=True)
    rng = np.random.default_rng(0)
    shapes = [(1536, 1536), (1536, 8960)] + ([(8960, 1536)] if args.down else [])
    print("| [in x out] | ref s | this s | speedup | same ratios | error ref / this |")
    print("|---|---|---|---|---|---|")
    for n_in, n_out in shapes:
        x = rng.standard_normal((1024, n_in)).astype(np.float32)
        x[:, :8] *= 20
        w = (rng.standard_normal((n_in, n_out)) * 0.02).astype(np.float32)
        w[rng.integers(0, n_in, 300), rng.integers(0, n_out, 300)] *= 8
        t = time.perf_counter()
        r_new, e_new, _ = new.search_clip(x, w, int4)
        t_new = time.perf_counter() - t
        t = time.perf_counter()
        r_ref, e_ref, _ = ref.search_clip(x, w, int4)
        t_ref = time.perf_counter() - t
        print(
            f"| {n_in} x {n_out} | {t_ref:.1f} | {t_new:.1f} | {t_ref / t_new:.1f}x | "
            f"{np.mean(r_ref == r_new):.2%} | {e_ref:.6g} / {e_new:.6g} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
