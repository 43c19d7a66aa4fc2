"""Smoke validation: does the exact graph handed to the builder run, and is its KV cache right?

ONNX Runtime (CPU) loads the artifact's graph, prefills a prompt, and greedy-decodes N tokens one
step at a time through the KV cache. Checks:

- every logit is finite (prefill and each decode step);
- the cache is consistent: one prefill of prompt + generated tokens gives, at each generated
  position, the logits the step-by-step decode gave (max abs difference relative to the largest
  logit, within `TOLERANCE[dtype]`), and the same greedy tokens.

This is a sanity check, not the accuracy gate: the gate (ONNX/engine vs the FP16 reference:
KL, top-k, perplexity) is `dsc validate`. ONNX Runtime's CPU provider has no bf16
MatMul: a bf16 graph is run as its float32 view
(`dsc.backends.onnxruntime.runner.inference_session`),
which checks the graph's structure and KV cache, not bf16 rounding.
"""

from __future__ import annotations

import logging
import time
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


def smoke_validate(artifact: Path, io: dict, *, tokens: int = 8, prompt: str = PROMPT) -> dict:
    """Run the smoke check on `artifact`'s graph; returns the record (never raises on a fail)."""
    from dsc.backends.onnxruntime.runner import OrtCausalLM

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
    runner = OrtCausalLM(Path(artifact) / io["onnx"], io)
    tokenizer = _tokenizer(artifact)
    prompt_ids = _prompt_ids(tokenizer, prompt, int(io.get("vocab_size") or 0))
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
    # One prefill of the prompt and all but the last generated token: its last `tokens`
    # positions must reproduce the step-by-step logits.
    full = np.array([prompt_ids + generated[:-1]], dtype=np.int64)
    ref = (
        runner.step(
            full, np.ones_like(full), np.arange(full.shape[1])[None, :], runner.empty_past(1)
        )
        .logits[0, n - 1 :]
        .astype(np.float32)
    )
    inc = np.stack(step_logits)
    scale = float(np.abs(ref).max()) or 1.0
    max_abs = float(np.abs(inc - ref).max()) if finite else float("inf")
    rel = max_abs / scale
    agree = float((ref.argmax(-1) == np.array(generated)).mean())
    passed = finite and rel <= TOLERANCE[dtype]
    failures = []
    if not finite:
        failures.append("non-finite logits")
    if finite and rel > TOLERANCE[dtype]:
        failures.append(
            f"decode through the KV cache differs from prefill by {rel:.3g} of the "
            f"largest logit (tolerance {TOLERANCE[dtype]:g})"
        )
    record.update(
        status="ran",
        passed=passed,
        failures=failures,
        prompt=prompt,
        prompt_tokens=n,
        generated_tokens=generated,
        finite=finite,
        kv_max_abs_diff=max_abs,
        kv_rel_diff=rel,
        tolerance=TOLERANCE[dtype],
        greedy_agreement=agree,
        seconds=round(time.perf_counter() - t0, 3),
    )
    if tokenizer is not None:
        record["text"] = prompt + tokenizer.decode(generated, skip_special_tokens=True)
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
