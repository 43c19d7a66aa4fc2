"""VocabQDQPass: the two vocabulary-sized weights stored quantized, weight-only.

The input embedding table and the output head (lm_head) are each vocab × hidden, 1.1 GB apiece in
fp16 for a 152,064 × 3,584 vocabulary (R1-Distill-Qwen-7B). `InsertQDQPass` keeps both in float
(`DEFAULT_EXCLUDE`); this pass quantizes them when asked, weight-only (activations stay float):

    lm_head     x ─▶ MatMul ◀── W [H, V] (float)
                x ─▶ MatMul ◀── DequantizeLinear ◀── Wq [H, V]            (per output channel;
                                                                         int4: block 128 along H)
    embedding   ids ─▶ Gather ◀── T [V, H] (float)
                ids ─▶ Gather ◀── DequantizeLinear ◀── Tq [V, H]          (per row = per token;
                                                                         int4: block 128 along H)
    tied        (tie_word_embeddings: one table T, read by the Gather and by Transpose → MatMul)
                ids ─▶ Gather ◀── DequantizeLinear ◀── Tq [V, H]
                x ─▶ MatMul ◀── Transpose ◀──┘       (one quantized table for both)

The scales are those `quantize_weight` fits for an [in, out] weight: per output channel
(int8, fp8 E4M3) or per block of 128 input rows and per output channel (int4), symmetric, stored
in the graph's float dtype. For the embedding the table is quantized as its transpose [H, V], so
"per output channel" is one scale per vocabulary row and int4 blocks run along H, exactly
lm_head's layout: a tied table quantized once serves both readers.

Why DequantizeLinear before the Gather (measured with TensorRT-RTX 1.7.1, SM75–SM120,
`benchmarks/probe_embedding_forms.py`): TensorRT refuses a quantized constant read by anything
but a DequantizeLinear ("Quantized constant (table_q) is only allowed before DQ"; for int4/fp8
"… has datatype Int4 but is not consumed by … IDequantizeLayer"), so Gather → DequantizeLinear of
the gathered rows (with gathered scales) and Gather → Cast → Mul do not build on any target, and
ONNX Runtime has no Gather for int4 or fp8. DequantizeLinear → Gather builds and the engine keeps
the table quantized (its weight memory is the int8/int4/fp8 table plus scales, no scratch for a
dequantized copy). On a tied table TensorRT-RTX stores int8/fp8 twice (once per reader; the
engine's weights equal the fp16 table's), int4 once.

Targets: the embedding is the main-graph Gather (axis 0) of a 2-D float initializer whose module
is `*embed_tokens*` or whose indices are the `input_ids` graph input; lm_head is the main-graph
MatMul of module `*lm_head*` whose weight is a 2-D float initializer or a Transpose(perm [1, 0])
of one (tied). A table read by both is tied, and both must be asked for at the same precision
(`Unsupported` otherwise: quantizing only one reader would keep the float table and add a copy).

Idempotent: a table or weight that already comes from a DequantizeLinear is not a target, so a
second run returns `modified=False`. `report` says what was quantized: precision, block size,
scale layout, shapes and the bytes before and after, per weight (the manifest records it).
"""

from __future__ import annotations

import fnmatch
import logging

import numpy as np
import onnx_ir as ir

from dsc.errors import Unsupported
from dsc.node_meta import module_path
from dsc.passes._ir import DerivedTensor, iter_rows
from dsc.passes.quant.qdq import (
    QuantScheme,
    check_scales,
    int4_block,
    quantize_weight,
    quantize_with_scale,
    weight_amax,
    weight_dq_inputs,
    weight_scale,
)
from dsc.precision import QUANTIZED

logger = logging.getLogger(__name__)

