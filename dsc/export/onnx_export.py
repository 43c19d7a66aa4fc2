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

import concurrent.futures
import contextlib
import inspect
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from dsc.artifacts import EXTERNAL_DATA_THRESHOLD, data_file
from dsc.errors import BackendError, BadInput, unwrapped
from dsc.export import prewrite as prewrite_mod
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
    """What `export_graph` wrote. `external_data_sha256`: with `hash_external_data`, the data
    file's sha256 (hex), computed on a second thread from the moment the file was written
    while the range check ran. `writer_peak_rss_bytes`: the largest resident set of this process
    and the one that wrote the data file beside the trace (`dsc.export.prewrite`) together,
    None without one."""

    onnx_path: Path
    external_data: Path | None
    io_spec: dict
    seconds: float
    external_data_sha256: str | None = None
    writer_peak_rss_bytes: int | None = None


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


def _export_example(config: dict, family: Family, torch_dtype):
    """The example the exporter traces and range-checks with (module docstring: batch 2,
    distinct seq and past lengths)."""
    return example_inputs(
        config, family, batch=EXAMPLE_BATCH, seq=EXAMPLE_SEQ, past=EXAMPLE_PAST, dtype=torch_dtype
    )


def export_graph(
    info: CheckpointInfo,
    out_dir: Path,
    *,
    dtype: str,
    opset: int | None,
    external_data: bool = False,
    stream: bool | None = None,
    trace_layers: str = "kinds",
    trace_cache: bool | None = None,
    progress=None,
    quiet: bool = False,
    hash_external_data: bool = False,
    prewrite: bool | None = None,
) -> ExportedGraph:
    """Export `info` into `out_dir/model.onnx`; return its I/O.

    `stream` (default: on for safetensors checkpoints) traces the model on the meta device and
    writes each weight from the checkpoint as the writer reaches it (`dsc.export.streaming`), so
    the peak is about the largest tensor, not the model; off, the model is loaded whole with
    transformers first (pickle checkpoints always). Both write the same graph.

    `trace_layers` (streaming only): "kinds" traces one decoder layer of each kind and copies it
    for the other layers of that kind (`dsc.export.by_kind`: trace and optimizer time flat in
    depth; the same computation, node for node, as tracing them all); "all" traces every
    layer, as does "kinds" when the model has no more layers than its cut, or when the cut
    graph does not split into layers (said on the progress line). `trace_cache` (with "kinds"):
    take the cut's traced graph from the trace cache when an export of the same config and
    tools put it there, and put it there otherwise (`dsc.export.trace_cache`; the same files
    either way); None follows `$DSC_TRACE_CACHE` (default on).

    fp16 runs the example through the model once and refuses non-finite logits or cache: before
    the trace when the model is loaded whole, after the write when streaming, from the weights
    in `model.onnx.data` (`dsc.export.streaming.WrittenWeights`).

    The weights go to `model.onnx.data` when `external_data` is set or when they reach
    `dsc.artifacts.EXTERNAL_DATA_THRESHOLD` (1.5 GiB; protobuf cannot hold 2 GiB). Every later
    stage keeps them external, so `--external-data` makes a tiny model take the paths of a
    real one. Raises `CheckpointError` (exit 3) for a checkpoint that does not fit its config,
    `BadInput` (exit 3) for an fp16 overflow or `--stream` on a pickle checkpoint, and
    `BackendError` when the exporter fails. Writing external data shows a bar with counts
    and an ETA on a terminal unless `quiet`.

    `hash_external_data`: hash `model.onnx.data` on a second thread as soon as it is written,
    while the range check runs (`ExportedGraph.external_data_sha256`; stopped if the export
    fails), for a caller that records it (`dsc export`'s manifest): at 7B both read the 15 GB
    file back (docs/BENCHMARKS.md).

    `prewrite` (streaming with external data): write `model.onnx.data` in a second process
    while tracing (`dsc.export.prewrite`; the same tensors, in state-dict order), falling back
    to onnx_ir's writer when the graph does not hold the weights as planned; None follows
    `$DSC_PREWRITE` (default on)."""
    import torch

    say = progress or (lambda msg: None)
    if stream is None:
        stream = info.weight_format == "safetensors"
    if stream and info.weight_format != "safetensors":
        raise BadInput(
            "a streaming export reads safetensors checkpoints only; this one is "
            f"{info.weight_format} (export it without --stream)"
        )
    t0 = time.perf_counter()
    torch_dtype = getattr(torch, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype])
    mode = "streaming its weights" if stream else "loading it whole"
    say(f"{info.architecture} ({info.num_parameters / 1e6:.1f}M parameters, {dtype}): {mode}")
    with contextlib.ExitStack() as stack:
        early = None
        if (
            stream
            and (prewrite_mod.enabled() if prewrite is None else prewrite)
            and (
                external_data
                or info.num_parameters * torch_dtype.itemsize >= EXTERNAL_DATA_THRESHOLD
            )
        ):  # its imports run beside the fake model's construction
            early = stack.enter_context(
                prewrite_mod.PreWrite.launch(out_dir / data_file(ONNX_FILE))
            )
        if stream:
            from dsc.export.streaming import CheckpointSources, fake_model, onloaded
            from dsc.models.loading import describe_reader
            from dsc.models.weights import WeightReader

            reader = stack.enter_context(WeightReader.for_checkpoint(info, dtype=torch_dtype))
            describe_reader(reader, info, dtype, say)
            model, buffers, fake_mode = fake_model(info, torch_dtype)
            sources = CheckpointSources(
                model, reader, path=info.path, architecture=info.architecture
            )
            weight_bytes = sources.weight_bytes
        else:
            model = load_model(info, dtype, progress=say)
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        external = external_data or weight_bytes >= EXTERNAL_DATA_THRESHOLD
        data_path = out_dir / data_file(ONNX_FILE)
        if early is not None and not external:  # fewer bytes than its parameters said
            early.close()
            early = None
        if early is not None:
            plan = prewrite_mod.plan(model, sources)
            early.begin(plan, sources, reader, hash_data=hash_external_data)
        config = model.config.to_dict()
        num_layers = int(config["num_hidden_layers"])
        wrapper = KVCacheWrapper(model, family := info.family)
        ids, mask, pos, cache = _export_example(config, family, torch_dtype)
        check_message = "checking that fp16 holds the activations (one forward pass on the example)"
        if dtype == "fp16" and not stream:  # streamed: after the write, from what it wrote
            say(check_message)
            check_fp16_range(wrapper, (ids, mask, pos, *cache), family, num_layers)
        if stream:
            graph = _streamed_program(
                info,
                model,
                buffers,
                fake_mode,
                sources,
                torch_dtype,
                opset,
                trace_layers,
                trace_cache,
                say,
            )
        else:
            say(f"tracing {num_layers} layers with torch.export")
            graph = _trace(
                wrapper, (ids, mask, pos, *cache), family, num_layers, opset, optimize=True
            ).model
        _name_dims(graph)
        onnx_path = out_dir / ONNX_FILE
        say(f"writing {onnx_path.name}" + (" with external data" if external else ""))
        follower = None
        sha256 = None
        with unwrapped():  # a small weight's read error, raised inside the serializer
            written = early.prepare(graph, say=say) if early is not None else None
        prewritten = written is not None  # the rest of the file is being written beside us
        if not prewritten and hash_external_data and external:
            stop = threading.Event()
            stack.callback(stop.set)  # ends the hash early unless it is done (a failed export)
            follower = _FollowingHash(data_path, stop=stop)
        with unwrapped():  # a weight's read error, raised inside the serializer
            if prewritten:
                pass  # `early.complete` saves the graph once the file is written
            elif external:
                written = _save_external(graph, onnx_path, quiet=quiet, follower=follower)
            else:
                import onnx_ir as ir

                ir.save(graph, onnx_path)  # what `ONNXProgram.save(external_data=False)` does
                written = {}
        digest = follower.digest if follower is not None and data_path.exists() else None
        if dtype == "fp16" and stream:
            say(check_message)
            from dsc.export.streaming import WrittenWeights
            from dsc.pipeline.progress import counted

            # written with direct I/O, the file is not in the page cache and the checkpoint
            # the child has just read is: the weights read whole come from the checkpoint
            weights = WrittenWeights(
                data_path,
                written,
                sources,
                wait=early.wait_for if prewritten else None,
                permuted_from_fallback=prewritten and early.direct,
            )
            with (
                counted("fp16 range check (modules)", 1, quiet=quiet) as advance,
                onloaded(model, weights, buffers, advance=advance),
            ):
                check_fp16_range(wrapper, (ids, mask, pos, *cache), family, num_layers)
        if prewritten:
            with unwrapped():
                sha256 = early.complete(graph, onnx_path, quiet=quiet)
        del graph
        io = io_spec_from_onnx(onnx_path, family, config)
        if digest is not None:
            sha256 = digest.result()  # before `stop` is set
        if sha256 is None and digest is not None:  # the writer's offsets were not in order
            from dsc.models.checkpoint import sha256_file

            sha256 = sha256_file(data_path)
    return ExportedGraph(
        onnx_path,
        data_path if data_path.exists() else None,
        io,
        time.perf_counter() - t0,
        external_data_sha256=sha256,
        writer_peak_rss_bytes=early.peak_rss_bytes if prewritten else None,
    )


