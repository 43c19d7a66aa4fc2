"""Hardware profiles → build targets, decided before any export or compile work.

For each `--profile` a `Target` says:

- the shape envelope of the engine's two optimization profiles: the profile's envelope, capped
  at the model's `max_position_embeddings`, then `--max-batch/--max-input-len/--max-kv`;
- the builder options from the profile (workspace pool limit, optimization level, hardware and
  version compatibility, DLA core with GPU fallback);
- where the engine is built (`mode`):
    `rtx`       here, ahead of time, with TensorRT-RTX for the profile's `rtx_target_sm`
                (T4 SM75, A100 SM80, A6000 SM86, RTX 4090/L4/L40S SM89);
    `device`    here with standard TensorRT, because this machine is the target (the package is
                importable; on a Jetson it comes with JetPack);
    `preflight` not here: a TensorRT-RTX compile for `preflight_sm` checks the graph, and the
                engine is built on the device (H100/H200 are SM90, every Orin is SM87, and any
                profile that asks for a standard-TensorRT-only option);
- the planner's verdict at the full envelope, which must fit (`DoesNotFit`, exit 6, otherwise).

Refusals here are the cheap ones: an unknown profile (exit 3, with the closest names), a
precision the target cannot run (exit 4, naming the legal ones), options the backend cannot
honour (exit 4), a model that does not fit (exit 6).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dsc.backends.tensorrt import BuildOptions, Flavour, ShapeEnvelope, available_backends
from dsc.errors import BadInput, DoesNotFit, Unsupported
from dsc.hardware import GiB, HardwareProfile, load_profile

BACKENDS = ("auto", "tensorrt_rtx", "tensorrt")
MODES = ("rtx", "device", "preflight")


@dataclass(frozen=True)
class Target:
    profile: HardwareProfile
    envelope: ShapeEnvelope
    mode: str  # rtx | device | preflight
    options: BuildOptions  # for the engine (rtx/device) or the device command (preflight)
    preflight_options: BuildOptions | None  # the TensorRT-RTX stand-in compile (preflight)
    plan: dict
    notes: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def builds_engine_here(self) -> bool:
        return self.mode in ("rtx", "device")


def split_profiles(values: Iterable[str] | str | None) -> list[str]:
    """`["a100,rtx-4090", "h100"]` -> `["a100", "rtx-4090", "h100"]`."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out = []
    for v in values:
        out += [p.strip() for p in str(v).split(",") if p.strip()]
    return out


