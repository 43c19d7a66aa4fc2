"""The traced template graph of an architecture, kept on disk and reused by later exports.

A streaming export with `--trace-layers kinds` (`dsc.export.by_kind`) traces the model cut to its
first m layers and copies those layers for the rest. The cut's optimized graph depends on the
config and the tools, never on the weights: every checkpoint weight in it is a lazy tensor read
when the graph is written. So it is cached, and an export of a checkpoint with the same config
(another build of the same model, another dtype of a matrix, a rerun) skips `torch.export`, the
ONNX translation and the optimizer: about 10 of the 45 CPU seconds of an fp16 export of
DeepSeek-R1-Distill-Qwen-1.5B on a 2-core host (docs/BENCHMARKS.md, session 12).

Key (`trace_key`): sha256 of the cut config (`PretrainedConfig.to_dict()`, canonical JSON, less
`PROVENANCE`: where the config was loaded from and which transformers wrote it), the
architecture, the graph dtype, the opset, the versions of torch, transformers, onnx, onnxscript
and onnx-ir, dsc's version, and the bytes of dsc's export and model-adapter sources
(`dsc/export/*.py`, `dsc/models/*.py`): anything that can change the traced graph.

Entry: `$DSC_CACHE_DIR/trace/<key>.onnx` (default `~/.cache/dsc/trace`), one ONNX model, the
optimized cut graph in which each checkpoint weight is an external-data reference to
`PLACEHOLDER` (no bytes), and in the model's metadata `METADATA_KEY` the JSON
{initializer name: [state-dict key, permutation or null]}. It is written to a temporary name
and renamed, so a reader never sees half an entry; an entry that fails any check on load
(`load`) is deleted and the model traced again. At most `MAX_ENTRIES` entries are kept, the
least recently used going first (an entry is a few hundred KB to a few MB).

`DSC_TRACE_CACHE=0` turns the cache off (every export traces). The cached graph and a fresh
trace write the same files, byte for byte (tests/test_trace_cache.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path

from dsc import paths

__all__ = [
    "MAX_ENTRIES",
    "PROVENANCE",
    "cache_path",
    "enabled",
    "load",
    "serialize",
    "store",
    "trace_key",
]

PLACEHOLDER = "dsc-checkpoint-weight"
METADATA_KEY = "dsc.trace_cache.weights"
FORMAT = 1
MAX_ENTRIES = 64
_DISTS = ("torch", "transformers", "onnx", "onnxscript", "onnx-ir")
# Config fields that say where a config came from, not what the model computes: the directory it
# was loaded from (transformers sets it) and the transformers version that wrote config.json
# (the installed one is in the key). Keyed on them, a copy of a checkpoint in another
# directory, or a fine-tune of the same model, missed the entry and was traced again.
PROVENANCE = ("_name_or_path", "transformers_version")


def enabled() -> bool:
    """Whether exports use the trace cache (`$DSC_TRACE_CACHE`, default on; "0" turns it off)."""
    return paths.cache_switch("DSC_TRACE_CACHE")


def cache_dir() -> Path:
    return paths.cache_dir("trace")


def cache_path(key: str) -> Path:
    return cache_dir() / f"{key}.onnx"


def trace_key(config: dict, *, architecture: str, dtype: str, opset: int | None) -> str:
    """The cache key (module docstring) of the cut model with transformers config dict `config`
    (its `PROVENANCE` fields left out), traced in graph dtype `dtype` (the torch dtype as text,
    e.g. "torch.float16") at `opset` (None: the exporter's)."""
    from dsc import __version__

    config = {k: v for k, v in config.items() if k not in PROVENANCE}

    versions = {}
    for dist in _DISTS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    sources = hashlib.sha256()
    package = Path(__file__).resolve().parent.parent
    for sub in ("export", "models"):
        for f in sorted((package / sub).glob("*.py")):
            sources.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    record = {
        "format": FORMAT,
        "config": config,
        "architecture": architecture,
        "dtype": dtype,
        "opset": opset,
        "versions": versions,
        "dsc": __version__,
        "sources": sources.hexdigest(),
    }
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def serialize(model, weights: dict) -> bytes:
    """The entry for the optimized cut graph `model` (an `onnx_ir.Model`) whose checkpoint
    weights are `weights` ({initializer value: (state-dict key, permutation or None)}): the
    model's bytes with each of those initializers an external reference to `PLACEHOLDER`.
    `model` is left as it was."""
    import onnx_ir as ir

    saved = {}
    mapping = {}
    for value, (key, perm) in weights.items():
        tensor = value.const_value
        saved[value] = tensor
        mapping[value.name] = [key, list(perm) if perm is not None else None]
        value.const_value = ir.ExternalTensor(
            PLACEHOLDER, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=tensor.name
        )
    model.metadata_props[METADATA_KEY] = json.dumps(mapping, sort_keys=True)
    try:
        return ir.serde.serialize_model(model).SerializeToString()
    finally:
        del model.metadata_props[METADATA_KEY]
        for value, tensor in saved.items():
            value.const_value = tensor


def store(key: str, data: bytes) -> Path | None:
    """Write entry `data` (`serialize`) as `key`, atomically; drop the least recently used
    entries beyond `MAX_ENTRIES`. Returns the path, or None when the cache directory cannot be
    written (the export goes on without it)."""
    path = cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:
        return None
    _prune(keep=path)
    return path


def _prune(keep: Path) -> None:
    entries = []
    for f in cache_dir().glob("*.onnx"):
        with contextlib.suppress(OSError):
            entries.append((f.stat().st_mtime, f))
    entries.sort(reverse=True)
    for _, f in entries[MAX_ENTRIES:]:
        if f != keep:
            with contextlib.suppress(OSError):
                f.unlink()


class Unusable(Exception):
    """A cache entry that cannot be used (message: why); `load` deletes it."""


def load(key: str, *, expected):
    """The cached cut graph for `key` and its weights, or None when there is no entry.

    `expected(key) -> (dtype, shape) or None`: the `onnx_ir` dtype and the (unpermuted) shape of
    a state-dict tensor of the model being exported, None if its checkpoint lacks it. Returns
    (model, {initializer value: (state-dict key, permutation or None)}); the weights' values
    still hold placeholders, which the caller replaces with tensors read from the checkpoint.
    Raises `Unusable` (after deleting the entry) when the entry does not parse, its mapping
    names an initializer that is not a placeholder, a placeholder has no mapping, or a weight's
    key, dtype or shape disagrees with `expected`."""
    import onnx_ir as ir

    path = cache_path(key)
    try:
        data = path.read_bytes()
    except OSError:  # no entry, or a cache directory that cannot be read: trace
        return None
    try:
        import onnx

        proto = onnx.ModelProto()
        proto.ParseFromString(data)
        model = ir.serde.deserialize_model(proto)
        mapping = json.loads(model.metadata_props.pop(METADATA_KEY))
        weights = {}
        inits = model.graph.initializers
        for name, (key_, perm) in mapping.items():
            value = inits.get(name)
            tensor = value.const_value if value is not None else None
            if not isinstance(tensor, ir.ExternalTensor) or tensor.location != PLACEHOLDER:
                raise Unusable(f"initializer {name} is not a placeholder")
            want = expected(key_)
            if want is None:
                raise Unusable(f"the checkpoint has no tensor {key_}")
            dtype, shape = want
            perm = tuple(perm) if perm is not None else None
            shape = tuple(shape[i] for i in perm) if perm is not None else tuple(shape)
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise Unusable(
                    f"{name}: {tensor.dtype} {list(tensor.shape)} in the cache, the model's "
                    f"{key_} is {dtype} {list(shape)}"
                )
            weights[value] = (key_, perm)
        held = set(mapping)
        for name, value in inits.items():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and name not in held:
                raise Unusable(f"initializer {name} is external but not a mapped weight")
    except Exception as e:  # a corrupt or foreign file: any parse error means "trace again"
        with contextlib.suppress(OSError):
            path.unlink()
        if isinstance(e, Unusable):
            raise
        raise Unusable(f"{type(e).__name__}: {e}") from None
    with contextlib.suppress(OSError):
        os.utime(path)  # least recently used goes first (`_prune`)
    return model, weights
