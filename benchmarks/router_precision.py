"""The MoE router without FP32 GEMM (SM75): what rounding it to fp16 does to routing and logits.

    python benchmarks/router_precision.py [--model examples/models/tiny-deepseek-v3]
                                          [--windows 64] [--json OUT.json]

Exports the model in fp16 (transformers >= 5.24 keeps the router weight in fp32), runs the
graph passes for the `t4` profile three ways and scores each against the graph whose router is
left in fp32, in ONNX Runtime on the held-out split (consecutive 128-token windows, BOS first):

- reference: `half-fp32-gemm` disabled (fp32 router, as the model computes it);
- round:     the fp32 weight rounded to fp16, one fp16 GEMM (`half_fp32_gemm_mode="round"`);
- split:     the weight as an fp16 hi + lo pair, two fp16 GEMMs summed in fp32;
- compensated: split, plus a third fp16 GEMM `[h | y_hi] @ [W_hi; -I]` that recovers the
             rounding of the hi GEMM's fp16 output (the default);
- tf32:      the weight rounded to 10 mantissa bits, fp32 output: what TensorRT computes for
             the fp32 router on SM80+, where TF32 is on by default (for comparison).

ONNX Runtime's CPU provider drops the rounding of an fp16 GEMM's output before an fp32 Cast,
so every candidate is run through `fp32_view_of_half_gemms` first: fp32 products of the fp16
operands, the output rounded to fp16 by an explicit Cast, as TensorRT computes them.

Per candidate: the fraction of (token, MoE layer) pairs and of tokens whose top-k expert set
differs from the reference's, and over all positions the mean KL(reference || candidate) of the
next-token distribution, top-1 agreement and the largest logit difference.
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

VARIANTS = ("reference", "round", "split", "compensated", "tf32")


def _graph(art: Path, variant: str, out: Path) -> tuple[Path, list[str]]:
    """The t4 pipeline's graph for `variant`, saved at `out`; and its router top-k outputs."""
    import onnx_ir as ir

    from dsc.hardware import load_profile
    from dsc.passes import PassContext, PassOptions, run_pipeline
    from dsc.passes.precision import fp32_view_of_half_gemms
    from dsc.passes.quant.qdq import find_routers

    model = ir.load(str(art / "model.onnx"))
    mode = "round" if variant in ("reference", "tf32") else variant
    ctx = PassContext(load_profile("t4"), PassOptions(half_fp32_gemm_mode=mode))
    run_pipeline(model, ctx, disable=["half-fp32-gemm"] if variant == "reference" else ())
    if variant != "reference":
        fp32_view_of_half_gemms(model, round_outputs=variant != "tf32")
    routers = find_routers(model)
    for _, idx in routers:
        if not idx.is_graph_output():
            model.graph.outputs.append(idx)
    out.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, str(out))
    return out, [idx.name for _, idx in routers]


def _run(path: Path, io: dict, routers: list[str], ids: np.ndarray, batch: int = 8):
    import onnxruntime as ort

    from dsc.backends.onnxruntime.runner import session_options
    from dsc.passes.quant.calibrate import _feeds

    sess = ort.InferenceSession(
        str(path), sess_options=session_options("basic"), providers=["CPUExecutionProvider"]
    )
    logits, topk = [], []
    for i in range(0, len(ids), batch):
        res = sess.run(["logits", *routers], _feeds(io, ids[i : i + batch]))
        logits.append(res[0].astype(np.float32))
        # [tokens, k] per router, the expert set sorted
        topk.append(np.stack([np.sort(r.reshape(-1, r.shape[-1]), axis=-1) for r in res[1:]]))
    return np.concatenate(logits), np.concatenate(topk, axis=1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def measure(model_dir: Path, windows: int, work: Path) -> dict:
    from dsc import api
    from dsc.artifacts import load_io_spec

    sys.path.insert(0, str(REPO / "benchmarks"))
    from quant_accuracy import bos_led, heldout_windows

    art = work / "fp16"
    api.export(model_dir, art, dtype="fp16", progress=lambda m: None)
    io = load_io_spec(art)
    tok = api.load_tokenizer(art)
    ids = heldout_windows(tok, windows or None)
    ids = bos_led(tok, ids) if bos_led(tok, ids) is not None else ids
    results, ref = {}, None
    for v in VARIANTS:
        t0 = time.perf_counter()
        path, routers = _graph(art, v, work / v / "model.onnx")
        logits, topk = _run(path, io, routers, ids)
        if ref is None:
            ref = (logits, topk, _log_softmax(logits))
            results[v] = {
                "routers": len(routers),
                "tokens": int(ids.size),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            continue
        lr = ref[2]
        lc = _log_softmax(logits)
        changed = (topk != ref[1]).any(axis=-1)  # [routers, tokens]
        results[v] = {
            "topk_changed_pairs": float(changed.mean()),
            "topk_changed_tokens": float(changed.any(axis=0).mean()),
            "topk_changed_per_layer": [float(c.mean()) for c in changed],
            "kl_mean": float((np.exp(lr) * (lr - lc)).sum(-1).mean()),
            "kl_max": float((np.exp(lr) * (lr - lc)).sum(-1).max()),
            "top1_agreement": float((logits.argmax(-1) == ref[0].argmax(-1)).mean()),
            "max_abs_logit_diff": float(np.abs(logits - ref[0]).max()),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "examples/models/tiny-deepseek-v3"))
    ap.add_argument(
        "--windows", type=int, default=64, help="held-out 128-token windows (0: all 447)"
    )
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dsc-router-") as tmp:
        res = measure(Path(args.model), args.windows, Path(tmp))
    ref = res.pop("reference")
    print(
        f"{Path(args.model).name}: {ref['tokens']} held-out tokens, {ref['routers']} MoE "
        f"routers; each against the fp32 router"
    )
    print(
        f"{'variant':<8} {'top-k changed (token,layer)':>28} {'tokens with any change':>23} "
        f"{'mean KL':>10} {'max KL':>10} {'top-1':>7} {'max |dlogit|':>13}"
    )
    for v, r in res.items():
        print(
            f"{v:<8} {r['topk_changed_pairs']:>28.4%} {r['topk_changed_tokens']:>23.4%} "
            f"{r['kl_mean']:>10.2e} {r['kl_max']:>10.2e} {r['top1_agreement']:>7.4f} "
            f"{r['max_abs_logit_diff']:>13.3e}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"reference": ref, **res}, indent=2) + "\n")


if __name__ == "__main__":
    main()
