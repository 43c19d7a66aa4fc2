"""A dsc graph run one decoder layer at a time: `OrtCausalLM`'s interface, one layer resident.

ONNX Runtime's CPU provider holds every weight of a session, and for an fp16 graph also casts
each weight to float32 in every run (docs/BENCHMARKS.md): the accuracy gate of
R1-Distill-Qwen-1.5B peaked at 14.8 GB on a 24 GB host, and a 7B graph (15 GB of fp16 weights)
does not fit at all. `SegmentedCausalLM` cuts the graph as the layer-wise calibration does
(`dsc.passes.quant.layerwise.SegmentPlan`: the nodes before layer 0, then one segment per
decoder layer, the final norm and lm_head with the last), and runs a step segment by segment,
each in its own ONNX Runtime session made when its turn comes. Sessions of the first segments
are kept while their weights fit `keep_bytes`; the others are made for each step and dropped
after it, so resident weights are `keep_bytes` plus one segment's, whatever the depth.
The values crossing segments (hidden state, rotary tables, mask) are passed along; fp16 ones
as float32, as ONNX Runtime carries them inside one graph. If nodes (MLA, MoE branches) run as
If nodes: the segments are cut around them.

The cost is a session per dropped segment per step (reading its weights again, from the page
cache). The numbers are those of the whole graph up to the fp16 rounding ONNX Runtime applies
at a segment's edge and not inside one graph (see `dsc.passes.quant.layerwise`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from dsc.backends.onnxruntime.runner import (
    OrtCausalLM,
    StepOutput,
    check_level,
    inference_session,
    spilled,
)
from dsc.errors import BadInput

# Weights (bytes, as stored) of the first segments whose sessions stay open between steps.
KEEP_BYTES = 1 << 30


class SegmentedCausalLM:
    """`OrtCausalLM` (same `step`, `empty_past`, `generate`, `io`) over one segment's session at
    a time; `keep_bytes`: weights of the leading segments kept open (0: none). `sessions_made`
    counts the sessions created (each segment's weight read once per creation).
    `extra_outputs`: main-graph values each step also returns, in `values` (name -> array;
    the layer locator's module outputs). Raises `BadInput` (exit 3) when a segment cannot be
    loaded."""

    generate = OrtCausalLM.generate

    def __init__(
        self,
        onnx_path,
        io_spec: dict,
        *,
        threads: int | None = None,
        optimization: str = "basic",
        keep_bytes: int = KEEP_BYTES,
        extra_outputs: tuple[str, ...] = (),
    ):
        import onnx_ir as ir

        from dsc.passes.quant.layerwise import SegmentPlan

        check_level(optimization)
        OrtCausalLM._take_io(self, io_spec)
        self._threads, self._optimization = threads, optimization
        model = onnx_path if hasattr(onnx_path, "graph") else ir.load(str(onnx_path))
        self._stack = contextlib.ExitStack()
        source, self._base_dir = self._stack.enter_context(spilled(model))
        self._proto = ir.to_proto(source)
        self._plan = SegmentPlan(self._proto)
        values = [*source.graph.inputs]
        values += [v for node in source.graph.all_nodes() for v in node.outputs]
        self._types = {v.name: v.dtype.value for v in values if v.dtype is not None}
        wanted = ["logits", *self.present_names]
        produced = {}
        for k, idxs in enumerate(self._plan.segments):
            for i in idxs:
                for o in self._proto.graph.node[i].output:
                    produced[o] = k
        missing = [n for n in wanted if n not in produced]
        if missing:
            raise BadInput(f"the graph does not produce {', '.join(missing)}")
        self._extra = [n for n in dict.fromkeys(extra_outputs) if n in produced]
        self._outputs = [
            list(
                dict.fromkeys(
                    sorted(self._plan.carry[k])
                    + [n for n in [*wanted, *self._extra] if produced[n] == k]
                )
            )
            for k in range(len(self._plan))
        ]
        self.values: dict[str, np.ndarray] = {}
        self._sizes = [self._segment_bytes(k) for k in range(len(self._plan))]
        self._kept: dict[int, tuple] = {}
        budget, self._keep = keep_bytes, set()
        for k, size in enumerate(self._sizes):
            if size > budget:
                break
            budget -= size
            self._keep.add(k)
        self.sessions_made = 0

    def _segment_bytes(self, k: int) -> int:
        from dsc.passes.quant.layerwise import reads

        g = self._proto.graph
        read = {n for i in self._plan.segments[k] for n in reads(g.node[i])}
        total = 0
        for t in g.initializer:
            if t.name in read:
                length = next((int(e.value) for e in t.external_data if e.key == "length"), None)
                total += length if length is not None else len(t.raw_data)
        return total

    def _session(self, k: int, feeds: dict):
        if k in self._kept:
            return self._kept[k]
        sub = self._plan.subgraph(self._proto, k, self._outputs[k], self._types, feeds)
        try:
            sess = inference_session(
                sub,
                base_dir=self._base_dir,
                optimization=self._optimization,
                threads=self._threads,
            )
        except Exception as e:  # ORT's own exception types
            raise BadInput(
                f"ONNX Runtime cannot load segment {k} of the graph: {str(e).splitlines()[0]}"
            ) from None
        self.sessions_made += 1
        entry = (sess, [o.name for o in sub.graph.output], {i.name for i in sess.get_inputs()})
        if k in self._keep:
            self._kept[k] = entry
        return entry

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return OrtCausalLM.empty_past(self, batch)

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list[np.ndarray],
    ) -> StepOutput:
        """One forward pass through every segment in turn (shapes as `OrtCausalLM.step`)."""
        from dsc.passes.quant.layerwise import wide

        store = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
            "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
        }
        store.update(zip(self.past_names, past, strict=False))
        results: dict[str, np.ndarray] = {}
        self.values = {}
        extra = set(self._extra)
        last_use = self._plan.last_use
        for k in range(len(self._plan)):
            sess, outs, inputs = self._session(k, store)
            feeds = {n: v for n, v in store.items() if n in inputs}
            got = dict(zip(outs, sess.run(outs, feeds), strict=True))
            del sess
            for name, value in got.items():
                if name in extra:
                    self.values[name] = value
                if name == "logits" or name in self.present_names:
                    results[name] = value
                elif name in self._plan.carry[k] or name.endswith(wide("")):
                    store[name] = value
            for name in [n for n in store if last_use.get(n.removesuffix(wide("")), -1) <= k]:
                del store[name]
        return StepOutput(results["logits"], [results[n] for n in self.present_names])

    def close(self) -> None:
        """Drop the kept sessions and the spilled copy of an in-memory graph, if any."""
        self._kept.clear()
        self._stack.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def causal_lm(onnx_path, io_spec: dict, *, by_layer: bool | None = None, **kw):
    """The runner for a dsc graph: `SegmentedCausalLM` when `by_layer` (None: when its weights
    exceed `dsc.backends.onnxruntime.runner.ARENA_MAX_WEIGHT_BYTES`, 1 GiB), else
    `OrtCausalLM` (`kw`: its options; `threads` and `optimization` reach either)."""
    from dsc.backends.onnxruntime.runner import ARENA_MAX_WEIGHT_BYTES, graph_weight_bytes

    if by_layer is None:
        by_layer = graph_weight_bytes(onnx_path) > ARENA_MAX_WEIGHT_BYTES
    if by_layer:
        keep = {k: kw[k] for k in ("threads", "optimization", "keep_bytes") if k in kw}
        return SegmentedCausalLM(onnx_path, io_spec, **keep)
    return OrtCausalLM(onnx_path, io_spec, **{k: v for k, v in kw.items() if k != "keep_bytes"})


def artifact_runner(artifact: Path, **kw):
    """`causal_lm` on an artifact's graph (`model_io.json` -> `onnx`)."""
    from dsc.artifacts import load_io_spec

    io = load_io_spec(artifact)
    return causal_lm(Path(artifact) / io["onnx"], io, **kw)
