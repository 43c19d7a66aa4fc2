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

Quantized lm_head / embedding (`lm_head=`, `embedding=`): the vocab x hidden table at int8/fp8
(1 byte + one fp16 scale per row) or int4 (0.5 byte + one fp16 scale per block of 128 along
hidden), the forms `dsc quantize --quantize-lm-head/--quantize-embedding` write. A tied table
(`tie_word_embeddings`) is one tensor and takes one precision.

Several GPUs (`gpus=N`, tensor parallel for attention and dense MLP, expert parallel for routed
experts, as TensorRT-LLM and vLLM shard DeepSeek models), per GPU:

- weights: attention projections and dense / shared-expert MLP / N (column- and row-parallel
  linears); MLA's down projections (q_a_proj, kv_a_proj_with_mqa) are replicated (vLLM's
  DeepseekV2 MLA builds them as ReplicatedLinear); routed experts ceil(E / N) of E per GPU;
  embedding and lm_head / N (vocab-parallel); norms, biases and the router replicated.
- KV cache: GQA/MHA shards KV heads, ceil(kv_heads / N) per GPU (a head is replicated once N
  exceeds the KV heads); MLA's compressed latent has no head axis and is replicated on every GPU.
- activations: batch x input_len x (2 x hidden + max(attn_width, 2 x ffn_width) / N) x 2 bytes
  (the residual stream is replicated, the widest projection sharded) + the gathered logits.
- communication (N > 1, an estimate, not measured): the all-reduce input and output of one layer,
  2 x T x hidden x 2 bytes, T = the tokens of one prefill pass; with routed experts the all-to-all
  dispatch and combine buffers, 2 x T x top_k x hidden x 2 bytes; plus 1 GiB for NCCL's own
  buffers (NCCL_BUFFSIZE is 4 MiB per channel and peer; the channel count depends on the topology).
- workspace, runtime overhead: per GPU, as for one GPU.

Verdict: fits when the per-GPU sum is at most `memory.gb`; margin = capacity - total. Largest
batch at the context: closed form once the batch fills a prefill pass (memory is affine in batch
from there), a search below it. Longest context at the batch: bisection (memory grows with
context), reported next to the model's `max_position_embeddings`.

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

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsc.errors import BadInput, Unsupported, UsageError
from dsc.hardware import GiB, HardwareProfile, list_profiles
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
from dsc.precision import QUANTIZED, check_on_profile, check_quantized

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
        per += (
            w.out_features
            * groups_per_row(w.in_features, scheme.group_size)
            * scheme.bytes_per_group
        )
    return per * n


@dataclass(frozen=True)
class PlanResult:
    """One model on one target: memory breakdown, verdict, limits and speed estimates.

    Units: `memory` (component → bytes), `capacity` bytes (per GPU), `kv_bytes_per_token`
    bytes per token of one sequence, `batch` / `max_batch` sequences, `context` /
    `input_len` / `max_context` / `prefill_tokens` tokens, `decode_bytes_per_step` bytes read
    per decode step, `decode_tokens_per_s` tokens/s over the batch (a roofline ceiling, not
    a measurement), `prefill_seconds` seconds, `peak_tflops` TFLOP/s, `bandwidth_gbps` GB/s.
    `to_json()` (= `to_dict()`) is the `dsc plan --json` document.
    """

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
    gpus: int = 1
    lm_head: str | None = None  # precision of a quantized lm_head (None: fp16)
    embedding: str | None = None  # precision of a quantized embedding table (None: fp16)

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

    def to_json(self) -> dict[str, Any]:
        """The `dsc plan --json` document (see `to_dict`)."""
        return self.to_dict()

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
            "gpus": self.gpus,
            "lm_head": self.lm_head or "fp16",
            "embedding": self.embedding or "fp16",
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class PlanModel:
    """A model to plan for: its name (for messages) and its `config.json` as a mapping."""

    name: str
    config: Mapping[str, Any]


def _load_model(model: str | Path | Mapping[str, Any] | PlanModel) -> PlanModel:
    if isinstance(model, PlanModel):
        return model
    if isinstance(model, Mapping):
        return PlanModel(str(model.get("_name_or_path", "model")), model)
    config, path = load_config(model)
    name = path.parent.name if path.name == "config.json" else path.stem
    return PlanModel(name or str(path), config)


