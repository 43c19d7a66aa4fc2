"""`dsc quantize`: calibrate an artifact's graph and write a new artifact with Q/DQ inserted.

Steps (each deterministic given the model and the data):

1. legality: the precision must be one the hardware profile can run (before any work);
2. calibration data: text / JSONL (`{"text": ...}` per line) / a directory of them, tokenized
   with the artifact's tokenizer, `samples` windows of `seq_len` tokens at evenly spaced
   offsets (default: the calibration text shipped in `dsc/data/calibration.txt`, drawn from the
   corpus train split; never the held-out split, which validation uses); for INT8 W8A8 each
   window starts with the tokenizer's prompt prefix (BOS), as prompts do;
3. calibration (`dsc.passes.quant.calibrate`), cached by sha256(model) + sha256(data) + rows;
4. INT8 W8A8: SmoothQuant (α per layer unless given, the down projection's input included)
   then calibrate again on the smoothed graph; INT4: AWQ scales and clip ratios;
5. ranges by `method` and `InsertQDQPass`;
6. with `lm_head` / `embedding` (`--quantize-lm-head`, `--quantize-embedding`: int8, int4 or
   fp8), `VocabQDQPass` stores those weights quantized, weight-only (`dsc.passes.quant.vocab`).

The new artifact holds the quantized `model.onnx`, the input graph under `reference/` (the
layout `dsc validate` compares against), `calibration/` (ranges + the statistics cache) and
`quant_report.json`, and its manifest gains `stages.quantize`, whose `lm_head` and `embedding`
fields record what `VocabQDQPass` quantized (precision, block size, scale layout, bytes
before/after, tied) or null.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dsc.artifacts import (
    IO_SPEC,
    MANIFEST,
    data_file,
    load_io_spec,
    write_graph,
    write_json,
)
from dsc.errors import BadInput, Unsupported, UsageError
from dsc.precision import check_quantized_target

logger = logging.getLogger(__name__)

DEFAULT_CALIB = Path(__file__).resolve().parent / "data" / "calibration.txt"
DEFAULT_METHOD = {"int8": "max", "fp8": "max", "int4": "max"}
MIN_EXPERT_TOKENS = 16
CALIB_LIMIT = 256 * 2**20  # bytes of calibration text read at most (all files together)
# `calibrate_by="auto"` runs the calibration windows one decoder layer at a time when the graph
# holds more weight bytes than this (ONNX Runtime's CPU provider then holds one layer's weights
# and their fp32 copies instead of the model's: R1-Distill-Qwen-1.5B, 3.55 GB of fp16 weights,
# needs about 11 GB for the whole graph), else the whole graph in one session (the tiny models:
# one session is faster). The statistics are the same either way (dsc.passes.quant.layerwise).
LAYERWISE_MIN_WEIGHT_BYTES = 1 << 30
CALIBRATE_BY = ("auto", "layer", "graph")


def calibrates_by_layer(model, calibrate_by: str = "auto") -> bool:
    """Whether calibration runs one decoder layer at a time (`calibrate_by`: "layer",
    "graph", or "auto": by `LAYERWISE_MIN_WEIGHT_BYTES`). Raises BadInput for another value."""
    if calibrate_by not in CALIBRATE_BY:
        known = ", ".join(CALIBRATE_BY)
        raise BadInput(f"calibrate_by must be one of {known}, not {calibrate_by!r}")
    if calibrate_by != "auto":
        return calibrate_by == "layer"
    from dsc.artifacts import weight_bytes

    return weight_bytes(model) > LAYERWISE_MIN_WEIGHT_BYTES


@dataclass
class QuantizeResult:
    path: Path
    precision: str
    scheme: str
    method: str
    quantized_layers: int
    excluded: dict = field(default_factory=dict)
    under_calibrated: list = field(default_factory=list)
    seconds: float = 0.0
    report: dict = field(default_factory=dict)


def check_vocab_options(
    lm_head: str | None,
    embedding: str | None,
    precision: str | None,
    model_config: dict | None = None,
) -> None:
    """Raise before any work for a bad `--quantize-lm-head` / `--quantize-embedding`.

    `UsageError` (exit 2): an unknown precision, or either option without a quantized body
    precision (`precision` None: they are part of the quantize stage). `Unsupported` (exit 4): a
    model whose `model_config` ties the embedding and lm_head (`tie_word_embeddings`) asked for
    only one of them, or for two precisions: one table serves both.
    """
    from dsc.precision import QUANTIZED as VOCAB

    for flag, p in (("--quantize-lm-head", lm_head), ("--quantize-embedding", embedding)):
        if p is not None and p not in VOCAB:
            raise UsageError(f"{flag}: unknown precision {p!r} (choose {', '.join(VOCAB)})")
    if (lm_head or embedding) and precision is None:
        raise UsageError(
            "--quantize-lm-head/--quantize-embedding quantize within a quantized "
            "build: add --int8, --fp8 or --int4-awq"
        )
    if (
        model_config
        and model_config.get("tie_word_embeddings")
        and (lm_head or embedding)
        and lm_head != embedding
    ):
        p = lm_head or embedding
        raise Unsupported(
            f"this model ties its embedding and lm_head (tie_word_embeddings: "
            f"true, one table): quantize both at one precision "
            f"(--quantize-lm-head {p} --quantize-embedding {p}); got lm_head "
            f"{lm_head}, embedding {embedding}"
        )


def vocab_precisions(lm_head: str | None, embedding: str | None) -> dict[str, str]:
    """{option: precision} of the vocabulary weights asked for (for the target checks)."""
    return {k: v for k, v in (("lm-head", lm_head), ("embedding", embedding)) if v}


def check_legal(precision: str, profile=None) -> None:
    """`check_quantized_target` with `profile` a name, a YAML path or a loaded profile."""
    from dsc.hardware import load_profile

    if isinstance(profile, (str, Path)):
        profile = load_profile(profile)
    check_quantized_target(precision, profile)


def read_calibration_text(calib: str | Path | None) -> str:
    path = Path(calib) if calib is not None else DEFAULT_CALIB
    if not path.exists():
        raise BadInput(f"calibration data not found: {path}")
    files = (
        sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".json"))
        if path.is_dir()
        else [path]
    )
    if not files:
        raise BadInput(f"calibration directory {path} holds no .txt or .jsonl files")
    from dsc.paths import MiB, read_text_bounded

    parts = []
    left = CALIB_LIMIT
    for f in files:
        # Calibration uses samples x seq_len tokens: a bounded read refuses /dev/zero, a FIFO
        # or a corpus far larger than any calibration needs, before tokenizing it.
        raw = read_text_bounded(
            f, what="calibration data", kind="text", limit=left, errors="replace"
        )
        left -= len(raw.encode("utf-8", errors="replace"))
        if left < 0:
            raise BadInput(f"calibration data {path} is larger than {CALIB_LIMIT // MiB} MiB")
        if f.suffix in (".jsonl", ".json"):
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise BadInput(f"{f}:{n}: not a JSON line") from None
                text = rec.get("text") if isinstance(rec, dict) else rec
                if not isinstance(text, str):
                    raise BadInput(f"{f}:{n}: expected a string or an object with a 'text' field")
                parts.append(text)
        else:
            parts.append(raw)
    text = "\n".join(parts)
    if not text.strip():
        raise BadInput(f"calibration data {path} is empty")
    return text


def prompt_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS for Llama/DeepSeek tokenizers,
    none for Qwen's), as every prompt the model sees starts."""
    with_sp = tokenizer("a", verbose=False)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
    n = len(with_sp) - len(plain)
    return list(with_sp[:n]) if n > 0 and list(with_sp[n:]) == list(plain) else []


