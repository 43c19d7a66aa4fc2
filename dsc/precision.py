"""Precisions and where they are legal: the one definition every layer uses.

A `Precision` names the number format of a graph or engine. Three sets matter:

- graph dtypes (`GRAPH_DTYPES`): what `dsc export` writes (fp32, fp16, bf16);
- target precisions (`TARGET_PRECISIONS`): what a hardware profile may list (fp16, bf16, int8,
  fp8, int4; fp32 is never a target: engines are built at half precision or below);
- quantized precisions (`QUANTIZED`): what `--int8|--fp8|--int4-awq` and the vocabulary options
  (`--quantize-lm-head`, `--quantize-embedding`) produce.

Legality, checked here and nowhere else:
- a profile lists a precision only on an SM at least `PROFILE_MIN_SM` (BF16 and INT4 weight-only
  need Ampere, FP8 needs Ada);
- a target runs a precision only when its profile lists it (`check_on_profile`);
- a TensorRT engine for SM `sm` runs a quantized precision only from `ENGINE_MIN_SM` up (the
  SM an RTX engine is compiled for may be older than the GPU's; docs/TENSORRT.md);
- TensorRT-RTX compiles ahead of time only for `RTX_TARGET_SMS` (its `ComputeCapability` enum:
  SM75, SM80, SM86, SM89, SM120, SM121 in TensorRT-RTX 1.7).
"""

from __future__ import annotations

from enum import StrEnum

from dsc.errors import BadInput, Unsupported, UsageError


class Precision(StrEnum):
    """A number format; the value is the name used on the command line and in manifests."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    FP8 = "fp8"
    INT4 = "int4"

    @property
    def quantized(self) -> bool:
        return self.value in QUANTIZED

    @property
    def flag(self) -> str:
        """The `dsc build` / `dsc quantize` flag that asks for it (`--int4-awq` for int4)."""
        return "--int4-awq" if self is Precision.INT4 else f"--{self.value}"


GRAPH_DTYPES = ("fp32", "fp16", "bf16")
TARGET_PRECISIONS = ("fp16", "bf16", "int8", "fp8", "int4")
QUANTIZED = ("int8", "fp8", "int4")
# The lowest SM a hardware profile may list each precision for.
PROFILE_MIN_SM = {"fp16": 0, "int8": 0, "bf16": 80, "int4": 80, "fp8": 89}
# The lowest SM whose TensorRT kernels run each quantized precision (docs/TENSORRT.md).
ENGINE_MIN_SM = {"int8": 75, "int4": 80, "fp8": 89}
# Ahead-of-time targets TensorRT-RTX 1.7 compiles for without a GPU.
RTX_TARGET_SMS = (75, 80, 86, 89, 120, 121)


def precision_from_flags(
    int8: bool = False, fp8: bool = False, int4_awq: bool = False
) -> str | None:
    """The precision named by `--int8|--fp8|--int4-awq`, None for none; `UsageError` for two."""
    chosen = [p for p, on in (("int8", int8), ("fp8", fp8), ("int4", int4_awq)) if on]
    if len(chosen) > 1:
        raise UsageError("choose one of --int8, --fp8, --int4-awq")
    return chosen[0] if chosen else None


def check_target_precision(precision: str) -> None:
    """`BadInput` (exit 3) unless `precision` is one a profile can list."""
    if precision not in TARGET_PRECISIONS:
        raise BadInput(f"unknown precision {precision!r} (known: {', '.join(TARGET_PRECISIONS)})")


def check_quantized(precision: str, what: str = "quantized precision") -> None:
    """`BadInput` (exit 3) unless `precision` is int8, fp8 or int4."""
    if precision not in QUANTIZED:
        raise BadInput(f"unknown {what} {precision!r} (known: {', '.join(QUANTIZED)})")


def check_on_profile(profile, precision: str) -> None:
    """`Unsupported` (exit 4) naming the legal precisions when `profile` cannot run
    `precision`; `BadInput` for an unknown one."""
    check_target_precision(precision)
    if not profile.supports(precision):
        raise Unsupported(
            f"precision {precision} is not supported on {profile.name} "
            f"(SM{profile.sm}); legal: {', '.join(profile.precisions)}"
        )


def check_engine_sm(precision: str, sm: int) -> None:
    """`Unsupported` (exit 4) when a TensorRT engine for SM`sm` cannot run `precision`."""
    need = ENGINE_MIN_SM.get(precision)
    if need is not None and int(sm) < need:
        legal = [p for p, m in ENGINE_MIN_SM.items() if int(sm) >= m]
        raise Unsupported(
            f"{precision} engines need SM{need} or newer; SM{sm} can run "
            f"{', '.join(['fp16', *legal])}"
        )


def check_quantized_target(precision: str, profile=None) -> None:
    """Before any work: `BadInput` when `precision` is not int8/fp8/int4, `Unsupported` when
    the loaded hardware `profile` (None: no target) cannot run it, naming the flags it can."""
    check_quantized(precision)
    if profile is None:
        return
    try:
        check_on_profile(profile, precision)
    except Unsupported:
        legal = [p for p in profile.precisions if p in QUANTIZED]
        raise Unsupported(
            f"{precision} is not supported on {profile.name} (SM{profile.sm}); this target can "
            f"run {', '.join(profile.precisions)}"
            + (
                f" (quantized: {', '.join(Precision(p).flag for p in legal)})"
                if legal
                else " (no quantized precision)"
            )
        ) from None
