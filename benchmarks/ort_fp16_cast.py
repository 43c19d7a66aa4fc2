"""ONNX Runtime's CPU provider and fp16 weights: the fp32 cast happens in every run.

    python benchmarks/ort_fp16_cast.py [--n 4096] [--runs 20]

One MatMul of a [1, n] fp16 activation by an [n, n] fp16 initializer, at the "basic"
optimization level dsc uses, with the CPU memory arena off and on: minor page faults and
milliseconds per run (after one warm-up run). A per-run fault count of about n*n*4/4096 means
the weight's fp32 copy is made (and mapped afresh) in every run; the arena keeps its buffer.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def measure(n: int, runs: int, arena: bool) -> tuple[float, float]:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).random((n, n)).astype(np.float16), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, n])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.enable_cpu_mem_arena = arena
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((1, n)).astype(np.float16)
    sess.run(None, {"x": x})
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(runs):
        sess.run(None, {"x": x})
    ms = (time.perf_counter() - t0) * 1e3 / runs
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / runs, ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    off = measure(args.n, args.runs, False)
    on = measure(args.n, args.runs, True)
    print(
        f"n={args.n}: arena off {off[0]:,.0f} faults/run {off[1]:.1f} ms/run; "
        f"arena on {on[0]:,.0f} faults/run {on[1]:.1f} ms/run; "
        f"off/on time {off[1] / on[1]:.2f}x"
    )


if __name__ == "__main__":
    main()