def calibration_windows(
    tokenizer, text: str, samples: int, seq_len: int, *, prompt: bool = False
) -> np.ndarray:
    """`samples` windows of `seq_len` tokens at evenly spaced offsets (deterministic); with
    `prompt`, each starts the way a prompt does (`prompt_prefix`, then text).

    INT8 W8A8 calibrates on prompt windows: BOS puts the model's largest activations at the
    first position (tiny-qwen2's down_proj input: 35.6 against 25.2 anywhere in running text),
    and the smoothing scales of the down projection must be fitted with them. INT4 AWQ and FP8
    measured the same either way on the trained models and use text windows."""
    ids = np.asarray(
        tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64
    )
    if ids.size < 2:
        raise BadInput("calibration data tokenizes to fewer than 2 tokens")
    prefix = prompt_prefix(tokenizer) if prompt else []
    if seq_len <= len(prefix) + 1:
        prefix = []
    body = int(min(seq_len - len(prefix), ids.size))
    starts = np.unique(np.linspace(0, ids.size - body, samples).round().astype(np.int64))
    return np.stack(
        [np.concatenate([np.asarray(prefix, np.int64), ids[s : s + body]]) for s in starts]
    )


def _load(onnx_path: Path):
    import onnx_ir as ir

    return ir.load(str(onnx_path))