def _streamed_program(
    info, model, buffers, mode, sources, torch_dtype, opset, trace_layers, trace_cache, say
):
    """The optimized graph (`onnx_ir.Model`) of the fake `model` with its weights attached
    lazily: every layer traced, or one per kind instantiated for the others (`trace_layers`,
    see `export_graph`), the cut's graph taken from the trace cache when it is there
    (`trace_cache`: None follows `$DSC_TRACE_CACHE`)."""
    from dsc.export import by_kind
    from dsc.export import trace_cache as trace_cache_mod
    from dsc.export.streaming import fake_model

    family = info.family
    n = int(model.config.num_hidden_layers)
    kinds = by_kind.layer_kinds(model) if trace_layers == "kinds" else None
    m = by_kind.cut_depth(kinds) if kinds else None
    if m is not None:
        cut, cut_buffers, cut_mode = fake_model(info, torch_dtype, num_layers=m)
        if by_kind.layer_kinds(cut) != kinds[:m]:
            m = None
            say("the model cut to its first layers differs from the whole; tracing every layer")
    if m is not None:
        cut_model, weights, entry = _cut_graph(
            info, cut, cut_buffers, cut_mode, sources, opset, torch_dtype, trace_cache, say
        )
        if cut_model is None:
            say(f"tracing {m} of {n} layers with torch.export (one of each kind, then copied)")
            program, weights = _trace_fake(
                cut, cut_buffers, cut_mode, sources, family, opset, torch_dtype, hide_weights=True
            )
            cut_model = program.model
            if entry is not None:  # serialised now: `instantiate` grows the graph in place
                entry = (entry, trace_cache_mod.serialize(cut_model, weights))
        else:
            entry = None
        try:
            added = by_kind.instantiate(
                cut_model,
                kinds=kinds,
                weights=weights,
                make_weight=lambda name, key, perm, like: _checkpoint_tensor(
                    sources, key, perm, dtype=like.dtype, shape=like.shape, name=name
                ),
                has_key=sources.__contains__,
            )
            copied = f"layer {m}" if m == n - 1 else f"layers {m}..{n - 1}"
            say(f"{copied} copied from their kind's traced layer ({added} nodes)")
            if entry is not None:
                trace_cache_mod.store(*entry)
            return cut_model
        except by_kind.NotInstantiable as e:
            say(f"cannot copy the traced layers ({e}); tracing every layer")
    say(f"tracing {n} layers with torch.export")
    return _trace_fake(model, buffers, mode, sources, family, opset, torch_dtype)[0].model