NCCL_BYTES = 1 * GiB
_REPLICATED_ATTENTION = ("q_a_proj", "kv_a_proj_with_mqa")


def _table_scheme(
    profile: HardwareProfile, which: str, precision: str | None
) -> QuantScheme | None:
    if precision is None:
        return None
    check_quantized(precision, f"{which} precision")
    if not profile.supports(precision):
        legal = [p for p in profile.precisions if p in QUANTIZED]
        raise Unsupported(
            f"{which} at {precision} is not supported on {profile.name} "
            f"(SM{profile.sm}); legal: {', '.join(legal) or 'none'}"
        )
    return SCHEMES[precision]


def _shard(w: WeightGroup, gpus: int, n_experts: int) -> float:
    """Fraction of a weight group one of `gpus` GPUs holds (module docstring, "Several GPUs")."""
    if gpus == 1:
        return 1.0
    if w.moe_routed:
        return math.ceil(n_experts / gpus) / n_experts
    if w.component in ("embeddings", "lm_head"):
        return 1.0 / gpus
    if w.component in ("attention", "mlp", "shared_experts") and w.quantizable:
        return 1.0 if w.name.endswith(_REPLICATED_ATTENTION) else 1.0 / gpus
    return 1.0  # norms, biases, router


def plan(
    model: str | Path | Mapping[str, Any] | PlanModel,
    profile: HardwareProfile,
    precision: str,
    batch: int = 1,
    context: int | None = None,
    input_len: int | None = None,
    *,
    lm_head: str | None = None,
    embedding: str | None = None,
    gpus: int = 1,
) -> PlanResult:
    """Plan one model on one target. `context` defaults to the envelope's max_kv (capped at the
    model's max_position_embeddings), `input_len` to min(context, envelope max_input_len).

    `model`: a checkpoint directory, a config.json path, a config mapping or a `PlanModel`;
    `profile`: a loaded `HardwareProfile`; `precision`: fp32, fp16, bf16, fp8, int8 or int4;
    `batch`: sequences; `context` / `input_len`: tokens. Returns a `PlanResult` (units there);
    a plan that does not fit is returned with `fits` false, not raised.

    `lm_head` / `embedding`: int8, fp8 or int4 for a quantized output head / embedding table
    (None: fp16). `gpus`: tensor/expert parallel over that many GPUs of the profile; memory is
    per GPU. Raises BadInput (unknown values, gpus < 1) and Unsupported (a precision the profile
    cannot run, a tied table given two precisions, several GPUs on a Jetson module).
    """
    check_on_profile(profile, precision)
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise BadInput(f"--gpus must be a positive integer, got {gpus!r}")
    if gpus > 1 and profile.is_jetson:
        raise Unsupported(
            f"{profile.name} is one Jetson module with one GPU; --gpus {gpus} "
            f"needs a datacenter or workstation profile"
        )
    head_scheme = _table_scheme(profile, "lm_head", lm_head)
    embed_scheme = _table_scheme(profile, "embedding", embedding)
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
        raise UsageError(
            f"--input-len {input_len} exceeds the context of {context} tokens "
            "(--context, default: the profile's max_kv capped at the model's "
            "max_position_embeddings)"
        )

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

    tied = bool(m.config.get("tie_word_embeddings", False))
    if tied and lm_head and embedding and lm_head != embedding:
        raise Unsupported(
            f"{m.name} ties lm_head to the embedding table (tie_word_embeddings): "
            f"one tensor takes one precision, got lm_head {lm_head} and embedding "
            f"{embedding}"
        )
    if tied:
        embed_scheme = embed_scheme or head_scheme

    def stored(w: WeightGroup, instances: float | None = None) -> float:
        table = {"embeddings": embed_scheme, "lm_head": head_scheme}.get(w.component)
        if table is not None:
            w = WeightGroup(
                w.name, w.component, w.out_features, w.in_features, w.count, w.active, True
            )
            return group_bytes(w, table, instances)
        return group_bytes(w, scheme, instances)

    kv_tok = kv_bytes_per_token(m.config, scheme.kv_bytes)
    weights = sum(stored(w) * _shard(w, gpus, shape.n_routed_experts) for w in inventory)
    if gpus > 1:
        if shape.attention == "mla":
            notes.append(f"MLA's compressed KV latent is replicated on each of the {gpus} GPUs")
        else:
            heads = int(m.config.get("num_key_value_heads") or m.config["num_attention_heads"])
            kv_tok = kv_tok * math.ceil(heads / gpus) / heads
            if gpus > heads:
                notes.append(f"{gpus} GPUs > {heads} KV heads: each GPU holds one replicated head")
    per_token_act = (
        2 * shape.hidden_size + max(shape.attn_width, 2 * shape.ffn_width) / gpus
    ) * ACT_BYTES

    def activations(b: int, t: int) -> float:
        b = min(b, max(1, profile.envelope.max_num_tokens // t))  # one prefill pass
        return b * t * per_token_act + b * shape.vocab_size * LOGITS_BYTES

    fixed = {
        "workspace": profile.builder.workspace_gb * GiB,
        "runtime": profile.memory.runtime_overhead_gb * GiB,
        "os_reserved": profile.memory.os_reserved_gb * GiB,
    }
    if gpus > 1:
        pass_tokens = min(batch, max(1, profile.envelope.max_num_tokens // t_in)) * t_in
        comm = 2 * pass_tokens * shape.hidden_size * ACT_BYTES + NCCL_BYTES
        if shape.n_routed_experts:
            comm += 2 * pass_tokens * shape.experts_per_token * shape.hidden_size * ACT_BYTES
        fixed["communication"] = comm
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

    # Decode: bytes one step reads on one GPU (each reads its shard, in parallel).
    # the embedding rows the batch looks up, stored as the table is
    read = stored(
        WeightGroup("embed_tokens.rows", "embeddings", batch, shape.hidden_size, 1, 1, False)
    )
    for w in inventory:
        share = _shard(w, gpus, shape.n_routed_experts)
        if w.moe_routed:
            frac = (
                expected_active_experts(shape.n_routed_experts, shape.experts_per_token, batch)
                / shape.n_routed_experts
            )
            read += stored(w, w.count * frac) * share
        else:
            read += stored(w, w.active) * share
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
    flops = 2.0 * params.active * tokens / gpus
    compute_s = flops / (peak * 1e12)
    touched = 0.0
    for w in inventory:
        if w.component == "embeddings" and w.active == 0:
            continue
        share = _shard(w, gpus, shape.n_routed_experts)
        if w.moe_routed:
            frac = (
                expected_active_experts(shape.n_routed_experts, shape.experts_per_token, tokens)
                / shape.n_routed_experts
            )
            touched += stored(w, w.count * frac) * share
        else:
            touched += stored(w, w.count) * share
    memory_s = touched / bw
    prefill_s, bound = (compute_s, "compute") if compute_s >= memory_s else (memory_s, "memory")

    if profile.is_jetson:
        notes.append(
            "Jetson: CPU and GPU share this memory; the OS reserve is an estimate "
            "(hardware-facts §7-8)"
        )
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
        weights_label=_weights_label(scheme, precision, embed_scheme, head_scheme, tied),
        notes=tuple(notes),
        gpus=gpus,
        lm_head=lm_head or (embedding if tied else None),
        embedding=embedding or (lm_head if tied else None),
    )


def _weights_label(
    scheme: QuantScheme,
    precision: str,
    embed: QuantScheme | None,
    head: QuantScheme | None,
    tied: bool,
) -> str:
    """E.g. "int4 g128; embed, lm_head int8; router fp16" (what each part is stored in)."""
    if precision in ("fp16", "bf16") and not (embed or head):
        return scheme.label
    by: dict[str, list[str]] = {}
    for name, table in (("embed", embed), *(() if tied else (("lm_head", head),))):
        by.setdefault(table.label.split()[0] if table else "fp16", []).append(name)
    if precision not in ("fp16", "bf16"):
        by.setdefault("fp16", []).append("router")
    parts = [scheme.label]
    for prec, names_ in by.items():
        parts.append(f"{', '.join(names_)} {prec}")
    return "; ".join(parts)


# --- what would make it fit -----------------------------------------------------------------

GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)  # tensor-parallel sizes (powers of two split heads)
_LOWER = ("fp16", "bf16", "int8", "fp8", "int4")  # from most to least bytes per weight


@dataclass(frozen=True)
class Remedy:
    """One change that would make a plan fit (or get closest), and what it frees per GPU."""

    kind: str  # context | batch | quantize_tables | precision | gpus | profile | combined
    change: str  # in words, e.g. "context <= 2,730 tokens"
    flags: str  # the dsc plan / dsc build flags that make the change
    frees_bytes: int  # total of the original plan minus total of the changed one (per GPU)
    fits: bool
    result: PlanResult

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "change": self.change,
            "flags": self.flags,
            "frees_bytes": self.frees_bytes,
            "fits": self.fits,
            "total_bytes": self.result.total,
            "capacity_bytes": self.result.capacity,
        }


def smallest_gpu_count(
    model: str | Path | Mapping[str, Any] | PlanModel,
    profile: HardwareProfile,
    precision: str,
    batch: int = 1,
    context: int | None = None,
    input_len: int | None = None,
    *,
    lm_head: str | None = None,
    embedding: str | None = None,
) -> PlanResult | None:
    """The plan at the smallest count in GPU_COUNTS that fits, or None (a Jetson: only 1)."""
    counts = (1,) if profile.is_jetson else GPU_COUNTS
    for n in counts:
        r = plan(
            model,
            profile,
            precision,
            batch,
            context,
            input_len,
            lm_head=lm_head,
            embedding=embedding,
            gpus=n,
        )
        if r.fits:
            return r
    return None


def family(profile: HardwareProfile) -> list[HardwareProfile]:
    """Built-in profiles of the same kind and SM with at least as much memory (H100 -> H200),
    smallest memory first; `profile` itself first."""
    same = [
        p
        for p in list_profiles()
        if p.name != profile.name
        and p.kind == profile.kind
        and p.sm == profile.sm
        and p.memory.capacity_bytes >= profile.memory.capacity_bytes
    ]
    return [profile, *sorted(same, key=lambda p: (p.memory.capacity_bytes, p.name))]


def remedies(
    model: str | Path | Mapping[str, Any] | PlanModel,
    profile: HardwareProfile,
    precision: str,
    batch: int = 1,
    context: int | None = None,
    input_len: int | None = None,
    *,
    lm_head: str | None = None,
    embedding: str | None = None,
    gpus: int = 1,
) -> list[Remedy]:
    """The smallest change of each kind that makes the plan fit, best first.

    Kinds: a shorter context (the longest that fits at this batch), a smaller batch, quantized
    lm_head and/or embedding (int8/fp8 before int4, one table before both), a lower precision
    (the highest that fits), more GPUs (the smallest count in GPU_COUNTS), a larger-memory
    profile of the same family, and, when no single change fits, quantized tables plus the
    context that then fits. Empty when the plan already fits. When some change fits, only the
    fitting ones are returned: quantized tables, precision, batch, context, combined, GPUs,
    profile (the model and request as asked before a smaller request before more hardware);
    otherwise every candidate, the one that frees most first.
    """
    m = _load_model(model)
    base = plan(
        m,
        profile,
        precision,
        batch,
        context,
        input_len,
        lm_head=lm_head,
        embedding=embedding,
        gpus=gpus,
    )
    if base.fits:
        return []
    kw = {"lm_head": lm_head, "embedding": embedding, "gpus": gpus}
    out: list[Remedy] = []

    def add(kind: str, change: str, flags: str, r: PlanResult) -> None:
        out.append(Remedy(kind, change, flags, base.total - r.total, r.fits, r))

    legal_tables = [p for p in ("int8", "fp8", "int4") if profile.supports(p)]
    tied = bool(m.config.get("tie_word_embeddings", False))
    # Quantized tables: one table before both, the gentler precision first.
    table_options = []
    for p in legal_tables:
        if lm_head is None and not tied:
            table_options.append(({"lm_head": p}, f"--quantize-lm-head {p}", f"lm_head {p}"))
        if embedding is None:
            table_options.append(
                (
                    {"embedding": p},
                    f"--quantize-embedding {p}",
                    f"embedding {p}" + (" (tied: lm_head too)" if tied else ""),
                )
            )
        if lm_head is None and embedding is None and not tied:
            table_options.append(
                (
                    {"lm_head": p, "embedding": p},
                    f"--quantize-lm-head {p} --quantize-embedding {p}",
                    f"lm_head and embedding {p}",
                )
            )
    tables = None
    for opt, flags, words in table_options:
        r = plan(m, profile, precision, batch, context, input_len, **{**kw, **opt})
        if tables is None or r.total < tables[2].total:
            tables = (opt, flags, r, words)
        if r.fits:
            add("quantize_tables", f"quantize {words}", flags, r)
            break
    else:
        if tables is not None:
            opt, flags, r, words = tables
            add("quantize_tables", f"quantize {words}", flags, r)
    if base.max_context >= 1 and base.max_context < base.context:
        r = plan(
            m, profile, precision, batch, base.max_context, _cap(input_len, base.max_context), **kw
        )
        add(
            "context", f"context <= {base.max_context:,} tokens", f"--context {base.max_context}", r
        )
    if batch > 1 and base.max_batch >= 1:
        r = plan(m, profile, precision, base.max_batch, context, input_len, **kw)
        add("batch", f"batch <= {base.max_batch:,}", f"--batch {base.max_batch}", r)
    # The highest lower precision that fits, else the lowest one tried.
    lower = _LOWER[_LOWER.index(precision) + 1 :] if precision in _LOWER else ()
    tried = None
    for p in lower:
        if not profile.supports(p) or (p == "bf16" and precision == "fp16"):
            continue
        tried = (p, plan(m, profile, p, batch, context, input_len, **kw))
        if tried[1].fits:
            break
    if tried is not None:
        add("precision", f"precision {tried[0]}", f"--precision {tried[0]}", tried[1])
    single_fit = False
    for other in family(profile):
        if not other.supports(precision):
            continue
        if other is not profile and not single_fit:
            r = plan(m, other, precision, batch, context, input_len, **kw)
            if r.fits:
                single_fit = True
                add(
                    "profile",
                    f"one {other.name} ({other.memory.gb:g} GB)",
                    f"--profile {other.name}",
                    r,
                )
                continue
        if other.is_jetson:
            continue
        r = smallest_gpu_count(
            m, other, precision, batch, context, input_len, lm_head=lm_head, embedding=embedding
        )
        if r is not None and r.gpus > 1 and (other is not profile or r.gpus > gpus):
            nodes = f", {math.ceil(r.gpus / 8)} nodes of 8" if r.gpus > 8 else ""
            add(
                "gpus",
                f"{r.gpus} x {other.name}{nodes}",
                f"--gpus {r.gpus}" + ("" if other is profile else f" --profile {other.name}"),
                r,
            )
    if not any(x.fits for x in out) and tables is not None:
        opt, flags, rt, words = tables
        if rt.max_context >= 1:
            r = plan(
                m,
                profile,
                precision,
                batch,
                rt.max_context,
                _cap(input_len, rt.max_context),
                **{**kw, **opt},
            )
            add(
                "combined",
                f"quantize {words} and context <= {rt.max_context:,} tokens",
                f"{flags} --context {rt.max_context}",
                r,
            )
    fitting = [x for x in out if x.fits]
    # The model and request as asked first (quantized tables, then precision), then a smaller
    # request, then more or larger hardware.
    rank = {
        "quantize_tables": 0,
        "precision": 1,
        "batch": 2,
        "context": 3,
        "combined": 4,
        "gpus": 5,
        "profile": 6,
    }
    if fitting:
        return sorted(fitting, key=lambda x: rank[x.kind])
    return sorted(out, key=lambda x: -x.frees_bytes)


def _cap(input_len: int | None, context: int) -> int | None:
    """A prefill length that fits a shorter context (the prompt is part of the context)."""
    return None if input_len is None else min(input_len, context)


def format_remedies(rems: list[Remedy]) -> list[str]:
    """Lines for `dsc plan` after a DOES NOT FIT verdict."""
    if not rems:
        return []
    fits = any(r.fits for r in rems)
    lines = ["to fit, any one of:" if fits else "no single change fits; closest:"]
    for r in rems:
        mark = "fits" if r.fits else f"short by {_gib(-r.result.margin)} GiB"
        if r.kind in ("profile", "gpus"):
            what = f"{_gib(r.result.total)} of {_gib(r.result.capacity)} GiB" + (
                " per GPU" if r.kind == "gpus" else ""
            )
        else:
            what = f"frees {_gib(r.frees_bytes)} GiB"
        lines.append(f"  {r.change:<44} {what:<24} ({mark})  {r.flags}")
    return lines


@dataclass(frozen=True)
class Skipped:
    """A target `--profile all` could not plan for, and why."""

    profile: str
    reason: str
    fits = False  # a class attribute, not a field: a skipped target fits nothing

    def to_dict(self) -> dict:
        return {"profile": self.profile, "skipped": self.reason}


def plan_all(
    model: str | Path | Mapping[str, Any],
    precision: str,
    batch: int = 1,
    context: int | None = None,
    input_len: int | None = None,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    profiles: Iterable[HardwareProfile] | None = None,
) -> list[PlanResult | Skipped]:
    """One plan per built-in profile (each at its own default context unless given)."""
    from dsc.hardware import load_profile

    if profiles is None:
        profiles = (
            [load_profile(p.path or p.name, overrides) for p in list_profiles()]
            if overrides
            else list_profiles()
        )
    m = _load_model(model)
    out: list[PlanResult | Skipped] = []
    for prof in profiles:
        if not prof.supports(precision):
            out.append(
                Skipped(
                    prof.name, f"{precision} not supported (legal: {', '.join(prof.precisions)})"
                )
            )
            continue
        out.append(plan(m, prof, precision, batch, context, input_len))
    return out


# --- text output --------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f}"


def _count(n: float) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M"


def format_plan(r: PlanResult, rems: list[Remedy] | None = None) -> str:
    """The human-readable report of one plan, with `remedies` when it does not fit."""
    p = r.params
    moe = f", {_count(p.active)} active per token" if p.by_component["experts"] else ""
    mtp = f" (+{_count(p.mtp)} MTP, not exported)" if p.mtp else ""
    lines = [
        f"{r.model} ({r.architecture}, {_count(p.total)} params{moe}{mtp}) on "
        + (
            f"{r.gpus} x {r.profile} (tensor/expert parallel; memory per GPU)"
            if r.gpus > 1
            else r.profile
        ),
        (
            f"precision {r.precision}, batch {r.batch}, context {r.context:,} "
            f"(prefill {r.input_len:,} tokens)"
        ),
        "",
        f"{'memory':<58}{'GiB':>10}",
    ]
    labels = {
        "weights": f"weights ({r.weights_label})",
        "kv_cache": f"KV cache ({r.kv_dtype}, {r.kv_bytes_per_token / 1024:,.1f} KiB/token)",
        "activations": f"activations (prefill {r.input_len:,} + logits)",
        "workspace": "TensorRT workspace",
        "runtime": "runtime overhead (CUDA context, TensorRT)",
        "os_reserved": "OS reserve (memory shared with the CPU)",
        "communication": "communication buffers (all-reduce, all-to-all, NCCL)",
    }
    for key, value in r.memory.items():
        if key == "os_reserved" and value == 0:
            continue
        label = labels.get(key, key)
        lines.append(f"  {label:<56}{_gib(value):>10}")
    lines += [
        f"  {'total':<56}{_gib(r.total):>10}",
        f"  {'capacity':<56}{_gib(r.capacity):>10}",
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
    lines += format_remedies(rems or [])
    return "\n".join(lines)


def format_table(rows: list[PlanResult | Skipped]) -> str:
    """One line per profile (`dsc plan --profile all`). "max context" is the longest context
    that both fits at the batch and the model supports (`max_position_embeddings`)."""
    head = [
        "profile",
        "fits",
        "context",
        "total GiB",
        "capacity",
        "margin",
        "max batch",
        "max context",
        "decode tok/s",
        "prefill tok/s",
    ]
    body: list[list[str]] = []
    for r in rows:
        if isinstance(r, Skipped):
            body.append([r.profile, "n/a", r.reason] + [""] * 7)
            continue
        ctx = min(r.max_context, r.model_max_context or r.max_context)
        body.append(
            [
                r.profile,
                "yes" if r.fits else "no",
                f"{r.context:,}",
                _gib(r.total),
                _gib(r.capacity),
                _gib(r.margin),
                f"{r.max_batch:,}",
                f"{ctx:,}",
                f"{r.decode_tokens_per_s:,.1f}",
                f"{r.prefill_tokens_per_s:,.0f}",
            ]
        )
    # The reason of a skipped row spans the numeric columns; keep it out of the widths.
    widths = [
        max(len(head[i]), *(len(b[i]) for b in body if not (b[1] == "n/a" and i == 2)))
        for i in range(len(head))
    ]

    def line(cells: list[str]) -> str:
        if cells[1] == "n/a":
            return f"{cells[0]:<{widths[0]}}  {cells[1]:<{widths[1]}}  {cells[2]}"
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])
