"""Inspect a Hugging Face checkpoint directory before anything heavy touches it.

Every problem a user can cause is found here and reported as one line (`CheckpointError`, exit 3,
or `Unsupported`, exit 4): a missing directory, a missing or invalid `config.json`, an
architecture dsc has no adapter for, weights only in pickle files (refused unless allowed: a
pickle runs code when loaded), and a truncated or corrupt `.safetensors` file. Safetensors files
are checked from their header alone (8-byte length, JSON header, the byte ranges it declares
against the file size), so a 3 GB shard costs a few kilobytes of reading.

Quantized checkpoints: DeepSeek-V3/R1 are published with FP8 block weights (`quantization_config:
{quant_method: fp8, fmt: e4m3, weight_block_size: [128, 128]}`, see `dsc.models.weights`), which
dsc dequantizes as it reads them; any other `quant_method` (gptq, awq, compressed-tensors,
bitsandbytes, ...), or FP8 in another format, is `Unsupported` here, before any weight is read.
A sharded checkpoint's index may only name shard files inside the checkpoint directory, and no
file dsc reads may be a symbolic link (`dsc.paths`; the Hugging Face cache's links into its
`blobs/` excepted). `config.json` is checked for types and ranges (`dsc.models.config_check`) and
against the tensors the shards actually hold (layer count, embedding shape); `tokenizer.json`
must load. All of this happens before any weight is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from dsc.errors import BadInput, CheckpointError, Unsupported
from dsc.models.families import Family, family_for_architecture, supported_architectures
from dsc.paths import cache_dir, cache_switch, hub_blobs, read_text_bounded, regular_file

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}


@dataclass(frozen=True)
class FP8Blocks:
    """DeepSeek's FP8 layout: float8_e4m3fn weights, one float32 `weight_scale_inv` per block."""

    block: tuple[int, int]
    method: str = "fp8"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint directory holds, checked."""

    path: Path
    config: dict
    architecture: str
    family: Family
    weight_files: tuple[Path, ...]
    weight_format: str  # "safetensors" or "pickle"
    tokenizer_files: tuple[Path, ...]
    num_parameters: int = 0
    weight_bytes: int = 0
    quantization: FP8Blocks | None = None
    extra: dict = field(default_factory=dict)

    def input_files(self) -> list[Path]:
        """Every file the export reads: config, weights (and index), tokenizer."""
        files = [self.path / "config.json", *self.weight_files, *self.tokenizer_files]
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files.append(index)
        return files


def inspect_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> CheckpointInfo:
    """Check a checkpoint directory and describe it; raise a one-line error if it is unusable."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint must be a directory holding config.json: {path}")
    if not (path / "config.json").exists() and not (path / "config.json").is_symlink():
        raise CheckpointError(f"missing config.json in {path}")
    config = read_config(_file(path, "config.json"))
    architecture = _architecture(config, path)
    family = family_for_architecture(architecture)
    if family is None:
        raise Unsupported(
            f"unsupported architecture {architecture!r} in {path / 'config.json'}; "
            f"supported: {', '.join(supported_architectures())}"
        )
    quantization = checkpoint_quantization(config, path)
    from dsc.models.config_check import check_config

    check_config(config, str(path / "config.json"))
    weight_files, fmt = _find_weights(path, allow_pickle)
    num_params = 0
    weight_bytes = 0
    if fmt == "safetensors":
        dtypes: dict[str, str] = {}
        shapes: dict[str, list[int]] = {}
        for f in weight_files:
            n, b, header = _scan_safetensors(f)
            num_params += n
            weight_bytes += b
            for name, meta in header.items():
                if name in dtypes:
                    raise CheckpointError(
                        f"tensor {name} is stored in more than one shard of {path}"
                    )
                dtypes[name] = meta["dtype"]
                shapes[name] = list(meta["shape"])
        _check_fp8_tensors(dtypes, quantization, path)
        _check_against_config(shapes, config, path)
    tokenizer_files = tuple(
        _file(path, n) for n in TOKENIZER_FILES if (path / n).exists() or (path / n).is_symlink()
    )
    if not any(
        p.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for p in tokenizer_files
    ):
        raise CheckpointError(f"no tokenizer in {path} (expected tokenizer.json)")
    _check_tokenizer(path)
    return CheckpointInfo(
        path=path,
        config=config,
        architecture=architecture,
        family=family,
        weight_files=tuple(weight_files),
        weight_format=fmt,
        tokenizer_files=tokenizer_files,
        num_parameters=num_params,
        weight_bytes=weight_bytes,
        quantization=quantization,
    )


def _file(path: Path, name: str) -> Path:
    """A file of the checkpoint: inside it, regular, not a link (bar the hub cache's)."""
    try:
        return regular_file(path, name, what="checkpoint file", links_into=hub_blobs(path))
    except BadInput as e:
        raise CheckpointError(str(e)) from None


