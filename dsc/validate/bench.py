"""Latency of a dsc graph: time to first token, time per output token, tokens/s, percentiles.

For each (batch, prompt length) in the grid: `warmup` untimed generations, then `repeats` timed
ones; each times the prefill (TTFT) and every decode step (TPOT). Reported: p50/p90/p99 of both,
decode tokens/s at p50 (batch / TPOT), and the memory traffic a decode step needs (every weight
once, plus the KV cache read at that context) divided by TPOT: the bandwidth reached.

Here the backend is ONNX Runtime on the CPU, so the bandwidth fraction is against this host's
measured memory bandwidth (a streaming copy; `host_bandwidth_gbps`). Where a hardware profile
is given its own decode ceiling for this model is reported beside it: a fraction of the GPU's
ceiling is only meaningful for timings taken on that GPU (TensorRT on the device).
"""

from __future__ import annotations

import time

import numpy as np


def host_bandwidth_gbps(mib: int = 256, repeats: int = 3) -> float:
    """Streaming copy bandwidth (read + write bytes / s), best of `repeats`."""
    a = np.ones(mib * 2**20 // 8, dtype=np.float64)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9


def weight_bytes(onnx_path) -> int:
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    total = 0
    for init in proto.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        total += n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total


def _pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e3
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
    }


def bench(
    runner,
    *,
    onnx_path,
    batches=(1,),
    prompt_lens=(128,),
    gen_len: int = 32,
    warmup: int = 1,
    repeats: int = 5,
    seed: int = 0,
) -> dict:
    rng = np.random.default_rng(seed)
    vocab = int(runner.io["vocab_size"])
    wbytes = weight_bytes(onnx_path)
    kv_per_token = int(runner.io["cache"]["bytes_per_token"])
    host_bw = host_bandwidth_gbps()
    rows = []
    for b in batches:
        for length in prompt_lens:
            ids = rng.integers(3, vocab, size=(b, length), dtype=np.int64)
            ttft, tpot = [], []
            for rep in range(warmup + repeats):
                mask = np.ones_like(ids)
                pos = np.broadcast_to(np.arange(length), ids.shape).copy()
                t = time.perf_counter()
                out = runner.step(ids, mask, pos, runner.empty_past(b))
                first = time.perf_counter() - t
                steps = []
                tok = out.logits[:, -1].argmax(-1)[:, None]
                for k in range(gen_len - 1):
                    mask = np.ones((b, length + k + 1), dtype=np.int64)
                    t = time.perf_counter()
                    out = runner.step(tok, mask, np.full((b, 1), length + k), out.present)
                    steps.append(time.perf_counter() - t)
                    tok = out.logits[:, -1].argmax(-1)[:, None]
                if rep >= warmup:
                    ttft.append(first)
                    tpot.extend(steps)
            t50 = float(np.percentile(tpot, 50))
            ctx = length + gen_len // 2
            step_bytes = wbytes + b * ctx * kv_per_token
            reached = step_bytes / t50 / 1e9
            rows.append(
                {
                    "batch": b,
                    "prompt_len": length,
                    "gen_len": gen_len,
                    "repeats": repeats,
                    "ttft": _pct(ttft),
                    "tpot": _pct(tpot),
                    "decode_tokens_per_s": b / t50,
                    "prefill_tokens_per_s": b * length / float(np.percentile(ttft, 50)),
                    "decode_bytes_per_step": step_bytes,
                    "bandwidth_gbps": reached,
                    "fraction_of_host_bandwidth": reached / host_bw,
                }
            )
    return {
        "backend": "onnxruntime-cpu",
        "host_bandwidth_gbps": host_bw,
        "weight_bytes": wbytes,
        "kv_bytes_per_token": kv_per_token,
        "rows": rows,
    }
