"""fp16 `F.linear` on the CPU with the weight contiguous and as a transposed view of W^T (how
`model.onnx.data` stores a MatMul weight): whether this host's torch reads a transposed operand
at full speed (`dsc.export.streaming.native_strided_matmul`). Prints torch's oneDNN fp16 probe
and, per weight shape of the 1.5B and 7B, ms per call (mean of 20) both ways.

usage: python benchmarks/strided_matmul.py
docs/BENCHMARKS.md (session 14: AVX2 host; session 15: Sapphire Rapids host) has the figures.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from dsc.export.streaming import native_strided_matmul


def per_call_ms(x, w, n: int = 20) -> float:
    F.linear(x, w)
    t = time.perf_counter()
    for _ in range(n):
        F.linear(x, w)
    return (time.perf_counter() - t) / n * 1000


print(f"native_strided_matmul(float16): {native_strided_matmul(torch.float16)}")
for out_f, in_f in [(8960, 1536), (1536, 8960), (18944, 3584), (3584, 18944)]:
    w = torch.randn(out_f, in_f).half()
    view = w.t().contiguous().t()  # W as a view of the stored W^T
    x = torch.randn(6, in_f).half()
    same = torch.equal(F.linear(x, w), F.linear(x, view))
    a, b = per_call_ms(x, w), per_call_ms(x, view)
    print(f"[{out_f}, {in_f}]: contiguous {a:.2f} ms, transposed view {b:.2f} ms, equal {same}")