def _cut_graph(info, cut, buffers, mode, sources, opset, torch_dtype, trace_cache, say):
    """The cut model's optimized graph from the trace cache (`dsc.export.trace_cache`).

    Returns (model, weights, None) on a hit, with every cached weight placeholder replaced by
    a lazy tensor of the checkpoint (`_checkpoint_tensor`), and the non-persistent buffers
    (`buffers`) checked against the cached ones; (None, None, key) on a miss, the key to
    store the trace under; (None, None, None) when the cache is off."""

    from onnx_ir.tensor_adapters import from_torch_dtype

    from dsc.export import trace_cache as cache

    if not (cache.enabled() if trace_cache is None else trace_cache):
        return None, None, None
    key = cache.trace_key(
        cut.config.to_dict(), architecture=info.architecture, dtype=str(torch_dtype), opset=opset
    )

    def expected(k):
        if k not in sources:
            return None
        fake = sources.fake(k)
        try:
            dtype = from_torch_dtype(fake.dtype)
        except TypeError:  # a dtype ONNX has no type for
            return None
        return dtype, tuple(fake.shape)

    try:
        hit = cache.load(key, expected=expected)
    except cache.Unusable as e:
        say(f"the trace cache entry {key[:12]} is unusable ({e}); tracing")
        return None, None, key
    if hit is None:
        return None, None, key
    model, weights = hit
    for value, (k, perm) in weights.items():
        like = value.const_value
        value.const_value = _checkpoint_tensor(
            sources, k, perm, dtype=like.dtype, shape=like.shape, name=like.name
        )
    inits = model.graph.initializers
    for k, tensor in buffers.items():
        value = inits.get(f"model.{k}")
        if value is not None and not _equal_arrays(value.const_value, tensor):
            say(f"the trace cache entry {key[:12]} holds another {k}; tracing")
            return None, None, key
    say(
        f"the {cut.config.num_hidden_layers}-layer traced graph is in the trace cache "
        f"({key[:12]}); not tracing"
    )
    return model, weights, None


