"""Quantization accuracy: dsc vs ONNX Runtime's quantizers on the trained tiny models.

    python benchmarks/quant_accuracy.py [--models tiny-deepseek-v3,tiny-qwen2] [--out DIR]
                                        [--windows N]

For each model: export fp16 (the reference) and fp32 (ONNX Runtime's quantizer takes float32
graphs); quantize with dsc (INT8 SmoothQuant W8A8, INT8 weight-only, FP8 W8A8, INT4 AWQ) from the
fp16 export, and with `onnxruntime.quantization.quantize_static` (QDQ, per-channel, symmetric
activations and weights, MatMul only, the same exclusions) from the fp32 export, on the same
calibration windows (the shipped calibration text, 64 x 128 tokens). Weight-only on the ORT side
is its `MatMulNBitsQuantizer` (symmetric, block 128; 4 bits, and 8 bits for INT8 weight-only),
ORT's own weight-only path.

Every candidate is scored against the same fp16 graph on the held-out split three ways:

- held-out eval: every 128-token window of the held-out split (`--windows`, default all: 447
  windows, 57k tokens), run in batches of 16: perplexity and its relative increase, prefill
  top-1 agreement, mean KL(fp16 || candidate). The main comparison: at 8 windows the perplexity
  delta of these models moves by several tenths of a percent with the text sampled.
- BOS-led: the same windows, each starting with BOS as a prompt does (the first token puts the
  largest activations in the graph, and the calibration text has no BOS).
- the validation gate as `dsc validate` runs it (8 windows): its perplexity delta, minimum
  logit cosine and verdict.

Then dsc against ORT at each precision, paired: the difference of perplexity deltas (percentage
points) and of mean KL on the same windows, with a 95% interval from a bootstrap over windows
(4000 resamples, seed 0; the three graphs resampled together), on the held-out windows, the
BOS-led ones and the gate's 8. A difference whose interval holds 0 is within the noise of
that much text.
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
# (label, precision, weight-only, SmoothQuant alpha: None, per layer, is the CLI default)
DSC_RUNS = [
    ("dsc int8 SmoothQuant W8A8", "int8", False, None),
    ("dsc int8 weight-only", "int8", True, None),
    ("dsc fp8 W8A8", "fp8", False, None),
    ("dsc int4 AWQ (W4A16, g128)", "int4", True, None),
]

ORT_RUNS = [
    ("ORT quantize_static int8 QDQ", "int8"),
    ("ORT MatMulNBits int8 weight-only (g128)", "int8-wo"),
    ("ORT quantize_static fp8 QDQ", "fp8"),
    ("ORT MatMulNBits int4 (g128)", "int4"),
]
PAIRS = list(
    zip((r[0] for r in DSC_RUNS), (r[0] for r in ORT_RUNS), strict=False)
)  # same precision


def _quiet(msg):
    pass


def ort_quantize(fp32_art: Path, out: Path, precision: str, windows: np.ndarray) -> Path:
    import onnx
    import onnx_ir as ir
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from dsc.artifacts import load_io_spec
    from dsc.passes.quant.calibrate import _feeds
    from dsc.passes.quant.qdq import find_targets

    src = fp32_art / "model.onnx"
    model = ir.load(str(src))
    excluded = [t.node.name for t in find_targets(model) if t.excluded]
    excluded += [n.name for n in model.graph if n.op_type == "Gemm"]  # routers
    io = load_io_spec(fp32_art)
    if precision in ("int4", "int8-wo"):
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        # INT8: ORT 1.32 has no per-channel 8-bit MatMulNBits (its channel-wise mode is 4-bit
        # QDQ only), so block 128: finer scales than dsc's per-channel ones.
        cfg = DefaultWeightOnlyQuantConfig(
            block_size=128, is_symmetric=True, bits=4 if precision == "int4" else 8
        )
        q = MatMulNBitsQuantizer(onnx.load(str(src)), nodes_to_exclude=excluded, algo_config=cfg)
        q.process()
        q.model.save_model_to_file(str(out), use_external_data_format=False)
        return out

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([_feeds(io, windows[i : i + 1]) for i in range(len(windows))])

        def get_next(self):
            return next(self.it, None)

    qt = QuantType.QInt8 if precision == "int8" else QuantType.QFLOAT8E4M3FN
    quantize_static(
        str(src),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=qt,
        weight_type=qt,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=excluded,
        calibrate_method=CalibrationMethod.MinMax
        if precision == "int8"
        else CalibrationMethod.Distribution,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
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
    return run_gate(
        cand,
        ref,
        load_tokenizer(ref_art),
        heldout_text(),
        precision=precision,
        options=GateOptions(locate=False),
        candidate_path=cand_path,
        reference_path=ref_art / ref_io["onnx"],
    ).to_json()


def heldout_windows(tokenizer, count: int | None, window: int = 128) -> np.ndarray:
    """Consecutive `window`-token windows of the held-out split (BOS only before the first)."""
    from dsc.corpus import heldout_text

    ids = np.asarray(tokenizer(heldout_text(), verbose=False)["input_ids"], dtype=np.int64)
    n = ids.size // window if count is None else min(count, ids.size // window)
    return ids[: n * window].reshape(n, window)


def bos_led(tokenizer, ids: np.ndarray) -> np.ndarray | None:
    """The same windows, each starting with BOS the way a prompt does (None without a BOS)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    return np.concatenate([np.full((len(ids), 1), bos, ids.dtype), ids[:, :-1]], axis=1)