def _sha_tree(root: Path) -> dict[str, str]:
    from dsc.models.checkpoint import sha256_file

    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


class QuantizedModel(NamedTuple):
    """What `quantize_model` returns (a tuple, so `model, report, record = ...` still reads).

    `model`: the onnx_ir model with Q/DQ (and scales) inserted, in place of the input;
    `report`: the quantization report (scheme, method, quantized/excluded layers, vocab tables,
    MoE expert coverage); `record`: the calibration record (model and data sha256, `method`,
    `samples` windows of `seq_len` tokens, `tokens`, the activation `ranges`, the statistics
    cache files and whether each was a hit).
    """

    model: object
    report: dict
    record: dict


def quantize_model(
    model,
    io: dict,
    tokenizer,
    precision: str,
    *,
    calib=None,
    method=None,
    samples: int = 64,
    seq_len: int = 128,
    alpha: float | None = None,
    weight_only: bool = False,
    exclude=(),
    use_cache: bool = True,
    percentile: float = 99.99,
    lm_head: str | None = None,
    embedding: str | None = None,
    progress=None,
    calibrate_by: str = "auto",
) -> QuantizedModel:
    """Quantize an in-memory onnx_ir model. Returns a `QuantizedModel` (model, report,
    calibration record).

    `lm_head` / `embedding` (int8 | int4 | fp8 | None): also store those weights quantized,
    weight-only (`VocabQDQPass`); raises `Unsupported` when the graph has no such weight, or
    for a tied table asked for at two precisions.

    `alpha`: SmoothQuant's migration strength for INT8 W8A8; None (the default, "auto")
    searches it per layer, on the fake-quantized GEMM error of the calibration rows.

    `calibrate_by`: "layer" runs the calibration windows through one decoder layer at a time
    (`dsc.passes.quant.layerwise`), "graph" through the whole graph in one ONNX Runtime
    session, "auto" picks by size (`calibrates_by_layer`); the record says which ran.
    """
    from dsc.passes import reset_unique_names
    from dsc.passes.quant import calibrate as cal
    from dsc.passes.quant.awq import AWQScalePass
    from dsc.passes.quant.qdq import InsertQDQPass, QuantScheme
    from dsc.passes.quant.ranges import compute_amax
    from dsc.passes.quant.smoothquant import SmoothQuantPass

    reset_unique_names()
    method = method or DEFAULT_METHOD[precision]
    scheme = QuantScheme(precision, weight_only=weight_only or precision == "int4")
    text = read_calibration_text(calib)
    smooth = precision == "int8" and not scheme.weight_only and (alpha is None or alpha > 0)
    windows = calibration_windows(tokenizer, text, samples, seq_len, prompt=smooth)
    dsha = cal.data_sha256(windows)
    by_layer = calibrates_by_layer(model, calibrate_by)
    say = progress or (lambda msg: None)
    say(f"calibrating on {windows.shape[0]} x {windows.shape[1]} tokens")

    def collect():
        return cal.collect(
            model,
            io,
            windows,
            exclude=exclude,
            use_cache=use_cache,
            progress=say,
            layerwise=by_layer,
        )

    stats = collect()
    # Expert coverage is a property of the original model on this data.
    experts = stats.experts
    report: dict = {"scheme": scheme.label, "method": method}
    cache_files = [stats]
    if smooth:
        # gated=True also smooths the down projection's input: the calibration windows start
        # with the prompt prefix (BOS), so its first-token outliers are in the fitted scales.
        sq = SmoothQuantPass(stats, alpha, exclude, gated=True)
        sq(model)
        report["smoothquant"] = sq.report
        say("calibrating the smoothed graph")
        stats = collect()
        cache_files.append(stats)
    if precision == "int4":
        aw = AWQScalePass(stats, scheme, exclude)
        aw(model)
        report["awq"] = aw.report
    ranges = {} if scheme.weight_only else compute_amax(stats, method, precision, percentile)
    qdq = InsertQDQPass(ranges, scheme, exclude, clip=aw.clip if precision == "int4" else None)
    result = qdq(model)
    report.update(qdq.report)
    report["modified"] = result.modified
    report["vocab"] = _quantize_vocab(model, lm_head, embedding, report)
    under = cal.under_calibrated(experts, MIN_EXPERT_TOKENS)
    report["experts"] = {
        "token_counts": experts,
        "min_tokens": MIN_EXPERT_TOKENS,
        "under_calibrated": under,
        "routed_expert_weights": {
            "quantized": sorted(
                k
                for k, v in report["layers"].items()
                if ".mlp.experts." in k
                and v.get("kind") != "linear"
                or ".mlp.experts.down_proj" in k
            ),
            "excluded": sorted(k for k in report["excluded"] if ".mlp.experts." in k),
            "scales": "one quantized copy per expert weight (shared by the gather and dense "
            "branches); scales per expert and per output channel (INT4: per block "
            "of input rows)",
        },
    }
    if under:
        logger.warning(
            "%d MoE experts saw fewer than %d calibration tokens: %s",
            len(under),
            MIN_EXPERT_TOKENS,
            ", ".join(u["expert"] for u in under[:8]),
        )
    record = {
        "model_sha256": stats.model_sha256,
        "data_sha256": dsha,
        "method": method,
        "samples": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "tokens": int(windows.size),
        "calibrated_by": "layer" if by_layer else "graph",
        "ranges": ranges,
        "cache_hit": [s.cache_hit for s in cache_files],
        "stats": cache_files,
    }
    return QuantizedModel(result.model, report, record)