def _equal_arrays(ir_tensor, torch_tensor) -> bool:
    import numpy as np

    if ir_tensor is None:
        return False
    want = _ir_tensor(torch_tensor, "buffer").numpy()
    got = ir_tensor.numpy()
    return got.shape == want.shape and got.dtype == want.dtype and np.array_equal(got, want)


def _trace_fake(
    model, buffers, mode, sources, family: Family, opset, torch_dtype, *, hide_weights=False
):
    """Trace the fake `model`, attach its weights lazily, fold weight transposes, optimize.
    Returns (program, {initializer value: (state-dict key, permutation or None)}), by value
    since the optimizer renames values."""
    from dsc.export.streaming import is_fake

    config = model.config.to_dict()
    num_layers = int(config["num_hidden_layers"])
    wrapper = KVCacheWrapper(model, family)
    ids, mask, pos, cache = _export_example(config, family, torch_dtype)
    args = tuple(mode.from_tensor(t) for t in (ids, mask, pos, *cache))
    program = _trace(wrapper, args, family, num_layers, opset, optimize=False)
    keys = _attach_weights(program.model, sources, buffers, is_fake)
    inits = program.model.graph.initializers
    weights = {inits[name]: (key, None) for name, key in keys.items()}
    _fold_weight_transposes(program.model, sources, weights)
    # The cut graph's weights are hidden from the optimizer (`hide_weights`): it would merge
    # equal small ones (unit norms, zero biases) across layers and fold ops on them into new
    # tensors, and a layer's copies then could not tell which weights are theirs. The whole
    # graph is deduplicated after the copies are made (`by_kind.instantiate`).
    hidden = {v: v.const_value for v in weights} if hide_weights else {}
    for v in hidden:
        v.const_value = None
    with _quiet_loggers("onnx_ir", "onnxscript"), unwrapped():
        program.optimize()
    for v, tensor in hidden.items():
        v.const_value = tensor
    return program, weights


# Tensors read, cast and written at once by `_save_external`, and the bytes they may hold
# beyond the one tensor larger than that (onnx_ir's byte budget; see `_save_external`).
WRITE_WORKERS = 2
WRITE_IN_FLIGHT_BYTES = 256 << 20


