"""Peak RSS of `VocabQDQPass` on vocabulary tables of a real model's size (issue 15).

Makes a two-node graph holding only the two vocabulary-sized weights of a config (embedding
table [V, H] read by a Gather, lm_head [H, V] read by a MatMul; random float16, external data,
written row chunk by row chunk), then in a fresh process quantizes both weight-only and writes
the graph with its data file, and prints wall time and the process's peak RSS (VmHWM).

    python benchmarks/vocab_qdq_rss.py WORK [--precision int8] [--make-only] \
        [--config examples/configs/DeepSeek-R1-Distill-Qwen-7B]

R1-Distill-Qwen-7B: V 152,064, H 3,584, so each table is 1.09 GB in float16, 2.18 GB in float32.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make(work: Path, config: Path) -> Path:
    import onnx_ir as ir

    from dsc.node_meta import SCOPE_KEY

    cfg = json.loads((config / "config.json").read_text())
    v, h = int(cfg["vocab_size"]), int(cfg["hidden_size"])
    out = work / "vocab_graph"
    if (out / "model.onnx").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = out / "model.onnx.data"
    with open(data, "wb") as f:
        for shape in ((v, h), (h, v)):
            for r0 in range(0, shape[0], 1024):
                n = min(1024, shape[0] - r0)
                f.write((rng.standard_normal((n, shape[1])) * 0.02).astype(np.float16).tobytes())
    nbytes = v * h * 2
    table, head = (
        ir.ExternalTensor(
            "model.onnx.data",
            offset=off,
            length=nbytes,
            dtype=ir.DataType.FLOAT16,
            shape=ir.Shape(shape),
            name=name,
            base_dir=out,
        )
        for off, shape, name in ((0, [v, h], "embed"), (nbytes, [h, v], "lm_head"))
    )
    ids = ir.Value(
        name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1, "s"])
    )
    tv = ir.Value(
        name="embed",
        const_value=table,
        type=ir.TensorType(ir.DataType.FLOAT16),
        shape=ir.Shape([v, h]),
    )
    hv = ir.Value(
        name="lm_head",
        const_value=head,
        type=ir.TensorType(ir.DataType.FLOAT16),
        shape=ir.Shape([h, v]),
    )
    gather = ir.node("Gather", [tv, ids], attributes={"axis": 0}, name="embed_tokens/Gather")
    gather.metadata_props[SCOPE_KEY] = repr(["model.embed_tokens"])
    mm = ir.node("MatMul", [gather.outputs[0], hv], name="lm_head/MatMul")
    mm.metadata_props[SCOPE_KEY] = repr(["lm_head"])
    mm.outputs[0].name = "logits"
    mm.outputs[0].dtype = ir.DataType.FLOAT16
    graph = ir.Graph(
        [ids], [mm.outputs[0]], nodes=[gather, mm], initializers=[tv, hv], opset_imports={"": 21}
    )
    ir.save(ir.Model(graph, ir_version=10), out / "model.onnx")  # data already in place
    return out


def quantize(src: Path, dst: Path, precision: str) -> dict:
    import onnx_ir as ir

    from dsc.passes.quant.vocab import VocabQDQPass
    from dsc.pipeline.progress import peak_rss_bytes

    t0 = time.perf_counter()
    model = ir.load(str(src / "model.onnx"))
    VocabQDQPass(lm_head=precision, embedding=precision)(model)
    dst.mkdir(parents=True, exist_ok=True)
    ir.save(model, dst / "model.onnx", external_data="model.onnx.data")
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_gib": round(peak_rss_bytes() / 2**30, 2),
        "data_bytes": (dst / "model.onnx.data").stat().st_size,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument(
        "--config", type=Path, default=REPO / "examples/configs/DeepSeek-R1-Distill-Qwen-7B"
    )
    ap.add_argument("--precision", default="int8", choices=["int8", "int4", "fp8"])
    ap.add_argument("--make-only", action="store_true")
    ap.add_argument("--_run", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._run:
        print(json.dumps(quantize(Path(args._run[0]), Path(args._run[1]), args.precision)))
        return
    src = make(args.work, args.config)
    if args.make_only:
        return
    dst = args.work / f"vocab_{args.precision}"
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            str(args.work),
            "--precision",
            args.precision,
            "--_run",
            str(src),
            str(dst),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