_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.")


def _check_against_config(shapes: dict[str, list[int]], config: dict, path: Path) -> None:
    """The config's layer count and embedding shape against the tensors the shards hold."""
    where = path / "config.json"
    layers = config["num_hidden_layers"]
    mtp = int(config.get("num_nextn_predict_layers") or 0)
    held = sorted({int(m.group(1)) for name in shapes if (m := _LAYER_TENSOR.match(name))})
    decoder = [i for i in held if i < layers]
    beyond = [i for i in held if i >= layers + mtp]
    if beyond:
        raise CheckpointError(
            f"{where} says num_hidden_layers {layers}, but the checkpoint holds tensors of layer "
            f"{beyond[0]}" + (f" (and {mtp} multi-token-prediction layer(s))" if mtp else "")
        )
    if len(decoder) != layers:
        missing = sorted(set(range(layers)) - set(decoder))
        raise CheckpointError(
            f"{where} says num_hidden_layers {layers}, but the checkpoint holds tensors of "
            f"{len(decoder)} decoder layer(s); none for layer {missing[0]}"
        )
    embed = shapes.get("model.embed_tokens.weight")
    want = [config["vocab_size"], config["hidden_size"]]
    if embed is not None and embed != want:
        raise CheckpointError(
            f"model.embed_tokens.weight is {embed}, but {where} says vocab_size x hidden_size "
            f"= {want}"
        )


def _check_tokenizer(path: Path) -> None:
    """tokenizer.json must load (a garbage one would otherwise pass export and build)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (path / name).is_file():
            try:
                data = json.loads(read_text_bounded(path / name, what=name))
            except ValueError as e:
                raise CheckpointError(f"invalid {name} in {path}: {e}") from None
            except BadInput as e:
                raise CheckpointError(str(e)) from None
            if not isinstance(data, dict):
                raise CheckpointError(f"invalid {name} in {path}: not a JSON object")
    if not (path / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer

    try:
        text = read_text_bounded(path / "tokenizer.json", what="tokenizer.json", kind="text")
        Tokenizer.from_str(text)
    except BadInput as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # the tokenizers library raises plain Exception
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"tokenizer.json in {path} does not load: {first}") from None


def checkpoint_quantization(config: dict, path: Path) -> FP8Blocks | None:
    """The checkpoint's weight quantization: None, DeepSeek's FP8 blocks, or `Unsupported`."""
    q = config.get("quantization_config")
    if q is None:
        return None
    where = path / "config.json"
    if not isinstance(q, dict):
        raise CheckpointError(f"invalid quantization_config in {where}: not a JSON object")
    method = q.get("quant_method")
    supported = (
        "dsc reads unquantized checkpoints and DeepSeek's FP8 block layout (quant_method "
        "fp8, fmt e4m3, weight_block_size [m, n], dynamic activations); dequantize it "
        "to bf16 first"
    )
    if method != "fp8":
        raise Unsupported(
            f"checkpoint quantized with quant_method {method!r} ({where}); {supported}"
        )
    fmt = q.get("fmt", "e4m3")
    block = q.get("weight_block_size")
    scheme = q.get("activation_scheme", "dynamic")
    if fmt != "e4m3":
        raise Unsupported(f"FP8 checkpoint with fmt {fmt!r} ({where}); {supported}")
    if not (
        isinstance(block, list)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise Unsupported(f"FP8 checkpoint with weight_block_size {block!r} ({where}); {supported}")
    if scheme != "dynamic":
        raise Unsupported(
            f"FP8 checkpoint with activation_scheme {scheme!r} ({where}); {supported}"
        )
    return FP8Blocks(block=(block[0], block[1]))


def _check_fp8_tensors(dtypes: dict[str, str], quantization: FP8Blocks | None, path: Path) -> None:
    """FP8 tensors need the fp8 quantization_config and a scale sibling; E5M2 is not DeepSeek's."""
    for name, dtype in dtypes.items():
        if not dtype.startswith("F8"):
            continue
        if dtype != "F8_E4M3":
            raise Unsupported(
                f"tensor {name} in {path} is stored as {dtype}; dsc reads FP8 "
                "weights in DeepSeek's E4M3 block layout only"
            )
        if quantization is None:
            raise CheckpointError(
                f"tensor {name} in {path} is stored as {dtype} but config.json "
                "has no FP8 quantization_config"
            )
        if name + "_scale_inv" not in dtypes:
            raise CheckpointError(f"FP8 tensor {name} in {path} has no {name}_scale_inv")


