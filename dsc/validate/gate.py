"""The validation gate: a candidate graph against its FP16 reference, on the same inputs.

The candidate is the exact graph handed to the engine builder (`model.onnx` of the artifact);
the reference is the FP16 export before passes and quantization. Both run in ONNX Runtime.

Measured on held-out text (by default the held-out split of the shipped corpus, text no
shipped model trained on):

- prefill: windows of `window` tokens; logits metrics (cosine, max abs, KL, top-1/top-5) and
  perplexity of both graphs, and the relative perplexity increase;
- decode: each window's first half is prefilled, then `decode_steps` steps are fed the text's
  next tokens (teacher forcing) through each graph's own KV cache, comparing logits per step;
- greedy generation: `prompts` short prompts, `gen_len` greedy tokens from each graph; the
  number of tokens until the first divergence.

Default thresholds depend on the candidate's precision (`DEFAULT_THRESHOLDS`) and can be
overridden one by one. Names say the direction: `min_*` must be reached, `max_*` not exceeded.
`min_cosine` applies to the 1st percentile of the per-position logit cosine (99% of positions
must reach it): the single worst position is reported too, but it is a position where the
reference logits are nearly flat as often as not (measured: tiny-deepseek-v3 INT4 after the
passes, mean 0.9989, 1st percentile 0.989, worst 0.769 at a position whose logits' spread is half
the average), so it is no measure of the graph. A broken layer moves every position.
On failure the locator (`dsc.validate.locate`) names the first layer/tensor where the error jumps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsc.errors import BadInput
from dsc.validate import locate, metrics

# Gate thresholds per candidate precision. Quantized budgets follow the perplexity budgets of
# the quantization issue (fp8 1%, int8 2%, int4 4%); the logit-level limits are set so that a
# correct graph at that precision passes on the shipped tiny models with margin and a broken
# layer does not (see tests/test_validate.py).
DEFAULT_THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {
        "min_cosine": 0.999,
        "min_top1": 0.98,
        "min_top5": 0.99,
        "max_kl": 0.005,
        "max_ppl_delta": 0.005,
        "min_greedy_match": 0.75,
    },
    "fp16": {
        "min_cosine": 0.999,
        "min_top1": 0.98,
        "min_top5": 0.99,
        "max_kl": 0.005,
        "max_ppl_delta": 0.005,
        "min_greedy_match": 0.75,
    },
    "bf16": {
        "min_cosine": 0.995,
        "min_top1": 0.95,
        "min_top5": 0.98,
        "max_kl": 0.02,
        "max_ppl_delta": 0.01,
        "min_greedy_match": 0.5,
    },
    "fp8": {
        "min_cosine": 0.98,
        "min_top1": 0.85,
        "min_top5": 0.95,
        "max_kl": 0.05,
        "max_ppl_delta": 0.01,
        "min_greedy_match": 0.25,
    },
    "int8": {
        "min_cosine": 0.97,
        "min_top1": 0.8,
        "min_top5": 0.93,
        "max_kl": 0.08,
        "max_ppl_delta": 0.02,
        "min_greedy_match": 0.2,
    },
    "int4": {
        "min_cosine": 0.95,
        "min_top1": 0.7,
        "min_top5": 0.9,
        "max_kl": 0.15,
        "max_ppl_delta": 0.04,
        "min_greedy_match": 0.1,
    },
}
THRESHOLD_KEYS = tuple(DEFAULT_THRESHOLDS["fp16"])


@dataclass
class GateOptions:
    window: int = 128
    windows: int = 8
    decode_steps: int = 8
    prompts: int = 8
    gen_len: int = 32
    locate: bool = True
    thresholds: dict[str, float] = field(default_factory=dict)


def resolve_thresholds(
    precision: str, overrides: dict[str, float] | None = None
) -> dict[str, float]:
    if precision not in DEFAULT_THRESHOLDS:
        raise BadInput(
            f"no default thresholds for precision {precision!r}; "
            f"known: {', '.join(DEFAULT_THRESHOLDS)}"
        )
    out = dict(DEFAULT_THRESHOLDS[precision])
    for key, value in (overrides or {}).items():
        if key not in THRESHOLD_KEYS:
            raise BadInput(f"unknown threshold {key!r}; known: {', '.join(THRESHOLD_KEYS)}")
        out[key] = float(value)
    return out


def parse_thresholds(items: list[str] | tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        for part in item.split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            try:
                if not sep:
                    raise ValueError
                out[key.strip()] = float(value)
            except ValueError:
                raise BadInput(f"threshold must be KEY=NUMBER, got {part!r}") from None
    return out


def _windows(tokenizer, text: str, window: int, count: int) -> np.ndarray:
    need = window * count
    # Tokenize only what is needed (a generous 16 characters per token).
    ids = tokenizer(text[: need * 16], verbose=False)["input_ids"]
    if len(ids) < need:
        count = len(ids) // window
        if count == 0:
            raise BadInput(f"validation text has {len(ids)} tokens; need at least {window}")
        need = window * count
    return np.asarray(ids[:need], dtype=np.int64).reshape(count, window)


@dataclass
class _Outputs:
    """What one graph gave on the gate's inputs."""

    prefill: np.ndarray  # [windows, window, vocab] logits; a memory-mapped .npy under `spill`
    nll: list[float]  # per window: mean next-token negative log-likelihood, nats
    decode: list[np.ndarray]  # per teacher-forced step: [windows, 1, vocab] logits
    greedy: list[list[int]]  # per prompt: greedy tokens