def _quantize_vocab(model, lm_head: str | None, embedding: str | None, report: dict) -> dict:
    """Run `VocabQDQPass`; {"lm_head": record or None, "embedding": record or None}."""
    from dsc.passes.quant.vocab import VocabQDQPass

    if not (lm_head or embedding):
        return {"lm_head": None, "embedding": None}
    vq = VocabQDQPass(lm_head, embedding)
    vq(model)
    missing = vq.report.get("not_found")
    if missing:
        raise Unsupported(
            f"--quantize-{missing[0].replace('_', '-')}: the graph has no "
            f"{missing[0]} weight dsc can quantize (a Gather of a 2-D float table "
            f"for the embedding, a MatMul of module lm_head for the head)"
        )
    out = {k: vq.report.get(k) for k in ("lm_head", "embedding")}
    # InsertQDQPass listed them as kept in float; they are not any more.
    for k in list(report.get("excluded", {})):
        if (out["lm_head"] and "lm_head" in k) or (out["embedding"] and "embed_tokens" in k):
            report["excluded"].pop(k)
    return out


def calibration_sha256(calib: str | Path | None) -> str:
    """sha256 of the calibration text as read (files joined in order): a stage input."""
    import hashlib

    return hashlib.sha256(read_calibration_text(calib).encode("utf-8")).hexdigest()