PRECISIONS = QUANTIZED  # what each vocabulary table may be stored at
BLOCK_SIZE = 128  # int4: the block along the hidden (input) dimension, as InsertQDQPass uses
_BITS = {"int8": 8, "fp8": 8, "int4": 4}
_QTYPE = {"int8": ir.DataType.INT8, "int4": ir.DataType.INT4, "fp8": ir.DataType.FLOAT8E4M3FN}
# The tables are quantized in row chunks of about this many float32 bytes, read from the data
# file one chunk at a time (R1-Distill-Qwen-7B: each table is 152,064 x 3,584, 2.2 GB in
# float32): the pass holds one chunk and the scales, never a table.
CHUNK_BYTES = 64 << 20


def _float_init(v: ir.Value | None) -> bool:
    return (
        v is not None
        and v.const_value is not None
        and v.dtype is not None
        and v.dtype.is_floating_point()
        and len(v.shape or ()) == 2
    )


def find_embedding(model: ir.Model) -> ir.Node | None:
    """The main-graph Gather that reads the input embedding table, or None."""
    inputs = {v.name for v in model.graph.inputs}
    for node in model.graph:
        if (
            node.op_type != "Gather"
            or node.domain not in ("", "ai.onnx")
            or node.attributes.get_int("axis", 0) != 0
            or not _float_init(node.inputs[0])
        ):
            continue
        mod = module_path(node) or ""
        ids = node.inputs[1]
        if fnmatch.fnmatchcase(mod, "*embed_tokens*") or (
            ids is not None and ids.name in inputs and ids.name == "input_ids"
        ):
            return node
    return None


def find_lm_head(model: ir.Model) -> tuple[ir.Node, ir.Value, ir.Node | None] | None:
    """(MatMul, weight initializer, Transpose or None) of the output head, or None.

    The weight is W [H, V] read by the MatMul directly, or T [V, H] through a 2-D Transpose
    (a tied table, which the export keeps as one initializer)."""
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        if not fnmatch.fnmatchcase(module_path(node) or "", "*lm_head*"):
            continue
        w = node.inputs[1]
        if _float_init(w):
            return node, w, None
        p = w.producer() if w is not None else None
        if (
            p is not None
            and p.op_type == "Transpose"
            and _float_init(p.inputs[0])
            and list(p.attributes.get_ints("perm", [1, 0])) == [1, 0]
        ):
            return node, p.inputs[0], p
    return None


