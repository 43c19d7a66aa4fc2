"""Hugging Face checkpoint → one ONNX graph that serves prefill and decode.

Graph interface (every family):

    inputs   input_ids        int64 [batch, seq]
             attention_mask   int64 [batch, total_seq]      total_seq = past + seq; 0 = padding
             position_ids     int64 [batch, seq]
             past_key_values.{i}.{a}, past_key_values.{i}.{b}   [batch, heads, past, dim]
    outputs  logits           [batch, seq, vocab]
             present.{i}.{a}, present.{i}.{b}                   [batch, heads, past + seq, dim]

with (a, b) = (key, value) for GQA/MHA families and (compressed_kv, k_pe) for MLA, whose cache
holds the normalised kv latent (kv_lora_rank wide) and the rotary key (qk_rope_head_dim wide),
one "head" each. Prefill passes an empty past (past = 0). The exact names, shapes and dtypes are
written to `model_io.json` beside the graph.

Export uses `torch.onnx.export(dynamo=True)`. Example inputs use batch 2 and distinct seq/past
lengths: a size-1 example would specialise that dimension, and equal sizes invite the tracer to
assume the dimensions are equal.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from dsc.artifacts import EXTERNAL_DATA_THRESHOLD, data_file
from dsc.errors import BackendError, BadInput
from dsc.models.checkpoint import CheckpointInfo
from dsc.models.families import Family
from dsc.models.loading import load_model, transformers_quiet

__all__ = [
    "ExportedGraph",
    "KVCacheWrapper",
    "check_fp16_range",
    "example_inputs",
    "export_graph",
    "io_spec_from_onnx",
    "load_model",
]


ONNX_FILE = "model.onnx"
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 5


@dataclass(frozen=True)
class ExportedGraph:
    onnx_path: Path
    external_data: Path | None
    io_spec: dict
    seconds: float


def cache_names(family: Family, num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{e}" for i in range(num_layers) for e in family.cache_entries]


class KVCacheWrapper:
    """Factory for the torch module exported: flat cache tensors in, logits and presents out."""

    def __new__(cls, model, family: Family):
        import torch
        from transformers import DynamicCache

        num_layers = model.config.num_hidden_layers

        class _Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, position_ids, *past):
                cache = DynamicCache(config=self.model.config)
                for i in range(num_layers):
                    cache.update(past[2 * i], past[2 * i + 1], i)
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=True,
                )
                present = []
                for layer in out.past_key_values.layers:
                    present += [layer.keys, layer.values]
                return (out.logits, *present)

        return _Wrapper().eval()


def example_inputs(
    config: dict,
    family: Family,
    *,
    batch: int,
    seq: int,
    past: int,
    dtype,
    seed: int = 0,
    vocab_size: int | None = None,
):
    """Deterministic inputs with a random past of length `past` (no padding)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = vocab_size or int(config["vocab_size"])
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq).contiguous()
    (h_a, d_a), (h_b, d_b) = family.cache_dims(config)
    cache = []
    for _ in range(int(config["num_hidden_layers"])):
        cache.append((torch.randn(batch, h_a, past, d_a, generator=g) * 0.5).to(dtype))
        cache.append((torch.randn(batch, h_b, past, d_b, generator=g) * 0.5).to(dtype))
    return ids, mask, pos, cache