def read_config(config_path: Path) -> dict:
    if not config_path.is_file():
        raise CheckpointError(f"missing config.json in {config_path.parent}")
    try:
        config = json.loads(read_text_bounded(config_path, what="config.json"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"invalid config.json ({config_path}): {e}") from None
    except BadInput as e:
        raise CheckpointError(f"invalid config.json ({config_path}): {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"invalid config.json ({config_path}): not a JSON object")
    return config


def _architecture(config: dict, path: Path) -> str:
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    raise CheckpointError(
        f"config.json in {path} has no 'architectures' list; supported: "
        f"{', '.join(supported_architectures())}"
    )


def _find_weights(path: Path, allow_pickle: bool) -> tuple[list[Path], str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        _file(path, index.name)
        try:
            weight_map = json.loads(read_text_bounded(index, what=index.name))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"invalid {index.name} in {path}: {e}") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v for v in weight_map.values()
        ):
            raise CheckpointError(
                f"invalid {index.name} in {path}: weight_map must map tensor "
                "names to shard file names"
            )
        names = sorted(set(weight_map.values()))
        for n in names:
            # A shard must be a file of this checkpoint: the index is input, and "../x" or an
            # absolute path would make dsc read (and hash into the manifest) a file elsewhere.
            if any(
                p.is_absolute() or p.drive or ".." in p.parts
                for p in (PurePosixPath(n), PureWindowsPath(n))
            ):
                raise CheckpointError(
                    f"{index.name} in {path} names shard {n!r} outside the checkpoint directory"
                )
        missing = [n for n in names if not (path / n).exists() and not (path / n).is_symlink()]
        if missing:
            raise CheckpointError(
                f"shards listed in {index.name} are missing: {', '.join(missing)}"
            )
        return [_file(path, n) for n in names], "safetensors"
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return [_file(path, p.name) for p in shards], "safetensors"
    pickles = [
        _file(path, p.name)
        for p in sorted(path.iterdir())
        if p.suffix in _PICKLE_SUFFIXES and (p.is_file() or p.is_symlink())
    ]
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} holds only pickle weights ({pickles[0].name}); pickle files can run code "
                "when loaded: convert them to safetensors, or pass --allow-pickle if you trust them"
            )
        logger.warning("loading pickle weights from %s (--allow-pickle)", path)
        return pickles, "pickle"
    raise CheckpointError(f"no weights in {path} (expected model.safetensors or shards)")


def check_safetensors(file: Path) -> tuple[int, int]:
    """Validate a safetensors file's header against its size; return (#params, data bytes)."""
    num, data_len, _ = _scan_safetensors(file)
    return num, data_len


def _scan_safetensors(file: Path) -> tuple[int, int, dict]:
    """`check_safetensors`, plus the header's tensor entries (name → dtype, shape, offsets)."""
    size = file.stat().st_size
    try:
        with file.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt safetensors file {file}: {e}") from None
    data_len = size - 8 - n
    num = 0
    end_max = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        why = _bad_entry(meta)
        if why:
            raise CheckpointError(f"corrupt safetensors file {file}: entry {name!r} {why}")
        begin, end = meta["data_offsets"]
        count = math.prod(meta["shape"])
        nbytes = count * _DTYPE_BYTES[meta["dtype"]]
        if end - begin != nbytes or end > data_len:
            raise CheckpointError(
                f"truncated or corrupt safetensors file {file}: tensor {name!r} needs bytes "
                f"{begin}..{end} but the file holds {data_len} data bytes"
            )
        num += count
        end_max = max(end_max, end)
    if end_max != data_len:
        raise CheckpointError(
            f"corrupt safetensors file {file}: header covers {end_max} bytes, file holds {data_len}"
        )
    header.pop("__metadata__", None)
    return num, data_len, header


def _bad_entry(meta) -> str | None:
    """Why a safetensors header entry is malformed (None: it is well formed)."""
    if not isinstance(meta, dict):
        return "is not a JSON object"
    if meta.get("dtype") not in _DTYPE_BYTES:
        return f"has an unknown dtype {meta.get('dtype')!r}"
    shape, offsets = meta.get("shape"), meta.get("data_offsets")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        return f"has shape {shape!r}; expected a list of non-negative integers"
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        return f"has data_offsets {offsets!r}; expected [begin, end] integers, begin <= end"
    return None


class HashCancelled(Exception):
    """`sha256_file` stopped by its `stop` event."""


# The sha256 cache (`sha256_file_cached`): at most this many entries, the oldest going first;
# a file changed less than this many seconds ago is not remembered.
HASH_CACHE_MAX_ENTRIES = 4096
HASH_CACHE_MIN_AGE_S = 2.0


def hash_cache_dir() -> Path:
    """`$DSC_CACHE_DIR/sha256` (default `~/.cache/dsc/sha256`)."""
    return cache_dir("sha256")


