"""Which graph forms of a quantized embedding table and lm_head TensorRT-RTX parses and builds.

For each precision (int8, int4, fp8) and each form below, a one-op graph (vocabulary V, hidden
H, fp16) is built ahead of time for SM75, SM80, SM86, SM89 and SM120 with `tensorrt_rtx`, and run
in ONNX Runtime (CPU) against a numpy reference of the same dequantized table:

embedding (input_ids [batch, seq] -> hidden [batch, seq, H]):
    dq-gather        DequantizeLinear(table_q [V, H], scale) -> Gather(ids)
    gather-dq        Gather(table_q, ids) -> DequantizeLinear(rows, Gather(scale, ids)),
                     a blocked DQ along H (scale [batch, seq, H / block])
    gather-cast-mul  Gather(table_q, ids) -> Cast(fp16) -> Mul(Gather(scale, ids))
lm_head (hidden [batch, seq, H] -> logits [batch, seq, V]):
    dq-matmul        DequantizeLinear(W_q [H, V], scale) -> MatMul (weight-only)
tied (input_ids -> logits; one table for both, as a tie_word_embeddings export has it):
    dq-gather+transpose  DequantizeLinear(table_q [V, H]) read by the Gather and by
                     Transpose -> MatMul

Scales: int8 / fp8 one per row of the table (per vocabulary entry; for lm_head per output
channel), int4 one per block of 128 along H. The "weights" column is the builder's own report of
the engine's weight memory, which tells whether the table stays quantized in the engine.

    python benchmarks/probe_embedding_forms.py [--vocab 32768 --hidden 256] [--sm 75,80,86,89,120]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BLOCK = 128
QTYPE = {"int8": TensorProto.INT8, "int4": TensorProto.INT4, "fp8": TensorProto.FLOAT8E4M3FN}


def _quantize_rows(table: np.ndarray, precision: str):
    """(q [V, H], scale [V, H / block] fp16, dequantized [V, H] float32): per row, int4 blocked."""
    from dsc.passes.quant.qdq import QuantScheme, quantize_weight

    # quantize_weight takes [in, out] and scales per out (per block of in for int4): the
    # transposed table is [H, V], so "per output channel" is per vocabulary row.
    q, s, _ = quantize_weight(
        table.T, QuantScheme(precision, weight_only=True), scale_dtype=np.float16
    )
    q, s = np.ascontiguousarray(q.T), np.ascontiguousarray(s.T if s.ndim == 2 else s[:, None])
    block = table.shape[1] // s.shape[1]
    deq = q.astype(np.float32) * np.repeat(s.astype(np.float32), block, axis=1)
    return q, s, deq


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def embedding_graph(form: str, precision: str, q, s) -> onnx.ModelProto:
    H = q.shape[1]
    nb = s.shape[1]
    block = H // nb
    inits = [_init("table_q", q), _init("table_scale", s)]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("hidden", TensorProto.FLOAT16, ["batch", "seq", H])
    if form == "dq-gather":
        attrs = {"axis": 1, "block_size": block} if precision == "int4" else {"axis": 0}
        scale = "table_scale" if precision == "int4" else "table_scale_1d"
        if precision != "int4":
            inits.append(_init("table_scale_1d", s.reshape(-1)))
        nodes = [
            helper.make_node("DequantizeLinear", ["table_q", scale], ["table"], **attrs),
            helper.make_node("Gather", ["table", "input_ids"], ["hidden"], axis=0),
        ]
    elif form == "gather-dq":
        nodes = [
            helper.make_node("Gather", ["table_q", "input_ids"], ["rows_q"], axis=0),
            helper.make_node("Gather", ["table_scale", "input_ids"], ["rows_scale"], axis=0),
            helper.make_node(
                "DequantizeLinear", ["rows_q", "rows_scale"], ["hidden"], axis=2, block_size=block
            ),
        ]
    elif form == "gather-cast-mul":
        inits.append(_init("blocks_shape", np.array([0, 0, nb, block], np.int64)))
        inits.append(_init("hidden_shape", np.array([0, 0, H], np.int64)))
        inits.append(_init("axis3", np.array([3], np.int64)))
        nodes = [
            helper.make_node("Gather", ["table_q", "input_ids"], ["rows_q"], axis=0),
            helper.make_node("Cast", ["rows_q"], ["rows"], to=TensorProto.FLOAT16),
            helper.make_node("Reshape", ["rows", "blocks_shape"], ["rows_b"]),
            helper.make_node("Gather", ["table_scale", "input_ids"], ["rows_scale"], axis=0),
            helper.make_node("Unsqueeze", ["rows_scale", "axis3"], ["rows_scale_b"]),
            helper.make_node("Mul", ["rows_b", "rows_scale_b"], ["hidden_b"]),
            helper.make_node("Reshape", ["hidden_b", "hidden_shape"], ["hidden"]),
        ]
    else:
        raise ValueError(form)
    g = helper.make_graph(nodes, f"embedding_{form}_{precision}", [ids], [out], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)], ir_version=11)


def lm_head_graph(precision: str, q, s) -> onnx.ModelProto:
    V, H = q.shape
    # W [H, V] = table.T: per output channel = per row of the table; int4 blocks along H.
    wq, ws = np.ascontiguousarray(q.T), np.ascontiguousarray(s.T)
    attrs = {"axis": 0, "block_size": H // s.shape[1]} if precision == "int4" else {"axis": 1}
    inits = [_init("w_q", wq), _init("w_scale", ws if precision == "int4" else ws.reshape(-1))]
    x = helper.make_tensor_value_info("hidden", TensorProto.FLOAT16, ["batch", "seq", H])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", "seq", V])
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], **attrs),
        helper.make_node("MatMul", ["hidden", "w"], ["logits"]),
    ]
    g = helper.make_graph(nodes, f"lm_head_{precision}", [x], [out], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)], ir_version=11)


def tied_graph(precision: str, q, s) -> onnx.ModelProto:
    V, H = q.shape
    attrs = {"axis": 1, "block_size": H // s.shape[1]} if precision == "int4" else {"axis": 0}
    inits = [_init("table_q", q), _init("table_scale", s if precision == "int4" else s.reshape(-1))]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", "seq", V])
    nodes = [
        helper.make_node("DequantizeLinear", ["table_q", "table_scale"], ["table"], **attrs),
        helper.make_node("Gather", ["table", "input_ids"], ["hidden"], axis=0),
        helper.make_node("Transpose", ["table"], ["w"], perm=[1, 0]),
        helper.make_node("MatMul", ["hidden", "w"], ["logits"]),
    ]
    g = helper.make_graph(nodes, f"tied_{precision}", [ids], [out], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)], ir_version=11)


def _ort(model: onnx.ModelProto, feeds: dict):
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)[0], None
    except Exception as e:  # noqa: BLE001 - the probe reports whatever ORT says
        return None, str(e).splitlines()[0][:160]


def _trt(path: Path, sm: int, roles: dict):
    from dsc.backends.tensorrt import BuildOptions, ShapeEnvelope, build_engine
    from dsc.errors import DscError

    try:
        r = build_engine(
            path,
            ShapeEnvelope(max_batch=2, max_input_len=16, max_kv=32),
            BuildOptions(target_sm=sm),
            backend="tensorrt_rtx",
            io_roles=roles,
        )
        return {
            "ok": True,
            "engine_bytes": r.size_bytes,
            "weights_bytes": r.memory_bytes.get("weights"),
        }
    except DscError as e:
        return {"ok": False, "error": str(e)[-220:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--sm", default="75,80,86,89,120")
    ap.add_argument("--precisions", default="int8,int4,fp8")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    sms = [int(x) for x in a.sm.split(",")]
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((a.vocab, a.hidden)) * 0.05).astype(np.float16)
    ids = rng.integers(0, a.vocab, size=(2, 5), dtype=np.int64)
    hidden = rng.standard_normal((2, 5, a.hidden)).astype(np.float16)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in a.precisions.split(","):
            q, s, deq = _quantize_rows(table.astype(np.float32), precision)
            cases = [
                (
                    f"embedding {f}",
                    embedding_graph(f, precision, q, s),
                    {"input_ids": ids},
                    deq[ids],
                    {"input_ids": ("batch", "seq")},
                )
                for f in ("dq-gather", "gather-dq", "gather-cast-mul")
            ]
            cases.append(
                (
                    "lm_head dq-matmul",
                    lm_head_graph(precision, q, s),
                    {"hidden": hidden},
                    hidden.astype(np.float32) @ deq.T,
                    {"hidden": ("batch", "seq", a.hidden)},
                )
            )
            emb = deq[ids].astype(np.float16).astype(np.float32)
            cases.append(
                (
                    "tied dq-gather+transpose",
                    tied_graph(precision, q, s),
                    {"input_ids": ids},
                    emb @ deq.T,
                    {"input_ids": ("batch", "seq")},
                )
            )
            for name, model, feeds, ref, roles in cases:
                path = Path(tmp) / f"{name.replace(' ', '_')}_{precision}.onnx"
                onnx.save(model, path)
                got, ort_err = _ort(model, feeds)
                err = (
                    None
                    if got is None
                    else float(
                        np.abs(got.astype(np.float32) - ref).max() / max(np.abs(ref).max(), 1e-12)
                    )
                )
                row = {
                    "graph": name,
                    "precision": precision,
                    "ort_error": ort_err,
                    "ort_rel_max_err": err,
                    "sm": {},
                }
                for sm in sms:
                    row["sm"][sm] = _trt(path, sm, roles)
                results.append(row)
                cells = "  ".join(
                    f"SM{sm}:"
                    + (f"ok({r['weights_bytes'] or r['engine_bytes']})" if r["ok"] else "NO")
                    for sm, r in row["sm"].items()
                )
                ortc = f"ort err {err:.1e}" if err is not None else f"ORT fails: {ort_err}"
                print(f"{precision:5s} {name:26s} {ortc:24s} {cells}", flush=True)
                for sm, r in row["sm"].items():
                    if not r["ok"]:
                        print(f"      SM{sm}: {r['error']}", flush=True)
    fp16 = a.vocab * a.hidden * 2
    print(f"(fp16 table: {fp16} bytes; int8 {fp16 // 2}, int4 {fp16 // 4})")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