def export_graph(
    info: CheckpointInfo,
    out_dir: Path,
    *,
    dtype: str,
    opset: int | None,
    external_data: bool = False,
    progress=None,
) -> ExportedGraph:
    """Export `info` into `out_dir/model.onnx`; return its I/O.

    The weights go to `model.onnx.data` when `external_data` is set or when they reach
    `dsc.artifacts.EXTERNAL_DATA_THRESHOLD` (1.5 GiB; protobuf cannot hold 2 GiB). Every later
    stage keeps them external, so `--external-data` makes a tiny model take the paths of a
    real one."""
    import torch

    say = progress or (lambda msg: None)
    family = info.family
    t0 = time.perf_counter()
    say(f"loading {info.architecture} ({info.num_parameters / 1e6:.1f}M parameters, {dtype})")
    model = load_model(info, dtype, progress=say)
    config = model.config.to_dict()
    num_layers = int(config["num_hidden_layers"])
    wrapper = KVCacheWrapper(model, family)
    ids, mask, pos, cache = example_inputs(
        config,
        family,
        batch=EXAMPLE_BATCH,
        seq=EXAMPLE_SEQ,
        past=EXAMPLE_PAST,
        dtype=model.dtype,
    )
    if dtype == "fp16":
        say("checking that fp16 holds the activations (one forward pass on the example)")
        check_fp16_range(wrapper, (ids, mask, pos, *cache), family, num_layers)
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=1)
    past = torch.export.Dim("past", min=0)
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in cache),
    }
    input_names = [
        "input_ids",
        "attention_mask",
        "position_ids",
        *cache_names(family, num_layers, "past_key_values"),
    ]
    output_names = ["logits", *cache_names(family, num_layers, "present")]
    say(f"tracing {num_layers} layers with torch.export")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        with (
            family.export_patches(),
            warnings.catch_warnings(),
            torch.no_grad(),
            _quiet_loggers("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                (ids, mask, pos, *cache),
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; the first line says what failed
        summary = _exporter_summary(e)
        raise BackendError(f"ONNX export of {info.architecture} failed: {summary}") from None
    _name_dims(program.model)
    onnx_path = out_dir / ONNX_FILE
    external = external_data or weight_bytes >= EXTERNAL_DATA_THRESHOLD
    say(f"writing {onnx_path.name}" + (" with external data" if external else ""))
    program.save(onnx_path, external_data=external)
    del program
    data_path = out_dir / data_file(ONNX_FILE)
    io = io_spec_from_onnx(onnx_path, family, config)
    return ExportedGraph(
        onnx_path, data_path if data_path.exists() else None, io, time.perf_counter() - t0
    )


def check_fp16_range(wrapper, inputs, family: Family, num_layers: int) -> None:
    """Run the example through the fp16 model; non-finite logits or cache are a `BadInput`.

    fp16 tops out at 65504: a model trained in bf16 can exceed it in its activations (DeepSeek-V2's
    routed_scaling_factor of 16 does) although every weight fits. The exported graph would then
    compute inf/NaN, so refuse it here, before tracing, and point at bf16.
    """
    import torch

    names = ["logits", *cache_names(family, num_layers, "present")]
    with family.export_patches(), torch.no_grad(), warnings.catch_warnings(), transformers_quiet():
        warnings.simplefilter("ignore")
        outputs = wrapper(*inputs)
    for name, value in zip(names, outputs, strict=True):
        if not bool(torch.isfinite(value).all()):
            raise BadInput(
                f"the fp16 export overflows: {name} is inf/NaN on the export example (fp16 holds "
                "values up to 65504); export with --dtype bf16 (or fp32)"
            )


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """The exporter logs routine notes (e.g. 'torchvision is not installed') as warnings."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for log, _ in saved:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in saved:
            log.setLevel(level)


def _exporter_summary(e: Exception) -> str:
    text = str(e)
    marker = "## Exception summary"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("(")]
    return (lines[0] if lines else type(e).__name__)[:400]


def _name_dims(model) -> None:
    """Give the attention-mask length a readable symbol (the tracer calls it s<N>)."""
    import onnx_ir as ir

    mask = next((v for v in model.graph.inputs if v.name == "attention_mask"), None)
    if mask is None or mask.shape is None:
        return
    old = mask.shape[1]
    if not isinstance(old, ir.SymbolicDim) or old.value is None:
        return
    old_name = old.value
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is None:
            continue
        dims = [
            ir.SymbolicDim("total_seq")
            if isinstance(d, ir.SymbolicDim) and d.value == old_name
            else d
            for d in value.shape
        ]
        value.shape = ir.Shape(dims)


def io_spec_from_onnx(onnx_path: Path, family: Family, config: dict) -> dict:
    """The machine-readable description of the graph's inputs, outputs and cache layout."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append(
                {
                    "name": v.name,
                    # explicit for bf16: onnx < 1.19 maps it to numpy float32
                    "dtype": (
                        "bfloat16"
                        if t.elem_type == onnx.TensorProto.BFLOAT16
                        else onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
                    ),
                    "shape": dims,
                }
            )
        return out

    num_layers = int(config["num_hidden_layers"])
    (h_a, d_a), (h_b, d_b) = family.cache_dims(config)
    a, b = family.cache_entries
    inputs = describe(proto.graph.input)
    cache_dtype = next(i["dtype"] for i in inputs if i["name"].startswith("past_key_values."))
    return {
        "schema_version": 1,
        "family": family.name,
        "architecture": config["architectures"][0] if config.get("architectures") else None,
        "onnx": onnx_path.name,
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "inputs": inputs,
        "outputs": describe(proto.graph.output),
        "cache": {
            "kind": family.cache_kind,
            "num_layers": num_layers,
            "dtype": cache_dtype,
            "layout": "[batch, heads, past, dim]",
            "entries": [
                {"name": a, "heads": h_a, "dim": d_a},
                {"name": b, "heads": h_b, "dim": d_b},
            ],
            "meaning": (
                "compressed_kv: normalised kv latent (kv_lora_rank); k_pe: rotary key "
                "(qk_rope_head_dim); K/V are expanded inside the graph"
                if family.cache_kind == "mla"
                else "key/value per kv head, after RoPE"
            ),
            "inputs": cache_names(family, num_layers, "past_key_values"),
            "outputs": cache_names(family, num_layers, "present"),
            "bytes_per_token": num_layers
            * (h_a * d_a + h_b * d_b)
            * (2 if cache_dtype in ("float16", "bfloat16") else 4),
        },
        "vocab_size": int(config["vocab_size"]),
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
        "pad_token_id": config.get("pad_token_id"),
        "max_position_embeddings": config.get("max_position_embeddings"),
    }