def heldout_eval(
    cand_path: Path, cand_io: dict, ref, ids: np.ndarray, tag: str = "text", batch: int = 16
) -> dict:
    """Perplexity, prefill top-1 and mean KL of the candidate vs `ref` (a `_Ref`) on `ids`."""
    from dsc.backends.onnxruntime.runner import OrtCausalLM
    from dsc.validate import metrics

    cand = OrtCausalLM(cand_path, cand_io)
    nll, agree, kl = [], [], []  # per window: summed NLL, top-1 matches, summed KL
    for i, chunk in enumerate(_chunks(ids, batch)):
        lc = metrics.log_softmax(_logits(cand, chunk).astype(np.float32))
        lr, top = ref.get((tag, i), chunk)
        picked = np.take_along_axis(lc[:, :-1], chunk[:, 1:, None], axis=-1)[..., 0]
        nll.append(-picked.astype(np.float64).sum(axis=1))
        agree.append((lc.argmax(-1) == top).sum(axis=1).astype(np.float64))
        kl.append((np.exp(lr) * (lr - lc)).astype(np.float64).sum(axis=(1, 2)))
    nll, agree, kl = np.concatenate(nll), np.concatenate(agree), np.concatenate(kl)
    pos, n = ids.size, ids.shape[0] * (ids.shape[1] - 1)
    return {
        "ppl": float(np.exp(nll.sum() / n)),
        "top1": float(agree.sum() / pos),
        "kl": max(float(kl.sum() / pos), 0.0),
        "per_window": {"nll": nll, "kl": kl, "tokens": ids.shape[1] - 1, "positions": ids.shape[1]},
    }


BOOT, BOOT_SEED = 4000, 0
GATE_WINDOWS = 8  # dsc validate's default: the first 8 held-out windows


def paired(a: dict, b: dict, ref: dict, first: int | None = None) -> dict:
    """dsc (`a`) minus ORT (`b`) on the same windows, each against the fp16 `ref`: the
    difference of perplexity deltas (percentage points) and of mean KL, with 95% intervals from
    a paired bootstrap over windows (the same resampled windows for all three graphs)."""
    pa, pb, pr = a["per_window"], b["per_window"], ref["per_window"]
    na, nb, nr, ka, kb = (x[:first] for x in (pa["nll"], pb["nll"], pr["nll"], pa["kl"], pb["kl"]))
    w = len(na)
    idx = np.random.default_rng(BOOT_SEED).integers(0, w, (BOOT, w))
    idx = np.vstack([np.arange(w)[None], idx])  # row 0: the windows as they are

    def ppl(x):
        return np.exp(x[idx].sum(axis=1) / (w * pa["tokens"]))

    d = (ppl(na) - ppl(nb)) / ppl(nr)  # = delta_a - delta_b
    k = (ka[idx] - kb[idx]).sum(axis=1) / (w * pa["positions"])
    lo, hi = np.percentile(d[1:], [2.5, 97.5])
    klo, khi = np.percentile(k[1:], [2.5, 97.5])
    return {
        "windows": w,
        "ppl_delta_diff": float(d[0]),
        "ci": [float(lo), float(hi)],
        "kl_diff": float(k[0]),
        "kl_ci": [float(klo), float(khi)],
    }