def local_gpu_sm() -> int | None:
    """The SM of this machine's first CUDA GPU, if torch can see one; None otherwise."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
        return major * 10 + minor
    except Exception:  # no CUDA build, no driver: nothing to compare with
        return None


def _envelope(
    profile: HardwareProfile,
    model_max: int | None,
    max_batch: int | None,
    max_input_len: int | None,
    max_kv: int | None,
    max_num_tokens: int | None = None,
) -> ShapeEnvelope:
    if max_kv is not None and model_max and max_kv > model_max:
        raise Unsupported(
            f"--max-kv {max_kv} exceeds the model's max_position_embeddings {model_max}"
        )
    kv = max_kv if max_kv is not None else profile.envelope.max_kv
    if max_kv is None and model_max:
        kv = min(kv, model_max)
    inp = max_input_len if max_input_len is not None else min(profile.envelope.max_input_len, kv)
    batch = max_batch if max_batch is not None else profile.envelope.max_batch
    tokens = max_num_tokens if max_num_tokens is not None else profile.envelope.max_num_tokens
    return ShapeEnvelope(max_batch=batch, max_input_len=inp, max_kv=kv, max_num_tokens=tokens)


def _mode(
    profile: HardwareProfile, backend: str, standard_only: list[str], standard_available: bool
) -> tuple[str, list[str]]:
    notes: list[str] = []
    rtx_sm = profile.rtx_target_sm
    if backend == "tensorrt_rtx":
        if rtx_sm is None:
            raise Unsupported(
                f"TensorRT-RTX cannot compile for {profile.name} (SM{profile.sm}); "
                f"use --backend auto to preflight it here and build its engine on "
                f"the device"
            )
        if standard_only:
            raise Unsupported(
                f"{profile.name}: {', '.join(standard_only)} "
                f"{'is a' if len(standard_only) == 1 else 'are'} standard TensorRT "
                f"option(s) that TensorRT-RTX cannot build; use --backend tensorrt"
            )
        return "rtx", notes
    if backend == "auto" and rtx_sm is not None and not standard_only:
        return "rtx", notes
    if rtx_sm is None:
        notes.append(
            f"TensorRT-RTX cannot compile for SM{profile.sm}; the engine is built on the "
            f"device with standard TensorRT"
        )
    elif standard_only:
        notes.append(
            f"{', '.join(standard_only)}: standard TensorRT only, so the engine is "
            f"built on the device"
        )
    else:
        notes.append("--backend tensorrt: a standard TensorRT engine, built on the device")
    return ("device" if standard_available else "preflight"), notes


def _fit(
    model_config: Mapping[str, Any],
    model_name: str,
    profile: HardwareProfile,
    dtype: str,
    env: ShapeEnvelope,
    quantize: str | None = None,
    weight_precisions: Mapping[str, str] | None = None,
) -> dict:
    from dsc.plan import PlanModel, plan

    precision = quantize or (dtype if dtype in ("fp16", "bf16") else "fp16")
    tables = {
        "lm_head": (weight_precisions or {}).get("lm-head"),
        "embedding": (weight_precisions or {}).get("embedding"),
    }
    r = plan(
        PlanModel(model_name, model_config),
        profile,
        precision,
        batch=env.max_batch,
        context=env.max_kv,
        input_len=env.max_input_len,
        **tables,
    )
    memory = dict(r.memory)
    note = None
    if dtype == "fp32":
        # The planner has no fp32 scheme: fp32 weights are twice the fp16 ones.
        memory["weights"] *= 2
        note = "fp32: weights counted at 4 bytes (the fp16 plan's weights doubled)"
    total = sum(memory.values())
    # Decode ceiling at the envelope (batch max_batch, context max_kv): bandwidth over the bytes
    # one step reads. fp32 reads every weight twice over the fp16 plan's bytes.
    step = r.decode_bytes_per_step
    if dtype == "fp32":
        step += step - r.batch * r.context * r.kv_bytes_per_token
    decode_tps = r.batch * r.bandwidth_gbps * 1e9 / step
    out = {
        "fits": total <= r.capacity,
        "precision": quantize or dtype,
        "batch": env.max_batch,
        "context": env.max_kv,
        "input_len": env.max_input_len,
        "total_bytes": int(total),
        "capacity_bytes": int(r.capacity),
        "margin_bytes": int(r.capacity - total),
        "memory_bytes": {k: int(v) for k, v in memory.items()},
        "max_batch_at_context": r.max_batch,
        "max_context_at_batch": r.max_context,
        "decode": {
            "tokens_per_s": decode_tps,
            "tokens_per_s_per_sequence": decode_tps / r.batch,
            "bytes_per_step": step,
            "bandwidth_gbps": r.bandwidth_gbps,
        },
    }
    if note:
        out["note"] = note
    if not out["fits"]:
        raise DoesNotFit(
            f"{model_name} does not fit {profile.name} at the engine's envelope "
            f"({quantize or dtype}, batch {env.max_batch}, context {env.max_kv:,}): needs "
            f"{total / GiB:,.2f} GiB of {r.capacity / GiB:,.2f} GiB; "
            f"{_best_remedy(model_config, model_name, profile, precision, env, r, tables)}"
            f" (`dsc plan` shows the breakdown)"
        )
    return out


def _best_remedy(
    model_config: Mapping[str, Any],
    model_name: str,
    profile: HardwareProfile,
    precision: str,
    env: ShapeEnvelope,
    r0: Any,
    tables: Mapping[str, str | None],
) -> str:
    """The plan's first remedy in `dsc build` words (dsc.plan.remedies)."""
    from dsc.plan import PlanModel, remedies

    rems = [
        r
        for r in remedies(
            PlanModel(model_name, model_config),
            profile,
            precision,
            batch=env.max_batch,
            context=env.max_kv,
            input_len=env.max_input_len,
            **tables,
        )
        if r.fits
    ]
    build_flags = {
        "context": lambda r: f"--max-kv {r.result.context}",
        "batch": lambda r: f"--max-batch {r.result.batch}",
        "precision": lambda r: f"--{r.result.precision.replace('int4', 'int4-awq')}",
        "quantize_tables": lambda r: r.flags,
        "profile": lambda r: r.flags,
    }
    for r in rems:
        if r.kind in build_flags:
            return f"best remedy: {r.change} ({build_flags[r.kind](r)})"
        if r.kind == "gpus":
            return f"it needs {r.change} (tensor/expert parallel), and dsc builds one-GPU engines"
    return (
        f"no single change fits: at context {env.max_kv:,} the largest batch is "
        f"{r0.max_batch:,}, at batch {env.max_batch} the longest context is "
        f"{r0.max_context:,} (lower --max-batch/--max-kv, quantize, or pick a larger "
        f"profile)"
    )