def _save_external(model, onnx_path: Path, *, quiet: bool, follower=None) -> dict:
    """`onnx_ir.save` with the weights in `model.onnx.data`, as the exporter's own save does,
    with a progress bar over the tensors written (each one is read from the checkpoint then).

    `WRITE_WORKERS` threads read, cast and write tensors at once (onnx_ir's `max_workers`,
    onnx-ir 1.1 and later; older ones write serially). Every tensor's offset is fixed before
    any is written, so the file is the serial writer's, byte for byte. File reads and torch's
    casts release the GIL, so they overlap on 2 cores (the 1.5B's whole export, quiet host:
    about 8 % faster with this and the range check's read-ahead; docs/BENCHMARKS.md).
    Memory: onnx_ir admits tensors up to `WRITE_IN_FLIGHT_BYTES` at once, plus one larger
    than that, so the peak grows by at most that budget over the serial write's largest
    tensor.

    `follower` (a `_FollowingHash`): told where each tensor starts and when each of dsc's lazy
    tensors is written, it hashes the file behind the writer, and is finished when the save
    returns.

    Returns where each checkpoint weight went: {state-dict key: (byte offset in the data file,
    shape as written, torch dtype, permutation it was written with or None)}
    (`dsc.export.streaming.WrittenWeights`), a key written unpermuted preferred."""
    import onnx_ir as ir
    from onnx_ir.tensor_adapters import to_torch_dtype

    from dsc.pipeline.progress import counted

    total = len(model.graph.initializers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = {}
    if "max_workers" in inspect.signature(ir.save).parameters:  # onnx-ir 1.1; serial before
        threads = dict(
            max_workers=min(WRITE_WORKERS, cores or 1), max_in_flight_bytes=WRITE_IN_FLIGHT_BYTES
        )
    written: dict = {}

    def wrote(tensor, info) -> None:  # called under the writer's lock, before the write
        advance(total=info.total)
        if follower is not None:
            follower.started(info.index, info.offset, tensor.nbytes)
        key = getattr(tensor, "source_key", None)
        if key is not None and (key not in written or tensor.source_perm is None):
            shape = tuple(tensor.shape.numpy())
            written[key] = (info.offset, shape, to_torch_dtype(tensor.dtype), tensor.source_perm)

    tracked = [v.const_value for v in model.graph.initializers.values()]
    tracked = [t for t in tracked if hasattr(t, "on_written")] if follower is not None else []
    for tensor in tracked:
        tensor.on_written = follower.written
    try:
        if follower is not None:
            follower.start()
        with counted("writing weights", total, quiet=quiet) as advance:
            ir.save(
                model,
                onnx_path,
                external_data=data_file(onnx_path.name),
                callback=wrote,
                **threads,
            )
    finally:
        for tensor in tracked:
            tensor.on_written = None
        if follower is not None:
            follower.finished()
    return written


class _FollowingHash:
    """sha256 of the external data file while `_save_external` writes it, on its own thread.

    The writer (onnx_ir's `save`, `WRITE_WORKERS` threads) lays the tensors out in index order
    at increasing offsets (`onnx_ir.external_data`: each offset follows the last tensor's end,
    aligned), writes them into a temporary file beside the destination and renames it at the
    end, and calls back before writing each tensor. `started(index, offset, nbytes)` records
    that callback and which thread writes the tensor; `written(file)`, called by dsc's lazy
    tensors (`_lazy_tensor`) on that thread after their bytes are written and flushed to
    `file`, marks it done (the first opens the file being written, by its name: the rename
    keeps the inode). Once tensors 0..k are all done, the file's bytes up to tensor k's end
    are final (gaps between tensors are holes that read as zeros) and the hash thread reads
    and hashes them, so it runs beside the write instead of after it: at 7B the write leaves
    most of a core idle and the 15 GB hash took 11-20 s after it (docs/BENCHMARKS.md, session
    15). A tensor that never reports (not one of dsc's lazy tensors) holds the hash until
    `finished()`, after which the rest of the file is hashed (from `path`, the destination,
    when no tensor reported). `digest` (a `concurrent.futures.Future`) is the hex digest; None
    when the offsets were not in index order (the caller hashes the file itself); it raises
    `HashCancelled` once `stop` is set before the hash is done."""

    CHUNK = 8 << 20

    def __init__(self, path: Path, *, stop: threading.Event):
        self._path = path
        self._stop = stop
        self._cond = threading.Condition()
        self._spans: dict[int, tuple[int, int]] = {}
        self._done: set[int] = set()
        self._writing: dict[int, int] = {}  # thread ident -> index it writes
        self._next = 0  # the lowest index not known to be written
        self._safe = 0  # bytes [0, _safe) are final
        self._finished = False
        self._unordered = False
        self._file = None  # the file being written, opened for reading
        self.digest: concurrent.futures.Future | None = None

    def start(self) -> None:
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dsc-hash-data")
        self.digest = pool.submit(self._run)
        pool.shutdown(wait=False)

    def started(self, index: int, offset: int, nbytes: int) -> None:
        with self._cond:
            if offset < self._safe:
                self._unordered = True  # not onnx_ir's layout: hash after the write instead
            self._spans[index] = (offset, offset + nbytes)
            self._writing[threading.get_ident()] = index

    def written(self, file) -> None:
        with self._cond:
            index = self._writing.pop(threading.get_ident(), None)
            if index is None:
                return
            if self._file is None:
                self._file = open(file.name, "rb", buffering=0)  # noqa: SIM115 (closed in _run)
            self._done.add(index)
            while self._next in self._done:
                self._safe = max(self._safe, self._spans[self._next][1])
                self._next += 1
            self._cond.notify_all()

    def finished(self) -> None:
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def _run(self) -> str | None:
        import hashlib

        from dsc.models.checkpoint import HashCancelled, hash_into

        h = hashlib.sha256()
        view = memoryview(bytearray(self.CHUNK))
        pos = 0
        try:
            while True:
                with self._cond:
                    while pos >= self._safe and not self._finished and not self._stop.is_set():
                        self._cond.wait(0.2)
                    finished, limit, unordered = self._finished, self._safe, self._unordered
                    if finished and self._file is None:
                        self._file = open(self._path, "rb", buffering=0)  # noqa: SIM115
                if self._stop.is_set():
                    raise HashCancelled(f"hashing {self._path} cancelled")
                if unordered:
                    return None
                # bytes [pos, limit) are final; once finished, the rest of the file is
                pos = hash_into(
                    h, self._file, view, pos=pos, end=None if finished else limit, stop=self._stop
                )
                if finished:
                    return h.hexdigest()
        finally:
            with self._cond:
                if self._file is not None:
                    self._file.close()


def trace_dynamic_shapes(num_past: int) -> dict:
    """`torch.export`'s `dynamic_shapes` for the wrapper's inputs (`KVCacheWrapper`): one
    `batch`, `seq` and `past` dimension shared by every input that has it, the mask's length
    left to the tracer (`Dim.AUTO`: past + seq); `num_past` cache tensors."""
    import torch

    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=1)
    past = torch.export.Dim("past", min=0)
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in range(num_past)),
    }