def _verdict(diff: float, ci) -> str:
    if ci[1] < 0:
        return "dsc better"
    if ci[0] > 0:
        return "ORT better"
    return "dsc better (within noise)" if diff <= 0 else "ORT better (within noise)"


def _chunks(ids: np.ndarray, batch: int):
    return [ids[i : i + batch] for i in range(0, len(ids), batch)]


def _logits(model, ids: np.ndarray) -> np.ndarray:
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    return model.step(ids, mask, pos, model.empty_past(len(ids))).logits


class _Ref:
    """The fp16 reference's log-probabilities per batch, computed once per model."""

    def __init__(self, path: Path, io: dict):
        from dsc.backends.onnxruntime.runner import OrtCausalLM

        self.model = OrtCausalLM(path, io)
        self.cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, i: tuple, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from dsc.validate import metrics

        if i not in self.cache:
            lr = metrics.log_softmax(_logits(self.model, chunk).astype(np.float32))
            self.cache[i] = (lr, lr.argmax(-1))
        return self.cache[i]


def score(
    cand_path: Path,
    cand_io: dict,
    ref_art: Path,
    ref: _Ref,
    ids: np.ndarray,
    bos_ids: np.ndarray | None,
    precision: str,
) -> dict:
    wide = heldout_eval(cand_path, cand_io, ref, ids)
    bos = heldout_eval(cand_path, cand_io, ref, bos_ids, "bos") if bos_ids is not None else None
    g = gate(cand_path, cand_io, ref_art, precision)
    return {
        "wide": wide,
        "bos": bos,
        "gate": {
            "ppl_delta": g["perplexity"]["delta"],
            "top1": g["prefill"]["top1"],
            "cosine_min": min(g["prefill"]["cosine_min"], g["decode"]["cosine_min"]),
            "passed": g["passed"],
            "failures": g["failures"],
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny-deepseek-v3,tiny-qwen2")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--windows",
        type=int,
        default=None,
        help="held-out 128-token windows for the main eval (default: all)",
    )
    args = ap.parse_args()
    from dsc import api
    from dsc.artifacts import load_io_spec
    from dsc.quantize import calibration_windows, read_calibration_text
    from dsc.stages.quantize import quantize_artifact

    work = args.out or Path(tempfile.mkdtemp(prefix="dsc-quant-bench-"))
    rows, pairs = [], []
    for name in args.models.split(","):
        ckpt = REPO / "examples" / "models" / name
        fp16, fp32 = work / name / "fp16", work / name / "fp32"
        api.export(ckpt, fp16, dtype="fp16", force=True, progress=_quiet)
        api.export(ckpt, fp32, dtype="fp32", force=True, progress=_quiet)
        tok = api.load_tokenizer(fp16)
        windows = calibration_windows(tok, read_calibration_text(None), SAMPLES, SEQ_LEN)
        ids = heldout_windows(tok, args.windows)
        bos_ids = bos_led(tok, ids)
        ref = _Ref(fp16 / "model.onnx", load_io_spec(fp16))
        ref_score = score(fp16 / "model.onnx", load_io_spec(fp16), fp16, ref, ids, bos_ids, "fp16")
        rows.append((name, "fp16 reference", ref_score, 0.0))
        for k, (label, precision, wo, alpha) in enumerate(DSC_RUNS):
            t = time.perf_counter()
            out = work / name / f"dsc-{k}-{precision}"
            quantize_artifact(
                fp16,
                out,
                precision,
                weight_only=wo,
                samples=SAMPLES,
                seq_len=SEQ_LEN,
                alpha=alpha,
                force=True,
            )
            secs = time.perf_counter() - t
            rows.append(
                (
                    name,
                    label,
                    score(
                        out / "model.onnx", load_io_spec(out), fp16, ref, ids, bos_ids, precision
                    ),
                    secs,
                )
            )
        for label, precision in ORT_RUNS:
            t = time.perf_counter()
            try:
                path = ort_quantize(fp32, work / name / f"ort-{precision}.onnx", precision, windows)
                secs = time.perf_counter() - t
                res = score(
                    path, load_io_spec(fp32), fp16, ref, ids, bos_ids, precision.split("-")[0]
                )
            except Exception as e:  # report, do not hide
                res, secs = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}, 0.0
            rows.append((name, label, res, secs))
        for r in rows:
            for key in ("wide", "bos"):
                if r[0] == name and r[2].get(key):
                    p0 = ref_score[key]["ppl"]
                    r[2][key]["ppl_delta"] = (r[2][key]["ppl"] - p0) / p0
        by_label = {r[1]: r[2] for r in rows if r[0] == name}
        for a, b in PAIRS:
            ra, rb = by_label.get(a, {}), by_label.get(b, {})
            if "wide" not in ra or "wide" not in rb:
                continue
            cmp = {
                "heldout": paired(ra["wide"], rb["wide"], ref_score["wide"]),
                "gate_windows": paired(ra["wide"], rb["wide"], ref_score["wide"], GATE_WINDOWS),
            }
            if ra.get("bos") and rb.get("bos"):
                cmp["bos_led"] = paired(ra["bos"], rb["bos"], ref_score["bos"])
            pairs.append((name, a, b, cmp))
        print(f"{name}: held-out eval on {ids.shape[0]} x {ids.shape[1]} tokens", flush=True)
    print(
        "| model | method | ppl | ppl delta | top-1 | KL | BOS-led: ppl delta | top-1 | KL | "
        "gate (8 win): ppl delta | top-1 | cos min | verdict | quantize s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    summary = []
    for name, label, r, secs in rows:
        if "error" in r:
            print(f"| {name} | {label} | n/a ({r['error']}) | | | | | | | | | | | |")
            summary.append({"model": name, "method": label, "error": r["error"]})
            continue
        w, b, g = r["wide"], r["bos"] or {}, r["gate"]
        bos_cells = f"{b['ppl_delta']:+.2%} | {b['top1']:.4f} | {b['kl']:.5f}" if b else "n/a | | "
        print(
            f"| {name} | {label} | {w['ppl']:.3f} | {w['ppl_delta']:+.2%} | {w['top1']:.4f} | "
            f"{w['kl']:.5f} | {bos_cells} | {g['ppl_delta']:+.2%} | {g['top1']:.4f} | "
            f"{g['cosine_min']:.4f} | {'pass' if g['passed'] else 'FAIL'} | {secs:.1f} |"
        )
        summary.append(
            {
                "model": name,
                "method": label,
                **{f"heldout_{k}": v for k, v in w.items() if k != "per_window"},
                **{f"bos_led_{k}": v for k, v in b.items() if k != "per_window"},
                **{f"gate_{k}": v for k, v in g.items()},
                "seconds": secs,
            }
        )
    print(
        f"\n| model | dsc vs ORT | held-out: ppl delta diff [95% CI] | KL diff [95% CI] | "
        f"BOS-led: ppl delta diff [95% CI] | KL diff | gate's {GATE_WINDOWS} windows: "
        "ppl delta diff [95% CI] | verdict (held-out, BOS-led, gate windows) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, a, b, cmp in pairs:
        h, g, bl = cmp["heldout"], cmp["gate_windows"], cmp.get("bos_led")

        def cell(c):
            return (
                f"{c['ppl_delta_diff'] * 100:+.3f} pp [{c['ci'][0] * 100:+.3f}, "
                f"{c['ci'][1] * 100:+.3f}]"
            )

        def kcell(c):
            return f"{c['kl_diff']:+.5f} [{c['kl_ci'][0]:+.5f}, {c['kl_ci'][1]:+.5f}]"

        verdicts = [_verdict(c["ppl_delta_diff"], c["ci"]) for c in (h, bl, g) if c]
        print(
            f"| {name} | {a} vs {b} | {cell(h)} | {kcell(h)} | "
            f"{cell(bl) if bl else 'n/a'} | {kcell(bl) if bl else 'n/a'} | {cell(g)} | "
            f"{'; '.join(verdicts)} |"
        )
        summary.append({"model": name, "dsc": a, "ort": b, **cmp})
    (work / "quant_accuracy.json").write_text(json.dumps(summary, indent=2))
    print(f"\nresults: {work / 'quant_accuracy.json'}")


if __name__ == "__main__":
    main()