def _greedy_prompts(tokenizer, text: str, prompts: int) -> list[list[int]]:
    lines = [ln for ln in text.splitlines() if len(ln.split()) >= 6][: prompts * 7 : 7]
    return [tokenizer(" ".join(ln.split()[:5]))["input_ids"] for ln in lines[:prompts]]


# Prefill logits held per run: windows are prefilled together up to this many bytes of fp32
# logits (R1-Distill-Qwen-1.5B: 151,936-word vocabulary x 128 tokens = 78 MB a window, so 3 a
# run). On ONNX Runtime's CPU provider each run of an fp16 graph casts every weight to fp32
# (docs/BENCHMARKS.md), so the number of runs, not the batch, sets the gate's time at real size.
PREFILL_LOGITS_BYTES = 256 << 20


def runs_per_graph(windows: int, window: int, vocab: int, opts: GateOptions) -> int:
    """Forward passes `_run_graph` makes on one graph: the prefill batches, the decode prompt,
    one per teacher-forced step, and one per greedy token (all prompts in one batch)."""
    per_run = max(1, PREFILL_LOGITS_BYTES // (window * vocab * 4))
    steps = min(opts.decode_steps, window - window // 2)
    return -(-windows // per_run) + 1 + steps + (max(1, opts.gen_len) if opts.prompts else 0)


def _logits_vocab(runner) -> int | None:
    """The logits' last dimension from the runner's model_io.json (`io`), if it states one."""
    for out in getattr(runner, "io", {}).get("outputs", []):
        if out.get("name") == "logits" and isinstance(out["shape"][-1], int):
            return out["shape"][-1]
    return None


def _run_graph(
    runner, ids: np.ndarray, starts: list[list[int]], opts: GateOptions, spill: Path, advance
) -> _Outputs:
    """Every input of the gate through one graph: prefill of the windows (as many per run as
    `PREFILL_LOGITS_BYTES` allows; the logits of one run are resident, the rest go to
    `spill`), the teacher-forced decode of the windows' second halves (one batch), and greedy
    generation from every prompt at once (left-padded into one batch). `advance` is called
    once per forward pass."""
    count, window = ids.shape
    prefill = None
    nll = []

    def learned(vocab: int) -> int:
        # The bar's total, now that the graph's vocabulary is known (both graphs).
        advance(0, total=2 * runs_per_graph(count, window, vocab, opts))
        return max(1, PREFILL_LOGITS_BYTES // (window * vocab * 4))

    vocab = _logits_vocab(runner)
    per_run = learned(vocab) if vocab else 1
    w = 0
    while w < count:
        rows = ids[w : w + per_run]
        b = rows.shape[0]
        logits = runner.step(
            rows,
            np.ones_like(rows),
            np.broadcast_to(np.arange(window), rows.shape).copy(),
            runner.empty_past(b),
        ).logits
        if prefill is None:
            prefill = np.lib.format.open_memmap(
                spill, mode="w+", dtype=logits.dtype, shape=(count, window, logits.shape[-1])
            )
            if vocab is None:
                per_run = learned(logits.shape[-1])
        prefill[w : w + b] = logits
        nll.extend(metrics.nll(logits[i : i + 1], rows[i : i + 1]) for i in range(b))
        w += b
        advance()
    half = window // 2
    steps = min(opts.decode_steps, window - half)
    prompt = ids[:, :half]
    out = runner.step(
        prompt,
        np.ones_like(prompt),
        np.broadcast_to(np.arange(half), prompt.shape).copy(),
        runner.empty_past(count),
    )
    advance()
    decode = []
    for k in range(steps):
        out = runner.step(
            ids[:, half + k : half + k + 1],
            np.ones((count, half + k + 1), dtype=np.int64),
            np.full((count, 1), half + k, dtype=np.int64),
            out.present,
        )
        decode.append(out.logits)
        advance()
    greedy = (
        runner.generate(starts, opts.gen_len, eos_token_id=None, on_step=advance) if starts else []
    )
    return _Outputs(prefill, nll, decode, greedy)


def _maker(graph):
    """A zero-argument callable that makes the runner: `graph` itself when it is one (has
    `step`), else `graph` (already such a callable)."""
    return (lambda: graph) if hasattr(graph, "step") else graph


def _compare(cand: _Outputs, ref: _Outputs, gen_len: int) -> dict:
    acc = metrics.LogitsAccumulator()
    for w in range(ref.prefill.shape[0]):  # one window of each resident at a time
        acc.add(cand.prefill[w], ref.prefill[w])
    ppl_c, ppl_r = math.exp(float(np.mean(cand.nll))), math.exp(float(np.mean(ref.nll)))
    matched = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        for a, b in zip(cand.greedy, ref.greedy, strict=False)
    ]
    return {
        "prefill": acc.result(),
        "decode": metrics.merge(
            [metrics.logits_metrics(c, r) for c, r in zip(cand.decode, ref.decode, strict=False)]
        ),
        "perplexity": {
            "candidate": ppl_c,
            "reference": ppl_r,
            "delta": (ppl_c - ppl_r) / ppl_r if math.isfinite(ppl_c) else math.inf,
        },
        "greedy": {
            "prompts": len(matched),
            "gen_len": gen_len,
            "tokens_until_divergence": matched,
            "mean_tokens_until_divergence": float(np.mean(matched)) if matched else 0.0,
            "greedy_match": float(np.mean(matched) / gen_len) if matched else 0.0,
        },
    }


def _apart(v: float, t: float) -> str:
    """`v` with 4 significant digits, or as many more (up to 12) as it takes not to print it
    as the threshold `t` it fails (0.999996 against 0.99999 is "0.999996", not "1")."""
    for digits in range(4, 13):
        s = f"{v:.{digits}g}"
        if float(s) != t and (float(s) < t) == (v < t):
            return s
    return repr(v)


def _check(result: dict, th: dict[str, float]) -> list[str]:
    fails = []
    for phase in ("prefill", "decode"):
        m = result[phase]
        for key, metric, better in (
            ("min_cosine", "cosine_p01", "min"),
            ("min_top1", "top1", "min"),
            ("min_top5", "top5", "min"),
            ("max_kl", "kl_mean", "max"),
        ):
            v, t = m[metric], th[key]
            if (better == "min" and not v >= t) or (better == "max" and not v <= t):
                fails.append(
                    f"{phase} {metric} {_apart(v, t)} {'<' if better == 'min' else '>'} {t:g}"
                )
    d, t = result["perplexity"]["delta"], th["max_ppl_delta"]
    if not d <= t:
        fails.append(f"perplexity delta {d:+.2%} > {t:.2%}")
    g, t = result["greedy"]["greedy_match"], th["min_greedy_match"]
    if not g >= t:
        fails.append(f"greedy match {g:.2f} < {t:g}")
    return fails


@dataclass
class GateResult:
    """What `run_gate` measured; `to_json()` is validation.json's document.

    `prefill` / `decode`: `dsc.validate.metrics.logits_metrics` dicts (cosine, KL in nats,
    top-1/top-5 fractions, max abs logit difference); `perplexity`: {candidate, reference,
    delta (relative)}; `greedy`: tokens until the first divergence per prompt and their mean
    fraction of `gen_len`; `failures`: one line per threshold missed; `layers` /
    `first_divergence`: the locator's per-module relative errors (None: not run); `seconds`:
    the gate's wall time; `extra`: what the caller adds (candidate and reference names, the
    engine run's runtime and graph statistics), written after the gate's own keys.
    """

    precision: str
    thresholds: dict[str, float]
    data: dict[str, int]
    prefill: dict[str, float]
    decode: dict[str, float]
    perplexity: dict[str, float]
    greedy: dict
    failures: list[str]
    passed: bool
    layers: list[dict] | None = None
    first_divergence: dict | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    kind: str = "gate"

    def to_json(self) -> dict:
        """The record in validation.json's key order (`layers` and `first_divergence` only
        when the locator ran)."""
        doc = {
            "kind": self.kind,
            "precision": self.precision,
            "thresholds": self.thresholds,
            "data": self.data,
            "prefill": self.prefill,
            "decode": self.decode,
            "perplexity": self.perplexity,
            "greedy": self.greedy,
            "failures": self.failures,
            "passed": self.passed,
        }
        if self.layers is not None:
            doc.update(layers=self.layers, first_divergence=self.first_divergence)
        doc["seconds"] = self.seconds
        return doc | self.extra


def run_gate(
    candidate,
    reference,
    tokenizer,
    text: str,
    *,
    precision: str,
    options: GateOptions | None = None,
    candidate_path: Path | None = None,
    reference_path: Path | None = None,
    quiet: bool = False,
) -> GateResult:
    """Compare a candidate graph with its reference; return the validation record.

    `candidate`, `reference`: runners with `OrtCausalLM`'s interface (`step`, `empty_past`,
    `generate`), or zero-argument callables that make one. Given callables, each runner is made
    when its turn comes and dropped after: the reference runs every input first, its prefill
    logits spilled to a temporary .npy ([windows, window, vocab], memory-mapped), then the
    candidate, compared one window at a time; the two graphs are never resident at once and
    only one window's logits of each are in memory. Returns a `GateResult` (`prefill`,
    `decode`, `perplexity`, `greedy`, `failures`, `passed`, `layers`/`first_divergence` from
    the locator when the paths are given), checked against `DEFAULT_THRESHOLDS`; perplexity in
    nats-based units (exp of the mean next-token NLL). A bar with counts and an ETA shows on
    a terminal unless `quiet`. Raises BadInput if the text is shorter than one window.
    """
    import tempfile

    from dsc.pipeline.progress import counted

    opts = options or GateOptions()
    th = resolve_thresholds(precision, opts.thresholds)
    t0 = time.perf_counter()
    ids = _windows(tokenizer, text, opts.window, opts.windows)
    starts = _greedy_prompts(tokenizer, text, opts.prompts)
    vocab = int(getattr(tokenizer, "vocab_size", 0) or 0) or 1
    per_graph = runs_per_graph(ids.shape[0], ids.shape[1], vocab, opts)
    with (
        tempfile.TemporaryDirectory(prefix="dsc-gate-") as spill,
        counted("accuracy gate: reference, then candidate", 2 * per_graph, quiet=quiet) as advance,
    ):
        ref = _run_graph(
            _maker(reference)(), ids, starts, opts, Path(spill) / "reference.npy", advance
        )
        cand = _run_graph(
            _maker(candidate)(), ids, starts, opts, Path(spill) / "candidate.npy", advance
        )
        compared = _compare(cand, ref, opts.gen_len)
        del ref, cand  # close the memory maps before the directory goes
    fails = _check(compared, th)
    result = GateResult(
        precision=precision,
        thresholds=th,
        data={"windows": int(ids.shape[0]), "window": int(ids.shape[1]), "tokens": int(ids.size)},
        **compared,
        failures=fails,
        passed=not fails,
    )
    if candidate_path is not None and reference_path is not None and (fails or opts.locate):
        errors = locate.layer_errors(
            candidate_path, reference_path, ids[:2, : min(32, ids.shape[1])]
        )
        jump = locate.first_jump(errors)
        result.layers = [e.to_json() for e in errors]
        result.first_divergence = jump.to_json() if jump else None
    result.seconds = round(time.perf_counter() - t0, 2)
    return result
