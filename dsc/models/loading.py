"""Load a checkpoint into a transformers model for export, refusing anything that is not right.

Safetensors checkpoints are read through `dsc.models.weights.WeightReader` (FP8 blocks
dequantized, MTP layers left out, every tensor checked for NaN/Inf and for overflow of the export
dtype) and handed to transformers' own loader as a lazy state dict
(`from_pretrained(None, config=..., state_dict=...)`): transformers' key conversion (per-expert
tensors fused into 3-D `gate_up_proj`/`down_proj`), dtype plan (fp32 router) and weight tying
apply unchanged, and each tensor is read only when transformers materialises it, as with the
safetensors slices it opens itself. The config is built without its `quantization_config`, so no
transformers quantizer (which needs accelerate and a GPU for FP8) is involved.

transformers fills a missing weight with random values and only logs a report; here a missing,
unexpected or misshapen tensor is a `CheckpointError` naming up to three of them.
"""

from __future__ import annotations

import contextlib
import warnings

from dsc.errors import BadInput, CheckpointError
from dsc.models.checkpoint import CheckpointInfo

_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def load_model(info: CheckpointInfo, dtype: str, progress=None):
    """Load the checkpoint with transformers, ready to export (eval mode, adapter settings).

    Safetensors checkpoints are read through `dsc.models.weights.WeightReader` (FP8 blocks
    dequantized, MTP layers left out, every tensor checked for NaN/Inf and for overflow of the
    export dtype) and handed to transformers' own loader as a lazy state dict, so transformers'
    key conversion (fused MoE experts) applies unchanged. Missing, unexpected or misshapen tensors
    are a `CheckpointError` naming them, never a silently random-initialised weight.
    """
    import torch
    import transformers

    from dsc.models.weights import WeightReader

    say = progress or (lambda msg: None)
    transformers.utils.logging.disable_progress_bar()
    torch_dtype = getattr(torch, _TORCH_DTYPES[dtype])
    config = model_config(info)
    model_class = getattr(transformers, info.architecture)
    kwargs = dict(
        config=config,
        dtype=torch_dtype,
        attn_implementation="sdpa",
        output_loading_info=True,
        ignore_mismatched_sizes=True,
    )
    with transformers_quiet():
        if info.weight_format == "safetensors":
            with WeightReader.for_checkpoint(info, dtype=torch_dtype) as reader:
                describe_reader(reader, info, dtype, say)
                present = set(reader.names)
                model, loading = _guarded_load(
                    info,
                    lambda: model_class.from_pretrained(
                        None, state_dict=reader.lazy_state_dict(), **kwargs
                    ),
                    explain=lambda: _explain_names(model_class, config, present, info.architecture),
                )
        else:
            model, loading = _guarded_load(
                info,
                lambda: model_class.from_pretrained(info.path, use_safetensors=False, **kwargs),
            )
            _check_finite_parameters(model, info)
    _check_loading_info(loading, info)
    model.eval()
    info.family.prepare_model(model)
    return model


def describe_reader(reader, info: CheckpointInfo, dtype: str, say) -> None:
    """The progress lines for what a `WeightReader` leaves out (MTP layers) and dequantizes."""
    if reader.skipped:
        layers = sorted({n.split(".")[2] for n in reader.skipped}, key=int)
        say(
            f"leaving out {len(reader.skipped)} tensors of the multi-token-prediction "
            f"layer (model.layers.{','.join(layers)}.*): the export predicts the next token only"
        )
    if info.quantization is not None:
        b0, b1 = info.quantization.block
        say(f"dequantizing FP8 weights ({b0}×{b1} blocks) to {dtype} as they are read")


def model_config(info: CheckpointInfo):
    """The transformers config to build the model from: dsc dequantizes, so no quantizer."""
    from transformers import AutoConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(info.path)
    except Exception as e:  # config validators raise their own classes (strict dataclasses)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read the config of {info.path}: {first}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _guarded_load(info: CheckpointInfo, load, explain=None):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        # transformers' own message for a failed key conversion points at a report dsc does
        # not print; say which checkpoint tensors do not fit when that can be worked out.
        why = explain() if explain is not None else None
        if why is not None:
            raise CheckpointError(f"checkpoint {info.path} {why}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {info.path}: {first}") from None


def _explain_names(model_class, config, present: set[str], arch: str) -> str | None:
    """Checkpoint tensor names the model expects but lacks, or holds but has no place for.

    The expected names come from transformers itself: the conversion mapping reversed (as
    `save_pretrained` applies it) over the model's state dict on the meta device. Used only to
    explain a load that already failed: checkpoints with legacy names load fine yet differ here.
    """
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = model_class(config)
        expected = set(revert_weight_conversion(model, model.state_dict()))
    except Exception:  # only an explanation: fall back to transformers' message
        return None
    if missing := expected - present:
        return f"lacks {few_names(missing)} that its {arch} config needs"
    if unexpected := present - expected:
        return f"holds {few_names(unexpected)} that its {arch} config has no place for"
    return None


@contextlib.contextmanager
def transformers_quiet():
    """transformers logs a multi-line load report; dsc turns its content into one error line."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def few_names(names, k: int = 3) -> str:
    names = sorted(names)
    shown = ", ".join(names[:k])
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} ({shown}{more})"


def _check_loading_info(loading: dict, info: CheckpointInfo) -> None:
    """Refuse a load that left weights random or dropped checkpoint tensors."""
    arch = info.architecture
    missing = loading.get("missing_keys") or set()
    mismatched = loading.get("mismatched_keys") or set()
    unexpected = loading.get("unexpected_keys") or set()
    if missing:
        raise CheckpointError(
            f"checkpoint {info.path} lacks {few_names(missing)} that its {arch} config needs"
        )
    if mismatched:
        name, got, want = sorted(mismatched)[0]
        raise CheckpointError(
            f"checkpoint {info.path} has {few_names([m[0] for m in mismatched])} of the wrong "
            "shape: "
            f"{name} is {list(got)}, its {arch} config needs {list(want)}"
        )
    if unexpected:
        raise CheckpointError(
            f"checkpoint {info.path} holds {few_names(unexpected)} that its {arch} "
            "config has no place for"
        )


def _check_finite_parameters(model, info: CheckpointInfo) -> None:
    """Pickle checkpoints do not go through the weight reader: check the loaded parameters."""
    import torch

    for name, t in model.state_dict().items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"checkpoint {info.path}: tensor {name} holds NaN or Inf "
                "values (after the cast to the export dtype)"
            )


def load_tokenizer(directory):
    """The tokenizer stored in an artifact (or checkpoint) directory.

    Raises `BadInput` (exit 3) for a missing or malformed tokenizer."""
    from transformers import AutoTokenizer

    try:
        with transformers_quiet():
            return AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # tokenizers raises plain Exception for a malformed tokenizer.json
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"cannot load the tokenizer in {directory}: {first}") from None