def _trace(wrapper, args, family: Family, num_layers: int, opset: int | None, *, optimize: bool):
    """`torch.onnx.export(dynamo=True)` of the wrapper with dsc's dynamic shapes and names."""
    import torch

    dynamic_shapes = trace_dynamic_shapes(len(args) - 3)
    input_names = [
        "input_ids",
        "attention_mask",
        "position_ids",
        *cache_names(family, num_layers, "past_key_values"),
    ]
    output_names = ["logits", *cache_names(family, num_layers, "present")]
    try:
        with (
            family.export_patches(),
            warnings.catch_warnings(),
            torch.no_grad(),
            _quiet_loggers("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"),
        ):
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                optimize=optimize,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; the first line says what failed
        summary = _exporter_summary(e)
        arch = type(wrapper.model).__name__
        raise BackendError(f"ONNX export of {arch} failed: {summary}") from None


def _attach_weights(model, sources, buffers: dict, is_fake) -> dict[str, str]:
    """Give each data-less (fake) initializer of a streaming trace a tensor read when written.

    Initializer names are the wrapper's parameter names (`model.` + the transformers state-dict
    key). Returns {initializer name: state-dict key} of the lazy ones. Raises `BackendError`
    for an initializer with no checkpoint tensor or buffer."""
    keys: dict[str, str] = {}
    for name, value in model.graph.initializers.items():
        if not is_fake(getattr(value.const_value, "raw", None)):
            continue
        key = name.removeprefix("model.")
        if key in buffers:
            value.const_value = _ir_tensor(buffers[key], name)
        elif key in sources:
            value.const_value = _checkpoint_tensor(
                sources,
                key,
                None,
                dtype=value.const_value.dtype,
                shape=value.const_value.shape,
                name=name,
            )
            keys[name] = key
        else:
            raise BackendError(f"initializer {name} of the traced graph has no checkpoint tensor")
    return keys