def hash_cache_enabled() -> bool:
    """Whether `sha256_file_cached` remembers digests (`$DSC_HASH_CACHE`, default on; "0" off)."""
    return cache_switch("DSC_HASH_CACHE")


def _file_identity(path: Path, st: os.stat_result) -> str:
    fields = [
        str(Path(path).resolve()),
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
    ]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def sha256_file_cached(path: Path, *, stop=None) -> str:
    """`sha256_file(path)`, remembered for the file as it is now, for the checkpoint a stage
    reads again and again (a 7B's 15 GB take about 8 s to hash on this host's one core).

    The entry's name is a digest of the file's resolved path, device, inode, size,
    modification time and inode change time (ns), as git's index and ccache key a file's
    content on its stat data: any write to the file changes its ctime, which no user call can
    set back (`os.utime` sets mtime only), so a file changed since it was hashed is hashed
    again. A digest is stored only if those fields were the same after the hash as before
    (a file written while it was read is never remembered) and the file last changed at least
    `HASH_CACHE_MIN_AGE_S` ago: the kernel stamps times from a coarse clock (a tick of up to
    a few ms), so a file written twice within one tick could keep its stat data ("racy git",
    which git handles the same way). An unreadable or malformed entry is ignored.
    `$DSC_HASH_CACHE=0` turns the cache off; entries live in `hash_cache_dir()`, at most
    `HASH_CACHE_MAX_ENTRIES` (64 bytes each). Raises what `sha256_file` raises."""
    if not hash_cache_enabled():
        return sha256_file(path, stop=stop)
    identity = _file_identity(path, os.stat(path))
    entry = hash_cache_dir() / f"{identity}.sha256"
    try:
        known = entry.read_text(encoding="ascii").strip()
        if re.fullmatch(r"[0-9a-f]{64}", known):
            return known
    except (OSError, UnicodeDecodeError):
        pass
    digest = sha256_file(path, stop=stop)
    after = os.stat(path)
    changed = max(after.st_mtime_ns, after.st_ctime_ns)
    settled = time.time_ns() - changed >= HASH_CACHE_MIN_AGE_S * 1e9
    if settled and _file_identity(path, after) == identity:
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(digest + "\n", encoding="ascii")
            os.replace(tmp, entry)
            _prune_hash_cache(entry.parent)
        except OSError:  # a cache that cannot be written is no cache, not an error
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return digest


def _prune_hash_cache(directory: Path) -> None:
    entries = list(directory.glob("*.sha256"))
    if len(entries) <= HASH_CACHE_MAX_ENTRIES:
        return

    def age(p: Path) -> int:
        try:
            return p.stat().st_mtime_ns
        except OSError:  # removed meanwhile by another process
            return 0

    entries.sort(key=age)
    for p in entries[: len(entries) - HASH_CACHE_MAX_ENTRIES]:
        with contextlib.suppress(OSError):
            p.unlink()


def sha256_file(path: Path, chunk: int = 8 * 2**20, *, stop=None) -> str:
    """sha256 of a file's bytes (hex), read `chunk` bytes at a time into one reused buffer.
    `stop`: a `threading.Event` checked before each chunk; once set, `HashCancelled` is raised
    (for a hash running beside work that failed), never a digest of part of the file.

    The reused buffer matters: `read(chunk)` makes a fresh 8 MiB object per chunk, each a new
    mapping the kernel zeroes and faults in; hashing the 1.5B's 3.55 GB model.onnx.data took
    3.4 s that way and 2.6 s with `readinto` (this host; sha256 itself, with SHA-NI, is about
    1.8 GB/s: `openssl speed -evp sha256`)."""
    h = hashlib.sha256()
    with Path(path).open("rb", buffering=0) as fh:
        hash_into(h, fh, memoryview(bytearray(chunk)), stop=stop)
    return h.hexdigest()


def hash_into(h, fh, view: memoryview, *, pos: int = 0, end: int | None = None, stop=None) -> int:
    """Feed hash `h` the bytes [pos, end) of the unbuffered binary file `fh` (to its end for
    None), read into the reused buffer `view` a chunk at a time (`sha256_file`); returns the
    position reached. `stop`: as in `sha256_file` (`HashCancelled`); a file that ends before
    `end` is an `OSError`."""
    fh.seek(pos)
    while end is None or pos < end:
        if stop is not None and stop.is_set():
            raise HashCancelled(f"hashing {fh.name} cancelled")
        n = fh.readinto(view if end is None else view[: min(len(view), end - pos)])
        if not n:
            if end is not None:
                raise OSError(f"{fh.name} ended at {pos} bytes, before {end}")
            break
        h.update(view[:n])
        pos += n
    return pos
