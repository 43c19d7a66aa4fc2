"""Quantization accuracy: dsc vs ONNX Runtime's quantize_static on the trained tiny models.

    python benchmarks/quant_accuracy.py [--models tiny-deepseek-v3,tiny-qwen2] [--out DIR]

For each model: export fp16 (the reference) and fp32 (ONNX Runtime's quantizer takes float32
graphs); quantize with dsc (INT8 SmoothQuant W8A8, INT8 weight-only, FP8 W8A8, INT4 AWQ) from the
fp16 export, and with `onnxruntime.quantization.quantize_static` (QDQ, per-channel, symmetric
activations and weights, MatMul only, the same exclusions) from the fp32 export, on the same
calibration windows (the shipped calibration text, 64 x 128 tokens). INT4 on the ORT side is
its `MatMulNBitsQuantizer` (block 128, symmetric weight-only), ORT's own INT4 weight-only path.
Every candidate is scored by the validation gate against the same fp16 reference on the
held-out split: perplexity, its relative increase, prefill top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SAMPLES, SEQ_LEN = 64, 128
DSC_RUNS = [("dsc int8 SmoothQuant W8A8", "int8", False), ("dsc int8 weight-only", "int8", True),
            ("dsc fp8 W8A8", "fp8", False), ("dsc int4 AWQ (W4A16, g128)", "int4", True)]


def _quiet(msg):
    pass


def ort_quantize(fp32_art: Path, out: Path, precision: str, windows: np.ndarray) -> Path:
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    from dsc.artifacts import load_io_spec
    from dsc.passes.quant.calibrate import _feeds
    from dsc.passes.quant.qdq import find_targets
    import onnx_ir as ir

    src = fp32_art / "model.onnx"
    model = ir.load(str(src))
    excluded = [t.node.name for t in find_targets(model) if t.excluded]
    excluded += [n.name for n in model.graph if n.op_type == "Gemm"]  # routers
    io = load_io_spec(fp32_art)
    if precision == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer)

        cfg = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, bits=4)
        q = MatMulNBitsQuantizer(onnx.load(str(src)), nodes_to_exclude=excluded,
                                 algo_config=cfg)
        q.process()
        q.model.save_model_to_file(str(out), use_external_data_format=False)
        return out

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([_feeds(io, windows[i:i + 1]) for i in range(len(windows))])

        def get_next(self):
            return next(self.it, None)

    qt = QuantType.QInt8 if precision == "int8" else QuantType.QFLOAT8E4M3FN
    quantize_static(
        str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=qt, weight_type=qt, op_types_to_quantize=["MatMul"],
        nodes_to_exclude=excluded,
        calibrate_method=CalibrationMethod.MinMax if precision == "int8"
        else CalibrationMethod.Distribution,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return out


def gate(cand_path: Path, cand_io: dict, ref_art: Path, precision: str) -> dict:
    from dsc.api import load_tokenizer
    from dsc.artifacts import load_io_spec
    from dsc.backends.onnxruntime.runner import OrtCausalLM
    from dsc.corpus import heldout_text
    from dsc.validate.gate import GateOptions, run_gate

    ref_io = load_io_spec(ref_art)
    ref = OrtCausalLM(ref_art / ref_io["onnx"], ref_io)
    cand = OrtCausalLM(cand_path, cand_io)
    return run_gate(cand, ref, load_tokenizer(ref_art), heldout_text(), precision=precision,
                    options=GateOptions(locate=False), candidate_path=cand_path,
                    reference_path=ref_art / ref_io["onnx"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny-deepseek-v3,tiny-qwen2")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from dsc import api
    from dsc.artifacts import load_io_spec
    from dsc.quantize import calibration_windows, quantize_artifact, read_calibration_text

    work = args.out or Path(tempfile.mkdtemp(prefix="dsc-quant-bench-"))
    rows = []
    for name in args.models.split(","):
        ckpt = REPO / "examples" / "models" / name
        fp16, fp32 = work / name / "fp16", work / name / "fp32"
        api.export(ckpt, fp16, dtype="fp16", force=True, progress=_quiet)
        api.export(ckpt, fp32, dtype="fp32", force=True, progress=_quiet)
        windows = calibration_windows(api.load_tokenizer(fp16), read_calibration_text(None),
                                      SAMPLES, SEQ_LEN)
        ref = gate(fp16 / "model.onnx", load_io_spec(fp16), fp16, "fp16")
        rows.append((name, "fp16 reference", ref, 0.0))
        for label, precision, wo in DSC_RUNS:
            t = time.perf_counter()
            out = work / name / label.split(" (")[0].replace(" ", "-")
            quantize_artifact(fp16, out, precision, weight_only=wo, samples=SAMPLES,
                              seq_len=SEQ_LEN, force=True)
            secs = time.perf_counter() - t
            rows.append((name, label, gate(out / "model.onnx", load_io_spec(out), fp16, precision),
                         secs))
        for label, precision in (("ORT quantize_static int8 QDQ", "int8"),
                                 ("ORT quantize_static fp8 QDQ", "fp8"),
                                 ("ORT MatMulNBits int4 (g128)", "int4")):
            t = time.perf_counter()
            try:
                path = ort_quantize(fp32, work / name / f"ort-{precision}.onnx", precision, windows)
                res = gate(path, load_io_spec(fp32), fp16, precision)
            except Exception as e:  # report, do not hide
                res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
            rows.append((name, label, res, time.perf_counter() - t))
    print(f"| model | method | ppl | ppl delta | top-1 (prefill) | top-1 (decode) | seconds |")
    print("|---|---|---|---|---|---|---|")
    summary = []
    for name, label, r, secs in rows:
        if "error" in r:
            print(f"| {name} | {label} | n/a ({r['error']}) | | | | |")
            summary.append({"model": name, "method": label, "error": r["error"]})
            continue
        p = r["perplexity"]
        print(f"| {name} | {label} | {p['candidate']:.3f} | {p['delta']:+.2%} | "
              f"{r['prefill']['top1']:.4f} | {r['decode']['top1']:.4f} | {secs:.1f} |")
        summary.append({"model": name, "method": label, "ppl": p["candidate"],
                        "ppl_delta": p["delta"], "top1": r["prefill"]["top1"]})
    (work / "quant_accuracy.json").write_text(json.dumps(summary, indent=2))
    print(f"\nresults: {work / 'quant_accuracy.json'}")


if __name__ == "__main__":
    main()
