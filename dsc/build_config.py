"""`BuildConfig`: every option of `dsc build` / `dsc compile`, checked when it is made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from dsc.errors import UsageError

VALIDATE_KINDS = ("auto", "smoke", "gate", "none")
TRACE_LAYERS = ("kinds", "all")  # dsc.export.by_kind


@dataclass(frozen=True)
class BuildConfig:
    """Every option of `dsc build` / `dsc compile` (the keys of dsc.yaml, minus paths)."""

    profiles: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()  # --set key=value, applied to every profile
    dtype: str = "fp16"
    opset: int | None = None
    external_data: bool = False  # always write weights to model.onnx.data (else at 1.5 GiB)
    stream: bool = True  # trace on fake tensors, write weights one at a time (safetensors)
    trace_layers: str = "kinds"  # kinds (one layer per kind traced, then copied) | all
    max_batch: int | None = None
    max_input_len: int | None = None
    max_kv: int | None = None
    max_num_tokens: int | None = None
    backend: str = "auto"  # auto | tensorrt_rtx | tensorrt
    dla_core: int | None = None
    validate: str = "auto"  # auto (gate when quantized, else smoke) | smoke | gate | none
    validate_tokens: int = 8
    allow_pickle: bool = False
    force: bool = False  # replace an artifact of another checkpoint at OUT
    rebuild: bool = False  # ignore what OUT holds; run every stage
    # 2. graph passes (dsc.passes): the default pipeline unless `passes` names some
    optimize: bool = True
    passes: tuple[str, ...] = ()
    disable_passes: tuple[str, ...] = ()
    # 3. quantization (dsc.quantize): None, int8, fp8 or int4 (AWQ)
    quantize: str | None = None
    weight_only: bool = False
    calib: str | None = None  # text / JSONL / directory; None: the shipped calibration text
    calib_method: str | None = None
    alpha: float | None = None  # SmoothQuant α; None: searched per layer ("auto")
    calib_samples: int = 64
    calib_seq_len: int = 128
    calibrate_by: str = "auto"  # auto | layer | graph (dsc.quantize.calibrates_by_layer)
    exclude: tuple[str, ...] = ()
    # vocabulary weights, weight-only (dsc.passes.quant.vocab): None, int8, int4 or fp8
    quantize_lm_head: str | None = None
    quantize_embedding: str | None = None

    def __post_init__(self):
        for name in ("profiles", "overrides", "passes", "disable_passes", "exclude"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.calib is not None:
            object.__setattr__(self, "calib", str(self.calib))
        if self.quantize is not None:
            from dsc.precision import check_quantized

            check_quantized(self.quantize)
            if self.dtype == "fp32":
                raise UsageError("quantization needs a half-precision graph (--dtype fp16 or bf16)")
        from dsc.quantize import check_vocab_options

        check_vocab_options(self.quantize_lm_head, self.quantize_embedding, self.quantize)
        if self.weight_only and self.quantize != "int8":
            raise UsageError(
                "--weight-only applies to --int8 only (INT4-AWQ is always "
                "weight-only; FP8 quantizes weights and activations)"
            )
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.calib_samples < 1 or self.calib_seq_len < 2:
            raise UsageError("calibration needs at least 1 sample of at least 2 tokens")
        if self.validate == "gate" and self.quantize is None:
            raise UsageError(
                "--validate gate compares a quantized graph with its fp16 reference: "
                "add --int8, --fp8 or --int4-awq (or run `dsc validate --reference`)"
            )
        if not self.optimize and (self.passes or self.disable_passes):
            raise UsageError("--passes/--disable-pass contradict --no-optimize")
        if self.trace_layers not in TRACE_LAYERS:
            raise UsageError(
                f"unknown trace_layers {self.trace_layers!r} (choose {', '.join(TRACE_LAYERS)})"
            )
        if self.validate not in VALIDATE_KINDS:
            raise UsageError(
                f"unknown validation {self.validate!r} (choose {', '.join(VALIDATE_KINDS)})"
            )
        if self.validate_tokens < 1:
            raise UsageError(f"validate_tokens must be at least 1, got {self.validate_tokens}")
        for name in ("max_batch", "max_input_len", "max_kv", "max_num_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {v}")

    def envelope_kwargs(self) -> dict:
        """`dsc.pipeline.targets.resolve_targets` keywords this config sets for every target:
        overrides, the shape envelope, backend and DLA core (the model, dtype and precisions
        come from a checkpoint or from a stored artifact: the caller's)."""
        return {
            "overrides": list(self.overrides),
            "max_batch": self.max_batch,
            "max_input_len": self.max_input_len,
            "max_kv": self.max_kv,
            "max_num_tokens": self.max_num_tokens,
            "backend": self.backend,
            "dla_core": self.dla_core,
        }

    def record(self) -> dict:
        """The options as the manifest records them (not the ones that only steer this run)."""
        d = asdict(self)
        for k in ("force", "rebuild"):
            d.pop(k)
        for k in ("profiles", "overrides", "passes", "disable_passes", "exclude"):
            d[k] = list(getattr(self, k))
        return d

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]