def resolve_targets(
    profiles: Sequence[str],
    *,
    model_config: Mapping[str, Any],
    model_name: str,
    dtype: str,
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
    max_batch: int | None = None,
    max_input_len: int | None = None,
    max_kv: int | None = None,
    max_num_tokens: int | None = None,
    backend: str = "auto",
    dla_core: int | None = None,
    dla_required: bool = True,
    quantize: str | None = None,
    weight_precisions: Mapping[str, str] | None = None,
) -> list[Target]:
    """Every target of the matrix, checked; raises before any heavy work.

    With `dla_required` (an explicit --dla-core), a matrix without any DLA is an error; without
    it (a DLA core recorded by an earlier build) such profiles just build for the GPU.
    `quantize` (int8 | fp8 | int4) must be legal on every profile and for the SM each engine
    (or preflight) is compiled for; the memory fit is planned at that precision.
    `weight_precisions` ({"lm-head": "int4", "embedding": "fp8"}, from `--quantize-lm-head` /
    `--quantize-embedding`) must be legal the same way; a refusal names the option.
    """
    from dsc.models.params import model_shape
    from dsc.precision import check_on_profile

    names = split_profiles(profiles)
    if not names:
        raise BadInput(
            "no hardware profile given (--profile NAME[,NAME...]; `dsc profiles list` shows them)"
        )
    if backend not in BACKENDS:
        raise BadInput(f"unknown backend {backend!r} (choose {', '.join(BACKENDS)})")
    if dtype not in ("fp32", "fp16", "bf16"):
        raise Unsupported(f"unsupported dtype {dtype!r}; choose fp32, fp16 or bf16")
    loaded: list[HardwareProfile] = []
    seen: dict[str, str] = {}
    for name in names:
        prof = load_profile(name, overrides)
        if prof.name in seen:
            raise BadInput(
                f"profiles {seen[prof.name]!r} and {name!r} are the same target ({prof.name})"
            )
        seen[prof.name] = name
        loaded.append(prof)
    if dla_core is not None:
        if dla_core < 0:
            raise BadInput(f"--dla-core must be 0 or more, got {dla_core}")
        if dla_required and not any(p.dla_cores for p in loaded):
            raise Unsupported(
                f"--dla-core {dla_core}: none of {', '.join(seen)} has a DLA "
                f"(only Jetson AGX Orin and Orin NX do)"
            )
    model_max = model_shape(model_config, model_name).max_position_embeddings
    standard_available = Flavour.TENSORRT in available_backends()
    targets = []
    for prof in loaded:
        if dtype == "fp32":
            check_on_profile(prof, "fp16")
        else:
            check_on_profile(prof, dtype)
        if quantize is not None:
            from dsc.precision import check_quantized_target

            check_quantized_target(quantize, prof)
            for flag, p in (weight_precisions or {}).items():
                try:
                    check_quantized_target(p, prof)
                except Unsupported as e:
                    raise Unsupported(f"--quantize-{flag} {p}: {e}") from None
        env = _envelope(prof, model_max, max_batch, max_input_len, max_kv, max_num_tokens)
        b = prof.builder
        standard_only = []
        if b.hardware_compatibility != "none":
            standard_only.append(f"hardware compatibility {b.hardware_compatibility}")
        if b.version_compatible:
            standard_only.append("version-compatible engines")
        dla = None
        notes: list[str] = []
        if dla_core is not None:
            if prof.dla_cores:
                if dla_core >= prof.dla_cores:
                    raise Unsupported(
                        f"--dla-core {dla_core}: {prof.name} has {prof.dla_cores} DLA core(s)"
                    )
                dla = dla_core
                standard_only.append(f"DLA core {dla_core}")
            else:
                notes.append(f"no DLA on {prof.name}: --dla-core ignored, built for the GPU")
        mode, mode_notes = _mode(prof, backend, standard_only, standard_available)
        notes += mode_notes
        if dtype == "fp32" and mode == "rtx" and prof.rtx_target_sm == 75:
            raise Unsupported(
                f"precision fp32 cannot be compiled for {prof.name} (SM75): "
                f"TensorRT-RTX has no FP32 GEMM for Turing; legal: "
                f"{', '.join(prof.precisions)} (use --dtype fp16)"
            )
        if mode == "device":
            local = local_gpu_sm()
            if local is not None and local != prof.sm:
                raise Unsupported(
                    f"this machine's GPU is SM{local} but {prof.name} is "
                    f"SM{prof.sm}: build its engine on the target device"
                )
            if local is None:
                notes.append(
                    "the local GPU's SM could not be read; standard TensorRT builds "
                    "for whatever GPU this is"
                )
        workspace = max(1, int(round(b.workspace_gb * 1024)))
        if mode == "rtx":
            opts = BuildOptions(
                target_sm=prof.rtx_target_sm,
                workspace_mib=workspace,
                optimization_level=b.optimization_level,
            )
            pre = None
        else:
            opts = BuildOptions(
                target_sm=prof.sm,
                workspace_mib=workspace,
                optimization_level=b.optimization_level,
                hardware_compatibility=b.hardware_compatibility,
                version_compatible=b.version_compatible,
                dla_core=dla,
                gpu_fallback=True,
            )
            pre = None
            if mode == "preflight":
                pre = BuildOptions(
                    target_sm=prof.preflight_sm,
                    workspace_mib=workspace,
                    optimization_level=b.optimization_level,
                )
        if quantize is not None:
            from dsc.precision import check_engine_sm

            sm = {
                "rtx": opts.target_sm,
                "device": prof.sm,
                "preflight": pre.target_sm if pre is not None else prof.sm,
            }[mode]
            try:
                check_engine_sm(quantize, sm)
            except Unsupported as e:
                raise Unsupported(f"{prof.name}: {e}") from None
            for flag, p in (weight_precisions or {}).items():
                try:
                    check_engine_sm(p, sm)
                except Unsupported as e:
                    raise Unsupported(f"{prof.name}: --quantize-{flag} {p}: {e}") from None
        fit = _fit(model_config, model_name, prof, dtype, env, quantize, weight_precisions)
        targets.append(Target(prof, env, mode, opts, pre, fit, tuple(notes)))
    needs_rtx = [t.name for t in targets if t.mode in ("rtx", "preflight")]
    if needs_rtx and Flavour.RTX not in available_backends():
        raise Unsupported(
            f"TensorRT-RTX is not installed, and {', '.join(needs_rtx)} need(s) "
            f"it (an engine or a preflight compile here): pip install 'dsc[rtx]'"
        )
    return targets