def quantize_table(
    table: np.ndarray, precision: str, scale_dtype=np.float32
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(quantized [V, H], scale, DequantizeLinear attributes) of an embedding table [V, H].

    int8 / fp8: one scale per row, shape [V], `axis` 0. int4: one per block of 128 along H
    (the largest divisor of H up to 128 for small H, `int4_block`), shape [V, H / block],
    `axis` 1 and `block_size`. Exactly `quantize_weight` of the transpose [H, V], transposed back.
    """
    q, s, attrs = quantize_weight(
        np.ascontiguousarray(table.T), QuantScheme(precision, True), scale_dtype=scale_dtype
    )
    q = np.ascontiguousarray(q.T)
    if "block_size" in attrs:
        return q, np.ascontiguousarray(s.T), {"axis": 1, "block_size": attrs["block_size"]}
    return q, s, {"axis": 0}


class ChunkedQuantTensor(DerivedTensor):
    """A vocabulary table's quantized weight, computed from its float source when read, in row
    chunks: `chunks()` yields (first row, quantized rows); `tofile` (what onnx_ir's external-data
    writer calls) writes them one chunk at a time, so the quantized table is never whole in
    memory either. `numpy()` assembles it (tests, passes that read it)."""

    def __init__(self, chunks, dtype: ir.DataType, shape, *, name: str, source, rows: int):
        def whole():
            out = np.empty(tuple(shape), dtype=dtype.numpy())
            for r0, q in chunks():
                out[r0 : r0 + q.shape[0]] = q
            return ir.Tensor(out, name=name)

        super().__init__(
            whole,
            dtype,
            ir.Shape(list(shape)),
            name=name,
            sources=(source.name,),
            source_tensors=(source,),
        )
        self.chunks = chunks
        # Packed sub-byte chunks join up only if every chunk but the last ends on a byte.
        per_row = int(np.prod(tuple(shape)[1:], dtype=np.int64))
        self._whole_bytes = (
            dtype.bitwidth < 8 and (rows * per_row) % 2 != 0 and tuple(shape)[0] > rows
        )

    def tofile(self, file) -> None:
        if self._whole_bytes:
            return super().tofile(file)
        for _, q in self.chunks():
            ir.Tensor(q).tofile(file)


def _chunk_rows(row_elems: int, multiple: int = 1) -> int:
    rows = max(1, CHUNK_BYTES // (4 * max(1, row_elems)))
    return max(multiple, rows // multiple * multiple)


def quantize_rows(src, precision: str, *, table: bool):
    """(quantized weight as a `ChunkedQuantTensor`, scale, DequantizeLinear attributes) of a
    2-D float tensor `src` (an `ir` tensor, external or not), read in row chunks of about
    `CHUNK_BYTES` float32 bytes; the same numbers as `quantize_table` (`table`: [V, H], per row)
    or `quantize_weight` ([H, V], per output channel), bit for bit. The scales are computed now
    (one read of the table); the quantized rows when the weight is read or written (a second
    read, chunk by chunk)."""
    shape = tuple(int(d) for d in src.shape)
    fdtype = src.dtype.numpy()
    hidden = shape[1] if table else shape[0]
    block = int4_block(hidden, BLOCK_SIZE) if precision == "int4" else None
    if table:  # rows are channels: per-row maxima; int4 blocks along H within a row
        rows = _chunk_rows(shape[1])
        parts = [
            weight_scale(weight_amax(c.T, block), precision, fdtype)
            for _, c in iter_rows(src, rows)
        ]
        scale = np.ascontiguousarray(
            np.concatenate(parts, axis=-1).T if block else np.concatenate(parts)
        )
        attrs = {"axis": 1, "block_size": block} if block else {"axis": 0}

        def chunks():
            for r0, c in iter_rows(src, rows):
                s = scale[r0 : r0 + c.shape[0]]
                yield (
                    r0,
                    np.ascontiguousarray(
                        quantize_with_scale(c.T, s.T if block else s, precision, block).T
                    ),
                )

    else:  # [H, V]: columns are channels; chunks of whole int4 blocks of rows
        rows = _chunk_rows(shape[1], block or 1)
        parts = [weight_amax(c, block) for _, c in iter_rows(src, rows)]
        amax = np.concatenate(parts) if block else np.max(parts, axis=0)
        scale = weight_scale(amax, precision, fdtype)
        attrs = {"axis": 0, "block_size": block} if block else {"axis": 1}

        def chunks():
            for r0, c in iter_rows(src, rows):
                s = scale[r0 // block : (r0 + c.shape[0]) // block] if block else scale
                yield r0, quantize_with_scale(c, s, precision, block)

    q = ChunkedQuantTensor(
        chunks, _QTYPE[precision], shape, name=f"{src.name}_quantized", source=src, rows=rows
    )
    return q, scale, attrs


class VocabQDQPass(ir.passes.InPlacePass):
    """Quantize lm_head and/or the embedding table weight-only (`lm_head`, `embedding`: one of
    int8, int4, fp8, or None to leave it in float).

    Raises `Unsupported` for a tied table asked for at two precisions (or only one), and
    `ValueError` for an unknown precision.
    """

    def __init__(self, lm_head: str | None = None, embedding: str | None = None):
        super().__init__()
        for name, p in (("lm_head", lm_head), ("embedding", embedding)):
            if p is not None and p not in PRECISIONS:
                raise ValueError(f"unknown {name} precision {p!r} (known: {', '.join(PRECISIONS)})")
        self.lm_head = lm_head
        self.embedding = embedding
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        report: dict = {}
        gather = find_embedding(model) if self.embedding or self.lm_head else None
        head = find_lm_head(model) if self.lm_head or self.embedding else None
        tied = gather is not None and head is not None and gather.inputs[0] is head[1]
        modified = blocked = False
        if tied and (self.lm_head or self.embedding):
            if self.lm_head != self.embedding:
                raise Unsupported(
                    f"this model ties its embedding and lm_head (tie_word_embeddings: one "
                    f"table, {head[1].name}): quantize both at one precision "
                    f"(--quantize-lm-head {self.lm_head or self.embedding} --quantize-embedding "
                    f"{self.lm_head or self.embedding}); quantizing one reader keeps the float "
                    f"table and adds a quantized copy (got lm_head {self.lm_head}, embedding "
                    f"{self.embedding})"
                )
            rec = self._quantize(graph, head[1], self.lm_head, table=True)
            report["lm_head"] = report["embedding"] = dict(rec, tied=True)
            modified, blocked = True, rec["block_size"] is not None
        else:
            if self.lm_head and head is not None:
                rec = self._quantize(graph, head[1], self.lm_head, table=False)
                report["lm_head"] = dict(rec, tied=False)
                modified, blocked = True, blocked or rec["block_size"] is not None
            if self.embedding and gather is not None:
                rec = self._quantize(graph, gather.inputs[0], self.embedding, table=True)
                report["embedding"] = dict(rec, tied=False)
                modified, blocked = True, blocked or rec["block_size"] is not None
        for name, asked in (("lm_head", self.lm_head), ("embedding", self.embedding)):
            if asked and name not in report:
                report.setdefault("not_found", []).append(name)
        if modified and blocked and model.opset_imports.get("", 0) < 21:
            model.opset_imports[""] = 21  # blocked DequantizeLinear
            graph.opset_imports[""] = 21
        if modified:
            graph.sort()
        self.report = report
        return ir.passes.PassResult(model, modified)

    def _quantize(self, graph: ir.Graph, w: ir.Value, precision: str, *, table: bool) -> dict:
        """Replace initializer `w` by Wq + DequantizeLinear for every reader; the record."""
        src = w.const_value
        shape = tuple(int(d) for d in src.shape)
        itemsize = src.dtype.numpy().itemsize
        # [V, H] table: per row, int4 blocks along H; [H, V] lm_head: per output channel
        q, scale, attrs = quantize_rows(src, precision, table=table)
        check_scales(f"{w.name}_scale", scale)
        inputs = weight_dq_inputs(graph, w.name, q, scale, precision)
        dq = ir.node(
            "DequantizeLinear", inputs, attributes=attrs, name=f"{w.name}/weight_dq", num_outputs=1
        )
        dq.outputs[0].name = f"{w.name}_dq"
        dq.outputs[0].dtype = w.dtype
        dq.outputs[0].shape = w.shape
        users = list(w.uses())
        readers = {id(node) for node, _ in users}
        first = next(n for n in graph if id(n) in readers)
        graph.insert_before(first, dq)
        for node, idx in users:
            node.replace_input_with(idx, dq.outputs[0])
        graph.initializers.pop(w.name, None)
        n = int(np.prod(shape))
        rec = {
            "weight": w.name,
            "precision": precision,
            "shape": list(shape),
            "layout": "[vocab, hidden]" if table else "[hidden, vocab]",
            "scales": ("per row (vocabulary entry)" if table else "per output channel")
            + (
                f", per block of {attrs['block_size']} along hidden"
                if "block_size" in attrs
                else ""
            ),
            "scale_shape": list(scale.shape),
            "bytes_before": n * itemsize,
            "bytes_after": n * _BITS[precision] // 8 + scale.size * scale.itemsize,
        }
        rec["block_size"] = int(attrs["block_size"]) if "block_size" in attrs else None
        logger.info("%s: %s weight-only, %s", w.name, precision, rec["scales"])
        return rec
