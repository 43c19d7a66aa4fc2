"""Verify-each: run ONNX Runtime on fixed small inputs after a pass and compare with before.

Inputs are made from the graph's own inputs, by role (see `dsc.backends.tensorrt.roles_for_input`):
two cases, a prefill (batch 2, 5 new tokens, empty past) and a decode step (batch 2, 1 new
token, 4 cached), so passes that branch on sequence length are checked on both branches.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from dsc.errors import CheckFailed

CASES = (("prefill", 2, 5, 0), ("decode", 2, 1, 4))


def _vocab(model: ir.Model) -> int:
    for node in model.graph:
        if (
            node.op_type == "Gather"
            and len(node.inputs) == 2
            and node.inputs[1] is not None
            and node.inputs[1].name == "input_ids"
        ):
            shape = node.inputs[0].shape
            if shape is not None and isinstance(shape[0], int):
                return shape[0]
    for out in model.graph.outputs:
        if out.name == "logits" and out.shape is not None and isinstance(out.shape[-1], int):
            return out.shape[-1]
    return 2


def make_feeds(model: ir.Model, batch: int, seq: int, past: int, seed: int = 0) -> dict:
    """Deterministic inputs for a dsc KV-cache graph (or any graph whose axes have roles)."""
    from dsc.backends.tensorrt import roles_for_input

    rng = np.random.default_rng(seed)
    sizes = {"batch": batch, "seq": seq, "past": past, "total": past + seq}
    vocab = _vocab(model)
    feeds = {}
    for value in model.graph.inputs:
        dims = [
            d if isinstance(d, int) else (d.value if d is not None else None)
            for d in (value.shape or [])
        ]
        roles = roles_for_input(value.name, dims)
        shape = tuple(r if isinstance(r, int) else sizes[r] for r in roles)
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        if value.dtype == ir.DataType.BFLOAT16:
            dtype = np.float32  # a bf16 graph runs as its float32 view (ort_run)
        if value.name == "input_ids":
            arr = rng.integers(0, vocab, shape)
        elif value.name == "attention_mask":
            arr = np.ones(shape)
        elif value.name == "position_ids":
            arr = np.broadcast_to(np.arange(past, past + seq), shape)
        elif np.issubdtype(dtype, np.floating):
            arr = rng.standard_normal(shape) * 0.5
        else:
            arr = rng.integers(0, 2, shape)
        feeds[value.name] = np.ascontiguousarray(arr, dtype=dtype)
    return feeds


def ort_run(model: ir.Model, feeds_list: list[dict]) -> list[list[np.ndarray]]:
    """Outputs of `model` for each feed dict (`inference_session`: a bf16 graph runs as its
    float32 view, external weights are read from their own directory, more than 1.5 GiB of
    in-memory weights go through a file)."""
    from dsc.backends.onnxruntime.runner import inference_session

    sess = inference_session(model)
    names = [o.name for o in sess.get_outputs()]
    return [sess.run(names, feeds) for feeds in feeds_list]


def max_abs_diff(ref: list[np.ndarray], new: list[np.ndarray]) -> float:
    worst = 0.0
    for a, b in zip(ref, new, strict=True):
        if a.shape != b.shape:
            return float("inf")
        if a.size:
            a32, b32 = a.astype(np.float64), b.astype(np.float64)
            scale = max(1.0, float(np.abs(a32).max()))
            worst = max(worst, float(np.abs(a32 - b32).max()) / scale)
    return worst


class Verifier:
    """Keeps the outputs of the last verified graph; `check` compares a new graph with them."""

    def __init__(self, model: ir.Model, *, atol: float = 1e-4):
        self.atol = atol
        self.feeds = [make_feeds(model, b, s, p) for _, b, s, p in CASES]
        self.reference = ort_run(model, self.feeds)

    def check(self, model: ir.Model, pass_name: str) -> float:
        try:
            outputs = ort_run(model, self.feeds)
        except Exception as e:  # ORT's own exception types
            raise CheckFailed(
                f"verify-each: the graph after pass {pass_name} does not run in "
                f"ONNX Runtime: {str(e).splitlines()[0]}"
            ) from None
        worst = max(max_abs_diff(r, o) for r, o in zip(self.reference, outputs, strict=True))
        if not worst <= self.atol:
            raise CheckFailed(
                f"verify-each: pass {pass_name} changed the outputs (max abs "
                f"difference {worst:.3g} > {self.atol:g})"
            )
        self.reference = outputs
        return worst
