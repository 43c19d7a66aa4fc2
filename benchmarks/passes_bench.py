"""Graph passes: node count, TensorRT-RTX build time and engine size, ONNX Runtime CPU latency,
before and after `dsc optimize --profile rtx-4090`, per model family.

    python benchmarks/passes_bench.py [--only llama,deepseek_v3] [--wide] [--json out.json]

For each family (`dsc.fixtures`, random weights, fp32 export; `--wide` scales the fixture to
hidden 512 / 8 heads / intermediate 1024, MLA rank 128, so GEMMs weigh more than op overhead):
export, run the default pass pipeline for the rtx-4090 profile (TensorRT-RTX target, SM89),
then for the exported and the optimized graph measure

- nodes: main graph, and with the If branches the MLA/MoE passes create
- TensorRT-RTX 1.7 ahead-of-time build for SM89 (envelope batch 1, input 128, KV 256): seconds
  and engine bytes
- ONNX Runtime 1.32 CPU latency, one intra-op thread, batch 1: prefill of 128 tokens (median of
  5 runs) and decode of 32 tokens after it (mean per token, median of 3 runs)

The machines here have 2 shared CPU cores and no GPU: timings are relative, not absolute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PREFILL, DECODE = 128, 32


def _quiet(msg):
    pass


def _wide_config(family: str, vocab: int, bos: int, eos: int, pad: int):
    from dsc.fixtures import fixture_config

    cfg = fixture_config(family, vocab, bos=bos, eos=eos, pad=pad)
    cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size = 512, 8, 1024
    if family in ("llama", "qwen2"):
        cfg.num_key_value_heads = 4
    else:
        cfg.num_key_value_heads = 8
        cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim = 128, 32, 64
        cfg.v_head_dim, cfg.moe_intermediate_size = 64, 256
        if hasattr(cfg, "head_dim"):  # V3's config derives the rotary dim from head_dim at init
            cfg.head_dim = cfg.qk_rope_head_dim
        if family == "deepseek_v3":
            cfg.q_lora_rank = 192
    return cfg


def _checkpoint(family: str, work: Path, wide: bool) -> Path:
    from dsc.fixtures import make_fixture, train_tokenizer

    tok = work / "tokenizer"
    if not tok.exists():
        train_tokenizer(tok)
    if not wide:
        return make_fixture(family, work / "ckpt" / family, tokenizer_dir=tok)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = AutoTokenizer.from_pretrained(tok)
    cfg = _wide_config(family, len(t), t.bos_token_id, t.eos_token_id, t.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    out = work / "ckpt" / f"{family}-wide"
    model.save_pretrained(out, safe_serialization=True)
    t.save_pretrained(out)
    return out


def _nodes(path: Path) -> tuple[int, int]:
    import onnx_ir as ir

    model = ir.load(path)
    total = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
    return len(model.graph), total


def _build(path: Path, io: dict) -> tuple[float, int]:
    from dsc.backends.tensorrt import BuildOptions, ShapeEnvelope, build_engine

    t0 = time.perf_counter()
    r = build_engine(
        path,
        ShapeEnvelope(max_batch=1, max_input_len=PREFILL, max_kv=256),
        BuildOptions(target_sm=89),
        backend="rtx",
        io_spec=io,
    )
    return time.perf_counter() - t0, r.size_bytes


def _latency(path: Path, io: dict) -> tuple[float, float]:
    from dsc.backends.onnxruntime.runner import OrtCausalLM

    # "all": ONNX Runtime's own fusions on, as a user timing it would run it (fp32, no Q/DQ).
    lm = OrtCausalLM(path, io, threads=1, optimization="all")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, io["vocab_size"], (1, PREFILL))
    mask = np.ones((1, PREFILL), dtype=np.int64)
    pos = np.arange(PREFILL)[None]
    lm.step(ids, mask, pos, lm.empty_past(1))  # warm-up
    prefill = []
    for _ in range(5):
        t0 = time.perf_counter()
        out = lm.step(ids, mask, pos, lm.empty_past(1))
        prefill.append(time.perf_counter() - t0)
    decode = []
    for _ in range(3):
        past, m = out.present, mask
        t0 = time.perf_counter()
        for i in range(DECODE):
            m = np.ones((1, PREFILL + i + 1), dtype=np.int64)
            step = lm.step(
                rng.integers(0, io["vocab_size"], (1, 1)), m, np.array([[PREFILL + i]]), past
            )
            past = step.present
        decode.append((time.perf_counter() - t0) / DECODE)
    return statistics.median(prefill) * 1e3, statistics.median(decode) * 1e3


def bench(family: str, work: Path, wide: bool) -> dict:
    from dsc import api
    from dsc.hardware import load_profile
    from dsc.passes import PassOptions
    from dsc.stages.optimize import optimize_artifact

    ckpt = _checkpoint(family, work, wide)
    exported = work / "exported" / ckpt.name
    api.export(ckpt, exported, dtype="fp32", progress=_quiet, force=True)
    optimized = work / "optimized" / ckpt.name
    t0 = time.perf_counter()
    result = optimize_artifact(
        exported, optimized, profile=load_profile("rtx-4090"), options=PassOptions(), force=True
    )
    pass_seconds = time.perf_counter() - t0
    row = {
        "model": ckpt.name,
        "pass_seconds": round(pass_seconds, 2),
        "coverage": {
            k: f"{e['fused'] + e['kept']}/{e['blocks']}"
            for k, e in result.coverage["kinds"].items()
            if e["blocks"] and k != "rope"
        },
    }
    for label, art in (("before", exported), ("after", optimized)):
        io = json.loads((art / "model_io.json").read_text())
        path = art / io["onnx"]
        main, total = _nodes(path)
        build_s, engine = _build(path, io)
        prefill_ms, decode_ms = _latency(path, io)
        row[label] = {
            "nodes": main,
            "nodes_with_branches": total,
            "build_s": round(build_s, 2),
            "engine_mib": round(engine / 2**20, 2),
            "prefill_ms": round(prefill_ms, 2),
            "decode_ms_per_token": round(decode_ms, 3),
        }
        print(
            f"{ckpt.name:<16} {label:<6} nodes {main:4d} ({total:4d})  build {build_s:5.1f}s  "
            f"engine {engine / 2**20:6.1f} MiB  prefill {prefill_ms:7.2f} ms  "
            f"decode {decode_ms:6.3f} ms/token",
            flush=True,
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="llama,qwen2,deepseek_v2,deepseek_v3")
    ap.add_argument("--wide", action="store_true", help="hidden 512 instead of the fixture's 64")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsc-passes-bench-") as tmp:
        for family in args.only.split(","):
            rows.append(bench(family.strip(), Path(tmp), args.wide))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
