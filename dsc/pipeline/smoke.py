"""Smoke validation: does the exact graph handed to the builder run, and is its KV cache right?

ONNX Runtime (CPU) loads the artifact's graph, prefills a prompt, and greedy-decodes N tokens one
step at a time through the KV cache. Checks:

- every logit is finite (prefill and each decode step);
- the cache is consistent: one prefill of prompt + generated tokens gives, at each generated
  position, the logits the step-by-step decode gave (max abs difference relative to the largest
  logit, within `TOLERANCE[dtype]`), and the same greedy tokens.

A quantized graph's activation Q/DQ turns float noise into whole quantization steps: one prefill
and many one-token steps reduce in different orders, an activation that lands near a rounding
boundary rounds to the neighbouring step on one path only, and everything downstream moves by
that step. Measured on the DeepSeek-R1-Distill-Qwen-1.5B config cut to 2 layers (random
weights), `dsc export` + `dsc quantize --int8 --samples 4`, then
`python benchmarks/smoke_qdq_flips.py ARTIFACT` (prompt of 4 tokens, 8 steps): the 7 steps
without such a flip differ by 0–5e-4 of the largest logit, as the fp16 graph does; at the step
where one element of layer 1's o_proj input (pre-quantization difference 4.9e-4, step 5.9e-3)
rounds the other way, 15 and then 430 downstream elements follow and the logits differ by
5.9e-3. At 28 layers the
flips add up past the fp16 tolerance (0.156 for the FP8 graph) with a correct cache. So for a
graph with activation Q/DQ the cache check (`kv_rel_diff`, against `TOLERANCE`) runs on the
same graph with its activation Q/DQ pairs removed (`dsc.passes.quant.qdq.strip_activation_qdq`:
same dequantized weights, same cache path, no activation rounding); the exact graph's own
difference is recorded beside it (`kv_rel_diff_exact_graph`), and its logits must be finite.

This is a sanity check, not the accuracy gate: the gate (ONNX/engine vs the FP16 reference:
KL, top-k, perplexity) is `dsc validate`. ONNX Runtime's CPU provider has no bf16
MatMul: a bf16 graph is run as its float32 view
(`dsc.backends.onnxruntime.runner.inference_session`),
which checks the graph's structure and KV cache, not bf16 rounding.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PROMPT = "And God said"
# Relative tolerance of decode-vs-prefill logits: reduction order differs between one long
# prefill and many one-token steps, which fp16 accumulation makes visible.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 2e-2}
NOTE = (
    "smoke check only (ONNX Runtime on the graph handed to the builder); the accuracy gate "
    "against the FP16 reference is `dsc validate`"
)


@dataclass
class KVCheck:
    """One greedy decode through the cache, compared with one prefill of the same tokens."""

    generated: list[int]  # greedy tokens of the step-by-step decode
    finite: bool  # every logit of the prefill and of every step is finite
    max_abs: float  # max |decode - prefill| over the generated positions (logit units)
    rel: float  # max_abs / max |prefill logit|
    agreement: float  # fraction of positions where the prefill's argmax is the decoded token


def kv_check(runner, prompt_ids: list[int], tokens: int) -> KVCheck:
    """Prefill `prompt_ids`, greedy-decode `tokens` tokens one step at a time, then prefill the
    prompt and all but the last generated token once: its last `tokens` positions must give the
    step-by-step logits. `runner`: an `OrtCausalLM` or `SegmentedCausalLM` (batch 1)."""
    ids = np.array([prompt_ids], dtype=np.int64)
    n = len(prompt_ids)
    out = runner.step(ids, np.ones_like(ids), np.arange(n)[None, :], runner.empty_past(1))
    finite = bool(np.isfinite(out.logits).all())
    step_logits = [out.logits[0, -1].astype(np.float32)]
    generated: list[int] = []
    past = out.present
    for i in range(tokens):
        tok = int(step_logits[-1].argmax())
        generated.append(tok)
        if i == tokens - 1:
            break
        total = n + len(generated)
        out = runner.step(
            np.array([[tok]]), np.ones((1, total), np.int64), np.array([[total - 1]]), past
        )
        past = out.present
        finite &= bool(np.isfinite(out.logits).all())
        step_logits.append(out.logits[0, -1].astype(np.float32))
    full = np.array([prompt_ids + generated[:-1]], dtype=np.int64)
    ref = (
        runner.step(
            full, np.ones_like(full), np.arange(full.shape[1])[None, :], runner.empty_past(1)
        )
        .logits[0, n - 1 :]
        .astype(np.float32)
    )
    finite &= bool(np.isfinite(ref).all())
    inc = np.stack(step_logits)
    scale = float(np.abs(ref).max()) if finite else 1.0
    max_abs = float(np.abs(inc - ref).max()) if finite else float("inf")
    agree = float((ref.argmax(-1) == np.array(generated)).mean())
    return KVCheck(generated, finite, max_abs, max_abs / (scale or 1.0), agree)


def smoke_validate(artifact: Path, io: dict, *, tokens: int = 8, prompt: str = PROMPT) -> dict:
    """Run the smoke check on `artifact`'s graph; returns the record (never raises on a fail)."""
    import onnx_ir as ir

    from dsc.backends.onnxruntime.segmented import causal_lm
    from dsc.passes.quant.qdq import strip_activation_qdq

    dtype = str(io.get("dtype", "fp16"))
    record = {
        "kind": "smoke",
        "backend": "onnxruntime",
        "graph": io["onnx"],
        "dtype": dtype,
        "note": NOTE,
    }
    if dtype not in TOLERANCE:
        record.update(
            status="skipped",
            passed=None,
            reason=f"ONNX Runtime's CPU provider cannot run a {dtype} graph",
        )
        return record
    t0 = time.perf_counter()
    path = Path(artifact) / io["onnx"]
    tokenizer = _tokenizer(artifact)
    prompt_ids = _prompt_ids(tokenizer, prompt, int(io.get("vocab_size") or 0))
    # Sessions freed on return; above 1 GiB of weights one decoder layer at a time (causal_lm).
    exact = kv_check(causal_lm(path, io), prompt_ids, tokens)
    checked, pairs = exact, 0
    if exact.finite:
        stripped = ir.load(path)
        pairs = strip_activation_qdq(stripped)
        if pairs:
            checked = kv_check(causal_lm(stripped, io), prompt_ids, tokens)
        del stripped
    finite = exact.finite and checked.finite
    passed = finite and checked.rel <= TOLERANCE[dtype]
    failures = []
    if not finite:
        failures.append("non-finite logits")
    elif not passed:
        on = f" (activation Q/DQ removed: {pairs} pairs)" if pairs else ""
        failures.append(
            f"decode through the KV cache differs from prefill{on} by "
            f"{checked.rel:.3g} of the largest logit (tolerance {TOLERANCE[dtype]:g})"
        )
    record.update(
        status="ran",
        passed=passed,
        failures=failures,
        prompt=prompt,
        prompt_tokens=len(prompt_ids),
        generated_tokens=exact.generated,
        finite=finite,
        kv_max_abs_diff=checked.max_abs,
        kv_rel_diff=checked.rel,
        tolerance=TOLERANCE[dtype],
        greedy_agreement=exact.agreement,
        seconds=round(time.perf_counter() - t0, 3),
    )
    if pairs:
        record.update(kv_checked_without_activation_qdq=pairs, kv_rel_diff_exact_graph=exact.rel)
    if tokenizer is not None:
        record["text"] = prompt + tokenizer.decode(exact.generated, skip_special_tokens=True)
    return record


def _tokenizer(artifact: Path):
    """The artifact's tokenizer, or None if it has none that loads."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(artifact))
    except Exception as e:  # a graph is still worth checking without its tokenizer
        logger.info("smoke check without the tokenizer: %s", e)
        return None


def _prompt_ids(tokenizer, prompt: str, vocab: int) -> list[int]:
    """The prompt through the tokenizer; fixed ids without one."""
    if tokenizer is not None:
        ids = [int(i) for i in tokenizer(prompt)["input_ids"]]
        if ids:
            return ids
    return [i % max(vocab, 8) for i in (3, 5, 7, 11)]
