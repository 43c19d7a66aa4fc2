"""`dsc plan`: will a model fit a target at a precision, batch and context, and how fast can it go?

Everything comes from the model's `config.json` (see `dsc.models.params`) and a
`HardwareProfile`; nothing is measured. The numbers are estimates with stated formulas:

Memory (GiB = 2^30 bytes):

- weights: every weight of the exported model at the precision. Linear weights of attention,
  dense MLP and (shared) experts are quantized; embeddings, lm_head, the MoE router, norms and
  biases stay 16-bit. INT8/FP8: 1 byte + one fp16 scale per output channel. INT4 (AWQ,
  weight-only, as `dsc quantize` writes it): 0.5 byte + per block of 128 input weights one fp16
  scale (symmetric, no zero point: 2 bytes / 128 weights).
- KV cache: batch x context x `kv_bytes_per_token` (MLA: the compressed latent), fp16 (2 bytes)
  at every precision: dsc's quantized graphs keep the cache in fp16 (no FP8 KV cache yet).
- activations: batch x input_len x (2 x hidden + max(attn_width, 2 x ffn_width)) x 2 bytes
  (one layer's live tensors in fp16: residual and normed input, plus the widest of the q/k/v
  projections or the gate/up outputs; fused attention never holds input_len^2 scores) plus the
  logits of the last position, batch x vocab x 4 bytes (fp32). `input_len` is the prefill length:
  `--input-len`, else min(context, the profile envelope's max_input_len). A prefill pass holds
  at most max(1, envelope.max_num_tokens // input_len) sequences (the engine's prefill profile,
  `dsc.backends.tensorrt._shapes`); a larger batch is prefilled in several passes.
- TensorRT workspace (`builder.workspace_gb`), runtime overhead (`memory.runtime_overhead_gb`:
  CUDA context, TensorRT runtime) and, on Jetson, the share the OS keeps (`memory.os_reserved_gb`).

Verdict: fits when the sum is at most `memory.gb`; margin = capacity - total. Largest batch at
the context: closed form (memory is affine in batch). Longest context at the batch: bisection
(memory grows with context), reported next to the model's `max_position_embeddings`.

Speed:

- decode ceiling = bandwidth / bytes read per step, times batch for the aggregate rate. A step
  reads the active weights (all non-expert weights but the embedding table, which is one row per
  token; top-k routed + shared experts, and at batch > 1 the expected number of distinct
  experts under uniform routing) and the whole KV cache at that context.
- prefill estimate = 2 x active params x (batch x input_len) / peak compute at the precision
  (INT4 weight-only runs at the fp16 rate), but never faster than reading the weights it touches
  once; the attention score FLOPs (quadratic in input_len) are left out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsc.errors import BadInput, Unsupported, UsageError
from dsc.hardware import PRECISIONS, GiB, HardwareProfile, list_profiles
from dsc.models.params import (
    ParamCounts,
    WeightGroup,
    count_params,
    expected_active_experts,
    groups_per_row,
    kv_bytes_per_token,
    load_config,
    model_shape,
    weight_inventory,
)

logger = logging.getLogger(__name__)

HIGH_PRECISION_BYTES = 2  # what stays unquantized: embeddings, lm_head, router, norms, biases
ACT_BYTES = 2
LOGITS_BYTES = 4


@dataclass(frozen=True)
class QuantScheme:
    """How one precision stores a quantizable linear weight and which peak its matmuls use."""

    weight_bytes: float
    scale_bytes_per_row: float  # per-channel scales
    group_size: int | None  # block/group quantization along the input dimension
    bytes_per_group: float  # scale (+ zero point, if any) per group
    kv_bytes: int
    compute: str  # throughput_tflops key of the matmuls
    label: str


SCHEMES: dict[str, QuantScheme] = {
    "fp16": QuantScheme(2, 0, None, 0, 2, "fp16", "fp16"),
    "bf16": QuantScheme(2, 0, None, 0, 2, "bf16", "bf16"),
    "int8": QuantScheme(1, 2, None, 0, 2, "int8", "int8 per-channel"),
    "fp8": QuantScheme(1, 2, None, 0, 2, "fp8", "fp8 per-channel"),
    "int4": QuantScheme(0.5, 0, 128, 2, 2, "fp16", "int4 g128"),
}


def group_bytes(w: WeightGroup, scheme: QuantScheme, instances: float | None = None) -> float:
    """Bytes of `instances` (default: all) instances of a weight group at a precision."""
    n = w.count if instances is None else instances
    if not w.quantizable:
        return w.out_features * w.in_features * n * HIGH_PRECISION_BYTES
    per = w.out_features * w.in_features * scheme.weight_bytes
    per += w.out_features * scheme.scale_bytes_per_row
    if scheme.group_size:
        per += w.out_features * groups_per_row(w.in_features, scheme.group_size) \
            * scheme.bytes_per_group
    return per * n


@dataclass(frozen=True)
class PlanResult:
    """One model on one target: memory breakdown, verdict, limits and speed estimates."""

    model: str
    architecture: str
    profile: str
    precision: str
    batch: int
    context: int
    input_len: int
    params: ParamCounts
    memory: Mapping[str, int]  # component -> bytes
    capacity: int
    kv_bytes_per_token: float
    kv_dtype: str
    max_batch: int
    max_context: int
    model_max_context: int | None
    decode_bytes_per_step: float
    decode_tokens_per_s: float  # aggregate over the batch
    prefill_tokens: int
    prefill_seconds: float
    prefill_bound: str  # "compute" or "memory"
    peak_tflops: float
    peak_precision: str
    bandwidth_gbps: float
    weights_label: str
    notes: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int:
        return sum(self.memory.values())

    @property
    def margin(self) -> int:
        return self.capacity - self.total

    @property
    def fits(self) -> bool:
        return self.margin >= 0

    @property
    def decode_tokens_per_s_per_sequence(self) -> float:
        return self.decode_tokens_per_s / self.batch

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "architecture": self.architecture,
            "profile": self.profile,
            "precision": self.precision,
            "batch": self.batch,
            "context": self.context,
            "input_len": self.input_len,
            "params": self.params.to_dict(),
            "memory_bytes": {**self.memory, "total": self.total},
            "capacity_bytes": self.capacity,
            "margin_bytes": self.margin,
            "fits": self.fits,
            "kv_cache": {"bytes_per_token": self.kv_bytes_per_token, "dtype": self.kv_dtype},
            "max_batch_at_context": self.max_batch,
            "max_context_at_batch": self.max_context,
            "model_max_context": self.model_max_context,
            "decode": {
                "bytes_per_step": self.decode_bytes_per_step,
                "tokens_per_s": self.decode_tokens_per_s,
                "tokens_per_s_per_sequence": self.decode_tokens_per_s_per_sequence,
                "bandwidth_gbps": self.bandwidth_gbps,
            },
            "prefill": {
                "tokens": self.prefill_tokens,
                "seconds": self.prefill_seconds,
                "tokens_per_s": self.prefill_tokens_per_s,
                "bound": self.prefill_bound,
                "peak_tflops": self.peak_tflops,
                "peak_precision": self.peak_precision,
            },
            "weights": self.weights_label,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class _Model:
    name: str
    config: Mapping[str, Any]


def _load_model(model: str | Path | Mapping[str, Any] | _Model) -> _Model:
    if isinstance(model, _Model):
        return model
    if isinstance(model, Mapping):
        return _Model(str(model.get("_name_or_path", "model")), model)
    config, path = load_config(model)
    name = path.parent.name if path.name == "config.json" else path.stem
    return _Model(name or str(path), config)


def check_precision(profile: HardwareProfile, precision: str) -> None:
    """Raise `Unsupported` naming the legal precisions when the target cannot run `precision`."""
    if precision not in PRECISIONS:
        raise BadInput(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    if not profile.supports(precision):
        raise Unsupported(
            f"precision {precision} is not supported on {profile.name} "
            f"(SM{profile.sm}); legal: {', '.join(profile.precisions)}"
        )


def plan(model: str | Path | Mapping[str, Any] | _Model, profile: HardwareProfile, precision: str,
         batch: int = 1, context: int | None = None, input_len: int | None = None) -> PlanResult:
    """Plan one model on one target. `context` defaults to the envelope's max_kv (capped at the
    model's max_position_embeddings), `input_len` to min(context, envelope max_input_len)."""
    check_precision(profile, precision)
    m = _load_model(model)
    shape = model_shape(m.config, m.name)
    params = count_params(m.config)
    inventory = weight_inventory(m.config)
    scheme = SCHEMES[precision]
    notes: list[str] = []

    if batch < 1:
        raise BadInput(f"batch must be at least 1, got {batch}")
    model_max = shape.max_position_embeddings
    if context is None:
        context = profile.envelope.max_kv
        if model_max:
            context = min(context, model_max)
    if context < 1:
        raise BadInput(f"context must be at least 1, got {context}")
    if input_len is not None and input_len < 1:
        raise BadInput(f"input length must be at least 1, got {input_len}")
    if input_len is not None and input_len > context:
        # The prefill is part of the context: clamping it would plan another request.
        raise UsageError(f"--input-len {input_len} exceeds the context of {context} tokens "
                         "(--context, default: the profile's max_kv capped at the model's "
                         "max_position_embeddings)")

    def prefill_len(ctx: int) -> int:
        cap = input_len if input_len is not None else profile.envelope.max_input_len
        return max(1, min(ctx, cap))

    t_in = prefill_len(context)
    if model_max and context > model_max:
        notes.append(f"context {context} exceeds the model's max_position_embeddings {model_max}")
    if batch > profile.envelope.max_batch or context > profile.envelope.max_kv:
        notes.append(
            f"beyond the profile's default envelope (max_batch {profile.envelope.max_batch}, "
            f"max_kv {profile.envelope.max_kv}); build with --set envelope.* to match"
        )

    kv_tok = kv_bytes_per_token(m.config, scheme.kv_bytes)
    weights = sum(group_bytes(w, scheme) for w in inventory)
    per_token_act = (2 * shape.hidden_size + max(shape.attn_width, 2 * shape.ffn_width)) \
        * ACT_BYTES

    def activations(b: int, t: int) -> float:
        b = min(b, max(1, profile.envelope.max_num_tokens // t))  # one prefill pass
        return b * t * per_token_act + b * shape.vocab_size * LOGITS_BYTES

    fixed = {
        "workspace": profile.builder.workspace_gb * GiB,
        "runtime": profile.memory.runtime_overhead_gb * GiB,
        "os_reserved": profile.memory.os_reserved_gb * GiB,
    }
    memory = {
        "weights": math.ceil(weights),
        "kv_cache": math.ceil(batch * context * kv_tok),
        "activations": math.ceil(activations(batch, t_in)),
        **{k: int(v) for k, v in fixed.items()},
    }
    capacity = profile.memory.capacity_bytes
    base = weights + sum(fixed.values())

    # Largest batch at this context: memory = base + b * kv(context) + act(min(b, prefill
    # batch)), affine in b once b reaches the prefill batch: closed form there, search below.
    def used_at(b: int) -> float:
        return base + b * context * kv_tok + activations(b, t_in)

    pb = max(1, profile.envelope.max_num_tokens // t_in)
    if used_at(1) > capacity:
        max_batch = 0
    elif used_at(pb) <= capacity:
        max_batch = pb + int((capacity - used_at(pb)) // (context * kv_tok))
    else:
        max_batch = max(b for b in range(1, pb + 1) if used_at(b) <= capacity)

    # Longest context at this batch (memory is non-decreasing in context).
    def used(ctx: int) -> float:
        return base + batch * ctx * kv_tok + activations(batch, prefill_len(ctx))

    if used(1) > capacity:
        max_context = 0
    else:
        lo, hi = 1, 1
        while used(hi) <= capacity and hi < 2**30:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if used(mid) <= capacity else (lo, mid)
        max_context = lo

    # Decode: bytes one step reads.
    read = batch * shape.hidden_size * HIGH_PRECISION_BYTES  # embedding rows
    for w in inventory:
        if w.moe_routed:
            frac = expected_active_experts(shape.n_routed_experts, shape.experts_per_token,
                                           batch) / shape.n_routed_experts
            read += group_bytes(w, scheme, w.count * frac)
        else:
            read += group_bytes(w, scheme, w.active)
    read += batch * context * kv_tok
    bw = profile.memory.bandwidth_gbps * 1e9
    decode_tps = batch * bw / read

    # Prefill: compute bound, floored by reading the weights the prompt touches.
    peak_key = scheme.compute
    peak = profile.throughput_tflops.peak(peak_key)
    if peak is None:  # e.g. a user profile without the figure: fall back to fp16
        peak_key, peak = "fp16", profile.throughput_tflops.fp16
        notes.append(f"no {scheme.compute} peak in the profile; prefill uses the fp16 peak")
    tokens = batch * t_in
    flops = 2.0 * params.active * tokens
    compute_s = flops / (peak * 1e12)
    touched = 0.0
    for w in inventory:
        if w.component == "embeddings" and w.active == 0:
            continue
        if w.moe_routed:
            frac = expected_active_experts(shape.n_routed_experts, shape.experts_per_token,
                                           tokens) / shape.n_routed_experts
            touched += group_bytes(w, scheme, w.count * frac)
        else:
            touched += group_bytes(w, scheme, w.count)
    memory_s = touched / bw
    prefill_s, bound = (compute_s, "compute") if compute_s >= memory_s else (memory_s, "memory")

    if profile.is_jetson:
        notes.append("Jetson: CPU and GPU share this memory; the OS reserve is an estimate "
                     "(hardware-facts §7-8)")
    return PlanResult(
        model=m.name,
        architecture=shape.architecture,
        profile=profile.name,
        precision=precision,
        batch=batch,
        context=context,
        input_len=t_in,
        params=params,
        memory=memory,
        capacity=capacity,
        kv_bytes_per_token=kv_tok,
        kv_dtype="fp8" if scheme.kv_bytes == 1 else "fp16",
        max_batch=max_batch,
        max_context=max_context,
        model_max_context=model_max,
        decode_bytes_per_step=read,
        decode_tokens_per_s=decode_tps,
        prefill_tokens=tokens,
        prefill_seconds=prefill_s,
        prefill_bound=bound,
        peak_tflops=peak,
        peak_precision=peak_key,
        bandwidth_gbps=profile.memory.bandwidth_gbps,
        weights_label=scheme.label + ("" if precision in ("fp16", "bf16")
                                      else "; embed, lm_head, router fp16"),
        notes=tuple(notes),
    )


@dataclass(frozen=True)
class Skipped:
    """A target `--profile all` could not plan for, and why."""

    profile: str
    reason: str


def plan_all(model: str | Path | Mapping[str, Any], precision: str, batch: int = 1,
             context: int | None = None, input_len: int | None = None,
             overrides: Mapping[str, Any] | Iterable[str] | None = None,
             profiles: Iterable[HardwareProfile] | None = None) -> list[PlanResult | Skipped]:
    """One plan per built-in profile (each at its own default context unless given)."""
    from dsc.hardware import load_profile

    if profiles is None:
        profiles = [load_profile(p.path or p.name, overrides) for p in list_profiles()] \
            if overrides else list_profiles()
    m = _load_model(model)
    out: list[PlanResult | Skipped] = []
    for prof in profiles:
        if not prof.supports(precision):
            out.append(Skipped(prof.name, f"{precision} not supported "
                                          f"(legal: {', '.join(prof.precisions)})"))
            continue
        out.append(plan(m, prof, precision, batch, context, input_len))
    return out


# --- text output --------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f}"


def _count(n: float) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M"


def format_plan(r: PlanResult) -> str:
    """The human-readable report of one plan."""
    p = r.params
    moe = f", {_count(p.active)} active per token" if p.by_component["experts"] else ""
    mtp = f" (+{_count(p.mtp)} MTP, not exported)" if p.mtp else ""
    lines = [
        f"{r.model} ({r.architecture}, {_count(p.total)} params{moe}{mtp}) on {r.profile}",
        (f"precision {r.precision}, batch {r.batch}, context {r.context:,} "
         f"(prefill {r.input_len:,} tokens)"),
        "",
        f"{'memory':<50}{'GiB':>10}",
    ]
    labels = {
        "weights": f"weights ({r.weights_label})",
        "kv_cache": f"KV cache ({r.kv_dtype}, {r.kv_bytes_per_token / 1024:,.1f} KiB/token)",
        "activations": f"activations (prefill {r.input_len:,} + logits)",
        "workspace": "TensorRT workspace",
        "runtime": "runtime overhead (CUDA context, TensorRT)",
        "os_reserved": "OS reserve (memory shared with the CPU)",
    }
    for key, value in r.memory.items():
        if key == "os_reserved" and value == 0:
            continue
        label = labels.get(key, key)
        lines.append(f"  {label:<48}{_gib(value):>10}")
    lines += [
        f"  {'total':<48}{_gib(r.total):>10}",
        f"  {'capacity':<48}{_gib(r.capacity):>10}",
        "",
    ]
    pct = 100.0 * r.margin / r.capacity
    verdict = "FITS" if r.fits else "DOES NOT FIT"
    word = "margin" if r.fits else "short by"
    lines.append(f"verdict: {verdict}, {word} {_gib(abs(r.margin))} GiB ({abs(pct):.1f}%)")
    lines.append(f"largest batch at context {r.context:,}: {r.max_batch:,}")
    limit = f" (model limit {r.model_max_context:,})" if r.model_max_context else ""
    lines.append(f"longest context at batch {r.batch}: {r.max_context:,} tokens by memory{limit}")
    per_seq = f" ({r.decode_tokens_per_s_per_sequence:,.1f} per sequence)" if r.batch > 1 else ""
    lines.append(
        f"decode ceiling: {r.decode_tokens_per_s:,.1f} tok/s{per_seq} "
        f"= {r.bandwidth_gbps:g} GB/s / {r.decode_bytes_per_step / 1e9:,.2f} GB per step"
    )
    lines.append(
        f"prefill estimate: {'' if r.batch == 1 else f'{r.batch} x '}{r.input_len:,} tokens "
        f"in {r.prefill_seconds:,.3g} s "
        f"({r.prefill_tokens_per_s:,.0f} tok/s, {r.prefill_bound}-bound at "
        f"{r.peak_tflops:g} {r.peak_precision} TFLOPS)"
    )
    for n in r.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def format_table(rows: list[PlanResult | Skipped]) -> str:
    """One line per profile (`dsc plan --profile all`). "max context" is the longest context
    that both fits at the batch and the model supports (`max_position_embeddings`)."""
    head = ["profile", "fits", "context", "total GiB", "capacity", "margin", "max batch",
            "max context", "decode tok/s", "prefill tok/s"]
    body: list[list[str]] = []
    for r in rows:
        if isinstance(r, Skipped):
            body.append([r.profile, "n/a", r.reason] + [""] * 7)
            continue
        ctx = min(r.max_context, r.model_max_context or r.max_context)
        body.append([
            r.profile, "yes" if r.fits else "no", f"{r.context:,}", _gib(r.total),
            _gib(r.capacity), _gib(r.margin), f"{r.max_batch:,}", f"{ctx:,}",
            f"{r.decode_tokens_per_s:,.1f}", f"{r.prefill_tokens_per_s:,.0f}",
        ])
    # The reason of a skipped row spans the numeric columns; keep it out of the widths.
    widths = [max(len(head[i]), *(len(b[i]) for b in body if not (b[1] == "n/a" and i == 2)))
              for i in range(len(head))]
    def line(cells: list[str]) -> str:
        if cells[1] == "n/a":
            return f"{cells[0]:<{widths[0]}}  {cells[1]:<{widths[1]}}  {cells[2]}"
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])
