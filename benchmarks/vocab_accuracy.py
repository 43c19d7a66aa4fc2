"""What quantizing lm_head and the embedding table costs, on the trained tiny models.

    python benchmarks/vocab_accuracy.py [--models tiny-deepseek-v3,tiny-qwen2] [--windows 64]
                                        [--builds] [--out DIR] [--json results.json]

Part 1, the vocabulary weights alone: each model is exported at fp16 and optimized for rtx-4090
(what `dsc build` does), then `VocabQDQPass` quantizes only lm_head and/or the embedding (the rest
stays fp16), and the accuracy gate's metrics are taken against the fp16 graph on the held-out
split: perplexity delta, mean KL(fp16 || candidate) and top-1 agreement over `--windows` windows
of 128 tokens (default 64: 8,192 tokens; the gate itself uses 8).

Part 2 (`--builds`), the full pipeline: `dsc build MODEL --profile a100-80gb,rtx-4090` with a body
precision alone and with `--quantize-lm-head` / `--quantize-embedding` (fp8 builds target
rtx-4090 only: SM80 has no fp8), reading the gate's verdict and numbers from the artifact.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCAB_RUNS = [
    ("int8", None),
    ("fp8", None),
    ("int4", None),
    (None, "int8"),
    (None, "fp8"),
    (None, "int4"),
    ("int8", "int8"),
    ("int4", "int8"),
    ("int4", "int4"),
]
# (body flag, lm_head, embedding, profiles)
BUILD_RUNS = [
    ("--int4-awq", None, None, "a100-80gb,rtx-4090"),
    ("--int4-awq", "int4", "int8", "a100-80gb,rtx-4090"),
    ("--int4-awq", "int4", "int4", "a100-80gb,rtx-4090"),
    ("--int8", None, None, "a100-80gb,rtx-4090"),
    ("--int8", "int8", "int8", "a100-80gb,rtx-4090"),
    ("--fp8", None, None, "rtx-4090"),
    ("--fp8", "fp8", "fp8", "rtx-4090"),
]


def _quiet(msg):
    pass


def _reference(model_dir: Path, out: Path) -> Path:
    from dsc import api
    from dsc.hardware import load_profile
    from dsc.passes import PassContext, PassOptions
    from dsc.passes.optimize import optimize_in_place

    api.export(model_dir, out, dtype="fp16", progress=_quiet)
    optimize_in_place(out, PassContext(load_profile("rtx-4090"), PassOptions()))
    return out


def vocab_only(model_dir: Path, work: Path, windows: int) -> list[dict]:
    import shutil

    import onnx_ir as ir

    from dsc.api import load_tokenizer
    from dsc.artifacts import load_io_spec
    from dsc.backends.onnxruntime.runner import OrtCausalLM
    from dsc.passes.quant.vocab import VocabQDQPass
    from dsc.validate.gate import GateOptions, run_gate
    from dsc.validate.run import default_text

    ref_dir = _reference(model_dir, work / "fp16")
    io = load_io_spec(ref_dir, check_manifest=False)
    tok = load_tokenizer(ref_dir)
    text = default_text()
    opts = GateOptions(windows=windows, locate=False)
    ref = OrtCausalLM(ref_dir / io["onnx"], io)
    rows = []
    for lm_head, embedding in VOCAB_RUNS:
        model = ir.load(ref_dir / io["onnx"])
        vq = VocabQDQPass(lm_head, embedding)
        vq(model)
        cand_dir = work / f"lm-{lm_head}-emb-{embedding}"
        cand_dir.mkdir()
        ir.save(model, cand_dir / io["onnx"])
        shutil.copy2(ref_dir / "model_io.json", cand_dir / "model_io.json")
        cand = OrtCausalLM(cand_dir / io["onnx"], io)
        precision = "int4" if "int4" in (lm_head, embedding) else (lm_head or embedding)
        r = run_gate(cand, ref, tok, text, precision=precision, options=opts).to_json()
        saved = sum(
            v["bytes_before"] - v["bytes_after"]
            for v in {
                v["weight"]: v for v in (vq.report.get("lm_head"), vq.report.get("embedding")) if v
            }.values()
        )
        rows.append(
            {
                "model": model_dir.name,
                "lm_head": lm_head,
                "embedding": embedding,
                "ppl_delta": r["perplexity"]["delta"],
                "kl_mean": r["prefill"]["kl_mean"],
                "top1": r["prefill"]["top1"],
                "tokens": r["data"]["tokens"],
                "bytes_saved": saved,
            }
        )
        print(
            f"{model_dir.name:18s} lm_head {lm_head or 'fp16':5s} embedding "
            f"{embedding or 'fp16':5s}  ppl {r['perplexity']['delta']:+.3%}  "
            f"KL {r['prefill']['kl_mean']:.5f}  top-1 {r['prefill']['top1']:.4f}",
            flush=True,
        )
    return rows


def builds(model_dir: Path, work: Path) -> list[dict]:
    rows = []
    for body, lm_head, embedding, profiles in BUILD_RUNS:
        out = work / f"build{body}-{lm_head}-{embedding}"
        cmd = [
            sys.executable,
            "-m",
            "dsc",
            "build",
            str(model_dir),
            "-o",
            str(out),
            "--profile",
            profiles,
            body,
            "-q",
        ]
        if lm_head:
            cmd += ["--quantize-lm-head", lm_head]
        if embedding:
            cmd += ["--quantize-embedding", embedding]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
        v = (
            json.loads((out / "validation.json").read_text())
            if (out / "validation.json").is_file()
            else {}
        )
        m = (
            json.loads((out / "manifest.json").read_text())
            if (out / "manifest.json").is_file()
            else {}
        )
        engines = {
            n: (p_.get("engine") or {}).get("size_bytes")
            for n, p_ in (m.get("profiles") or {}).items()
        }
        row = {
            "model": model_dir.name,
            "body": body,
            "lm_head": lm_head,
            "embedding": embedding,
            "exit": p.returncode,
            "passed": v.get("passed"),
            "ppl_delta": (v.get("perplexity") or {}).get("delta"),
            "kl_mean": (v.get("prefill") or {}).get("kl_mean"),
            "top1": (v.get("prefill") or {}).get("top1"),
            "engines": engines,
            "seconds": round(seconds, 1),
            "command": "dsc build " + " ".join(cmd[4:]).replace(str(work) + "/", "OUT/"),
        }
        if p.returncode:
            row["error"] = p.stderr.strip().splitlines()[-1:] if p.stderr else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-deepseek-v3,tiny-qwen2")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--builds", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    work = a.out or Path(tempfile.mkdtemp(prefix="vocab-accuracy-"))
    results = {"vocab_only": [], "builds": []}
    for name in a.models.split(","):
        model_dir = REPO / "examples" / "models" / name
        (work / name).mkdir(parents=True, exist_ok=True)
        (work / name / "vocab").mkdir(exist_ok=True)
        results["vocab_only"] += vocab_only(model_dir, work / name / "vocab", a.windows)
        if a.builds:
            results["builds"] += builds(model_dir, work / name)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
