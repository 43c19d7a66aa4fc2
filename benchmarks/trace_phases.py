"""Time the phases of tracing a checkpoint's model cut to its first M layers, as the streaming
export traces it: imports, the fake model (whole, then cut), `torch.export.export`, the
exporter's `run_decompositions` with the ONNX decomposition table, and `torch.onnx.export` of
the exported program (its own decompositions again, then the translation). Prints one line per
phase and the node counts before and after the decompositions.

usage: python benchmarks/trace_phases.py CKPT [M]    (M: layers in the cut, default 1)
  CKPT: e.g. python -c "import sys; from dsc.fixtures import random_checkpoint;
        random_checkpoint(sys.argv[1], sys.argv[2], dtype='bf16')" \\
        examples/configs/DeepSeek-R1-Distill-Qwen-1.5B CKPT
docs/BENCHMARKS.md (session 14) has the 1.5B's figures for M = 1, 2, 3.
"""

from __future__ import annotations

import sys
import time
import warnings

t0 = time.perf_counter()


def lap(msg: str) -> None:
    global t0
    t = time.perf_counter()
    print(f"{t - t0:6.2f}s {msg}", flush=True)
    t0 = t


import torch  # noqa: E402

from dsc.export import onnx_export as oe  # noqa: E402
from dsc.export.streaming import fake_model  # noqa: E402
from dsc.models.checkpoint import inspect_checkpoint  # noqa: E402

lap("imports")
info = inspect_checkpoint(sys.argv[1])
m = int(sys.argv[2]) if len(sys.argv) > 2 else 1
fake_model(info, torch.float16)
lap("fake model, whole (the first imports the transformers model module)")
cut, buffers, mode = fake_model(info, torch.float16, num_layers=m)
lap(f"fake model, cut to {m} layers")
family = info.family
wrapper = oe.KVCacheWrapper(cut, family)
ids, mask, pos, cache = oe._export_example(cut.config.to_dict(), family, torch.float16)
args = tuple(mode.from_tensor(t) for t in (ids, mask, pos, *cache))
dynamic_shapes = oe.trace_dynamic_shapes(len(args) - 3)
with family.export_patches(), torch.no_grad(), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ep = torch.export.export(wrapper, args, dynamic_shapes=dynamic_shapes, strict=False)
    lap(f"torch.export.export ({len(ep.graph.nodes)} nodes)")
    from torch.onnx._internal.exporter import _decomp, _registration

    registry = _registration.ONNXRegistry.from_torchlib()
    table = _decomp.create_onnx_friendly_decomposition_table(set(registry.functions.keys()))
    decomposed = ep.run_decompositions(table)
    lap(f"run_decompositions, with the ONNX registry ({len(decomposed.graph.nodes)} nodes)")
    torch.onnx.export(ep, dynamo=True, optimize=False, verbose=False)
    lap("torch.onnx.export of the exported program (decompositions again, translation)")