def quantize_in_place(
    directory: str | Path,
    precision: str,
    *,
    calib: str | Path | None = None,
    method: str | None = None,
    samples: int = 64,
    seq_len: int = 128,
    alpha: float | None = None,
    weight_only: bool = False,
    exclude=(),
    use_cache: bool = True,
    lm_head: str | None = None,
    embedding: str | None = None,
    progress=None,
    calibrate_by: str = "auto",
    weights_dir: Path | None = None,
) -> tuple[dict, dict]:
    """Quantize the graph of the artifact being written at `directory`, in place.

    The input graph files move to `reference/` (what `dsc validate` compares against), the
    quantized graph takes their place, and `calibration/` and `quant_report.json` are written.
    Returns (quant report, the stage fields for the manifest). Used by `dsc quantize` (on a
    copy of its input) and by `dsc build` (stage 3).

    `weights_dir`: the directory holding the input graph's external data file when it is not
    in `directory` (`dsc quantize --move-input`: the caller moves that file to
    `reference/` once everything else is written, so it is never copied). None: beside the
    graph, in `directory`.
    """
    import onnx_ir as ir

    from dsc.models.loading import load_tokenizer
    from dsc.passes.quant.ranges import METHODS

    if method is not None and method not in METHODS:
        raise BadInput(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")
    directory = Path(directory)
    io = load_io_spec(directory, check_manifest=False)
    onnx_name = io["onnx"]
    graph_files = [
        p
        for p in directory.iterdir()
        if p.name == onnx_name or p.name.startswith(onnx_name + ".") or p.name == IO_SPEC
    ]
    tokenizer = load_tokenizer(directory)
    model = _load(directory / onnx_name)
    if weights_dir is not None:
        ir.external_data.set_base_dir(model.graph, Path(weights_dir))
    t0 = time.perf_counter()
    model, report, record = quantize_model(
        model,
        io,
        tokenizer,
        precision,
        calib=calib,
        method=method,
        samples=samples,
        seq_len=seq_len,
        alpha=alpha,
        weight_only=weight_only,
        exclude=exclude,
        use_cache=use_cache,
        lm_head=lm_head,
        embedding=embedding,
        progress=progress,
        calibrate_by=calibrate_by,
    )
    weights = directory if weights_dir is None else Path(weights_dir)
    external = (weights / data_file(onnx_name)).exists()
    ref = directory / "reference"
    ref.mkdir()
    for p in graph_files:
        shutil.move(str(p), ref / p.name)
    # Weights the passes left alone are still read lazily from the input's data file, which
    # now lives in reference/ (or stays in `weights_dir` until the caller moves it there),
    # and so are the sources of the weights the passes derive: set_base_dir follows them.
    from dsc.passes import set_base_dir

    base = ref if weights_dir is None else weights
    ir.external_data.set_base_dir(model.graph, base)
    set_base_dir(model, base)
    new_opset = int(model.opset_imports.get("", io.get("opset", 0)))
    # Weights stay external when the input graph's were (--external-data, or over 1.5 GiB).
    write_graph(model, directory, onnx_name, external=True if external else None)
    del model  # its lazy tensors now point at the new data file
    new_io = dict(io)
    new_io["opset"] = new_opset
    new_io["quantization"] = precision
    vocab = vocab_precisions(lm_head, embedding)
    if vocab:  # what `dsc compile` checks each target against, beside `quantization`
        new_io["vocab_quantization"] = vocab
    write_json(directory / IO_SPEC, new_io)
    cdir = directory / "calibration"
    cdir.mkdir()
    write_json(cdir / "ranges.json", {k: v for k, v in record.items() if k != "stats"})
    for i, st in enumerate(record["stats"]):
        st.save_or_link(cdir / f"stats{i}-{st.model_sha256[:16]}-{st.data_sha256[:16]}.npz")
    seconds = round(time.perf_counter() - t0, 2)
    report["seconds"] = seconds
    write_json(directory / "quant_report.json", report)
    stage = {
        "precision": precision,
        "scheme": report["scheme"],
        "method": record["method"],
        "alpha": (
            ("auto" if alpha is None else alpha)
            if precision == "int8" and not weight_only
            else None
        ),
        "weight_only": precision == "int4" or weight_only,
        "samples": record["samples"],
        "seq_len": record["seq_len"],
        "calibrated_by": record["calibrated_by"],
        "calib": str(calib) if calib else "dsc/data/calibration.txt",
        "calib_sha256": record["data_sha256"],
        "exclude": list(exclude),
        "report": "quant_report.json",
        "quantized_layers": len(report["layers"]),
        "under_calibrated_experts": len(report["experts"]["under_calibrated"]),
        "lm_head": report["vocab"]["lm_head"],
        "embedding": report["vocab"]["embedding"],
    }
    return report, stage


def quant_outputs(outputs: dict, onnx_name: str) -> dict:
    """The files the quantize stage wrote, out of an artifact's `outputs`."""
    mine = (onnx_name, f"{onnx_name}.data", IO_SPEC, "quant_report.json")
    return {
        k: v
        for k, v in outputs.items()
        if k in mine or k.startswith(("reference/", "calibration/"))
    }


def vocab_inputs(lm_head: str | None, embedding: str | None) -> dict:
    """The quantize stage's input-hash fields for the vocabulary weights: none when neither is
    quantized, so the hashes of artifacts built before these options existed do not change."""
    out = {}
    if lm_head:
        out["lm_head"] = lm_head
    if embedding:
        out["embedding"] = embedding
    return out


def model_config(artifact: Path) -> dict | None:
    """The config.json of `artifact` as a dict, or None when it is missing or unreadable."""
    try:
        cfg = json.loads((Path(artifact) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # load_manifest / load_io_spec report a broken artifact
    return cfg if isinstance(cfg, dict) else None