def _fold_weight_transposes(model, sources, weights: dict) -> None:
    """Fold `Transpose(weight)` into a lazily transposed initializer before the optimizer runs.

    `weights`: {initializer value: (state-dict key, None)} of the checkpoint weights
    (`_attach_weights`); a weight in it is read straight into its transposed layout
    (`CheckpointSources.materialize(perm=...)`) and its entry becomes the transposed
    initializer's, (key, perm); any other weight is transposed through its numpy value.

    The exporter's optimizer (onnxscript's constant folding) always folds a Transpose whose
    large constant input has no other consumer (`_DEFAULT_ALWAYS_FOLD_OPS`): every linear
    layer's `W` becomes an in-memory `W^T` initializer, which is most of the 2x peak of the
    in-memory export. Done here first, with the same name (the Transpose output's) and the
    same values, the result stays lazy and the optimizer finds nothing left to fold."""
    import numpy as np
    import onnx_ir as ir
    from onnxscript.optimizer import FOLDED_FROM_KEY

    graph = model.graph
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        (src,) = node.inputs
        if src is None or src.const_value is None or not src.is_initializer():
            continue
        if len(src.consumers()) != 1:
            continue
        # A checkpoint weight is folded whatever its size, so that every layer's weights are
        # (key, permutation) recipes (`dsc.export.by_kind`); the optimizer would fold a small
        # one itself, into the same values under the same name.
        if src not in weights and src.const_value.size <= _FOLD_INPUT_SIZE_LIMIT:
            continue
        perm = node.attributes.get_ints("perm")
        out = node.outputs[0]
        tensor = src.const_value

        key = weights[src][0] if src in weights else None
        order = tuple(perm) if perm is not None else tuple(range(len(tensor.shape)))[::-1]
        shape = ir.Shape([tensor.shape[i] for i in order])
        if key is not None:
            lazy = _checkpoint_tensor(
                sources, key, order, dtype=tensor.dtype, shape=shape, name=out.name
            )
        else:

            def transposed(tensor=tensor, order=order, name=out.name):
                a = np.transpose(tensor.numpy(), order)
                return ir.Tensor(np.ascontiguousarray(a), name=name)

            lazy = _lazy_tensor(transposed, dtype=tensor.dtype, shape=shape, name=out.name)
        value = ir.Value(
            name=out.name, type=ir.TensorType(tensor.dtype), shape=shape, const_value=lazy
        )
        # what the folder records on a value it folds (public: onnxscript.optimizer)
        folded_from = {src.name, *src.meta.get(FOLDED_FROM_KEY, set())}
        value.meta[FOLDED_FROM_KEY] = folded_from
        value.metadata_props[FOLDED_FROM_KEY] = repr(sorted(folded_from))
        if key is not None:
            del weights[src]
            weights[value] = (key, order)
        graph.remove(node, safe=False)
        ir.convenience.replace_all_uses_with(out, value)
        graph.register_initializer(value)
        graph.initializers.pop(src.name)


def _checkpoint_tensor(sources, key: str, perm, *, dtype, shape, name: str):
    """A lazy initializer `name` holding state-dict tensor `key` (permuted by `perm`, or not),
    read from the checkpoint (`CheckpointSources.materialize`) each time it is written.
    `source_key` and `source_perm` on it say which (`_save_external` returns where they went)."""
    tensor = _lazy_tensor(
        lambda: _ir_tensor(sources.materialize(key, perm=perm), name),
        dtype=dtype,
        shape=shape,
        name=name,
    )
    tensor.source_key, tensor.source_perm = key, tuple(perm) if perm is not None else None
    return tensor


def _lazy_tensor(func, **kwargs):
    """An `onnx_ir.LazyTensor` (not cached) whose `tofile` writes the evaluated array directly.

    `LazyTensor` inherits `tofile` = `file.write(self.tobytes())`, a third copy of the tensor
    while it is written; the evaluated `ir.Tensor` writes its numpy array with no copy. After
    the write it flushes `file` and calls `on_written` when that is set (`_FollowingHash`)."""
    import onnx_ir as ir

    class _WriteThrough(ir.LazyTensor):
        on_written = None  # set by `_save_external` for a `_FollowingHash`

        def tofile(self, file) -> None:
            self._evaluate().tofile(file)
            if self.on_written is not None:
                file.flush()
                self.on_written(file)

    return _WriteThrough(func, **kwargs)


# onnxscript's DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT: above it, only Transpose is folded.
_FOLD_INPUT_SIZE_LIMIT = 8192


def _ir_tensor(t, name: str):
    """A CPU torch tensor as an onnx_ir tensor (bf16 through ml_dtypes, numpy has none)."""
    import ml_dtypes
    import onnx_ir as ir
    import torch

    if t.dtype == torch.bfloat16:
        return ir.Tensor(
            t.contiguous().view(torch.uint16).numpy().view(ml_dtypes.bfloat16), name=name
        )
    return ir.Tensor(t.contiguous().numpy(), name=name)


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
