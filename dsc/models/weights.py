"""Read a safetensors checkpoint one tensor at a time: memory-mapped, dequantized, checked, cast.

`WeightReader` is the single way dsc reads checkpoint tensors. Each `read(name)` maps one tensor
from its shard (`safetensors.safe_open`, so nothing else is paged in), and:

- dequantizes DeepSeek's FP8 blocks: a float8_e4m3fn `<x>.weight` with its float32 sibling
  `<x>.weight_scale_inv` (one scale per block of `weight_block_size`, 128×128 in V3/R1; edge
  blocks are partial, e.g. the 576 = 512 + 64 rows of `kv_a_proj_with_mqa` are 5 row blocks)
  becomes `w = fp8.float() * scale_inv` with each scale broadcast over its block. The scale
  sibling is folded into its weight: it never appears as a name of its own;
- leaves out the tensors of the multi-token-prediction layers (`model.layers.<L>.*` for
  L ≥ num_hidden_layers, `num_nextn_predict_layers` of them), which next-token inference never
  runs; `skipped` lists them;
- checks every tensor for NaN/Inf (FP8: the scales, and the weight after dequantization), and,
  when the export dtype is narrower than the stored one, that the cast will not overflow (an
  fp16 export of a bf16 weight above 65504 would turn it into inf): both `CheckpointError`
  naming the tensor. One `aminmax` per tensor does both checks;
- casts to the requested dtype.

`lazy_state_dict()` hands the same reads to transformers' own loader (`from_pretrained(None,
state_dict=...)`), whose key conversion (e.g. per-expert `mlp.experts.<e>.gate_proj.weight` fused
into 3-D `gate_up_proj`) then applies unchanged: transformers materialises each value with
`value[...]` and casts it to the parameter's dtype, exactly as it does with the safetensors slices
it would have opened itself, so loading needs no more memory than before (one dequantized tensor
per loader thread on top). The streaming export will consume `iter(reader)` directly.
"""

from __future__ import annotations

import json
import math
import re
import struct
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from dsc.errors import CheckpointError

SCALE_SUFFIX = "_scale_inv"
# Source rows per tile of a transposed copy (`copy_transposed`): 256 rows of 64-byte cache
# lines are 16 KiB, inside any x86 L1d.
TRANSPOSE_TILE_ROWS = 256
_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def dequantize_fp8_blocks(weight, scale_inv, block: tuple[int, int], *, name: str = "weight"):
    """float32 `weight * scale_inv`, each scale broadcast over its `block` (edge blocks partial).

    `weight` is [rows, cols] (any dtype, normally float8_e4m3fn), `scale_inv` is
    [ceil(rows / block[0]), ceil(cols / block[1])]. Works one row block at a time, in place, so the
    only full-size allocation is the float32 result.
    """
    import torch

    if weight.ndim != 2:
        raise CheckpointError(f"FP8 tensor {name} has shape {list(weight.shape)}; expected 2-D")
    rows, cols = weight.shape
    br, bc = block
    grid = (-(-rows // br), -(-cols // bc))
    if tuple(scale_inv.shape) != grid:
        raise CheckpointError(
            f"{name}{SCALE_SUFFIX} has shape {list(scale_inv.shape)}; a {rows}×{cols} weight in "
            f"{br}×{bc} blocks needs {list(grid)}"
        )
    out = weight.to(torch.float32)
    scale = scale_inv.to(torch.float32)
    for i in range(grid[0]):
        # The block's scales repeated along the columns, cut to the (possibly partial) last block.
        row_scale = scale[i].repeat_interleave(bc)[:cols]
        out[i * br : (i + 1) * br].mul_(row_scale)
    return out


def copy_transposed(dst, src) -> None:
    """`dst.copy_(src.T)` for 2-D `src` [rows, cols] into `dst` [cols, rows] (any strides; a
    cast when the dtypes differ), `TRANSPOSE_TILE_ROWS` source rows at a time.

    torch's copy walks `dst` row by row; for each it gathers one element from every source
    row, so with thousands of rows the source's cache lines leave L1 before the next `dst` row
    can use them. In tiles of 256 source rows they stay. Transposed reads of the 1.5B's 197
    MatMul weights (one thread, bf16 to fp16, with the reads and checks): 10.8 s whole, 4.2-4.6 s
    tiled; gate_proj's [8960, 1536] 123 and 34 ms, lm_head's [151936, 1536] 2.0 and 0.84 s
    (`benchmarks/transposed_copy.py`, docs/BENCHMARKS.md)."""
    rows = src.shape[0]
    if tuple(dst.shape) != (src.shape[1], rows):
        raise ValueError(f"cannot copy {list(src.shape)} transposed into {list(dst.shape)}")
    for r in range(0, rows, TRANSPOSE_TILE_ROWS):
        dst[:, r : r + TRANSPOSE_TILE_ROWS].copy_(src[r : r + TRANSPOSE_TILE_ROWS].T)


def mtp_layers(config: dict) -> range:
    """Indices of the multi-token-prediction layers a DeepSeek-V3/R1 checkpoint carries."""
    n = int(config.get("num_hidden_layers") or 0)
    extra = int(config.get("num_nextn_predict_layers") or 0)
    return range(n, n + extra)


class _Lazy:
    """One checkpoint tensor, read when transformers' loader materialises it (`value[...]`)."""

    __slots__ = ("_name", "_reader")

    def __init__(self, reader: WeightReader, name: str):
        self._reader, self._name = reader, name

    def __getitem__(self, index):
        t = self._reader.read(self._name)
        return t if index is Ellipsis else t[index]

    @property
    def shape(self):
        return self._reader.shape(self._name)

    def __repr__(self) -> str:
        return f"_Lazy({self._name!r})"


class WeightReader:
    """Per-tensor access to safetensors shards (see the module docstring).

    `files`: the shards; `fp8_block`: the FP8 block size when the checkpoint is FP8-quantized
    (None: an FP8 tensor is an error); `skip_layers`: decoder-layer indices whose tensors are
    left out (the MTP layers); `dtype`: what `iter()` casts to, and the width the overflow check
    guards (None: no cast).
    """

    def __init__(
        self,
        files: Sequence[Path],
        *,
        fp8_block: tuple[int, int] | None = None,
        skip_layers: Sequence[int] = (),
        dtype=None,
    ):
        from safetensors import SafetensorError, safe_open

        self.dtype = dtype
        self.fp8_block = tuple(fp8_block) if fp8_block else None
        self._files = [Path(f) for f in files]
        self._skip_layers = tuple(skip_layers)
        self._handles = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        self._where: dict[str, Path] = {}
        self._lock = threading.Lock()
        self._chunk_buffers = threading.local()
        try:
            for f in files:
                f = Path(f)
                try:
                    handle = safe_open(str(f), framework="pt", device="cpu")
                except (OSError, SafetensorError) as e:
                    raise CheckpointError(f"cannot open {f}: {e}") from None
                self._handles[f] = handle
                for key in handle.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                    if key in self._where:
                        raise CheckpointError(
                            f"tensor {key} is stored twice: in {self._where[key].name} and {f.name}"
                        )
                    self._where[key] = f
        except BaseException:
            self.close()
            raise
        skip = set(skip_layers)
        names, skipped = [], []
        for key in self._where:
            m = _LAYER.match(key)
            if m and int(m.group(1)) in skip:
                skipped.append(key)
            elif not (key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in self._where):
                names.append(key)
        self.names: tuple[str, ...] = tuple(names)
        self.skipped: tuple[str, ...] = tuple(skipped)
        for key in self.names:
            if self._stored_dtype(key).startswith("F8") and self.fp8_block is None:
                raise CheckpointError(
                    f"tensor {key} is stored as {self._stored_dtype(key)} but config.json has no "
                    "FP8 quantization_config (quant_method fp8, weight_block_size)"
                )

    @classmethod
    def for_checkpoint(cls, info, dtype=None) -> WeightReader:
        """A reader over `info`'s shards, with its FP8 block size and MTP layers."""
        quant = getattr(info, "quantization", None)
        return cls(
            info.weight_files,
            fp8_block=quant.block if quant else None,
            skip_layers=mtp_layers(info.config),
            dtype=dtype,
        )

    def spec(self) -> dict:
        """The arguments that make an equal reader (`WeightReader(**spec)`), e.g. in another
        process (`dsc.export.prewrite`)."""
        return {
            "files": list(self._files),
            "fp8_block": self.fp8_block,
            "skip_layers": self._skip_layers,
            "dtype": self.dtype,
        }

    # --- metadata -------------------------------------------------------------------------------

    def _slice(self, key: str):
        with self._lock:
            return self._handles[self._where[key]].get_slice(key)

    def _load(self, key: str):
        """The tensor's data, copied out of a handle opened for this read only.

        The long-lived handles serve metadata; data comes through a fresh memory map that is
        unmapped right after the copy, so the checkpoint's pages never accumulate in this
        process's resident set (a reader kept open across a 15 GB checkpoint would otherwise
        hold every page it touched)."""
        from safetensors import safe_open

        with safe_open(str(self._where[key]), framework="pt", device="cpu") as handle:
            return handle.get_slice(key)[...]

    def _stored_dtype(self, key: str) -> str:
        return self._slice(key).get_dtype()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def is_fp8(self, name: str) -> bool:
        return self._stored_dtype(name).startswith("F8")

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def __len__(self) -> int:
        return len(self.names)

    # --- data -----------------------------------------------------------------------------------

    def read(self, name: str, dtype=None):
        """Tensor `name`, dequantized (FP8 → float32) and checked; cast to `dtype` if given.

        Without `dtype`, a stored float tensor keeps its stored dtype.
        """
        if name not in self._where or name in self.skipped:
            raise KeyError(name)
        t = self._load(name)
        if self.is_fp8(name):
            scale_name = name + SCALE_SUFFIX
            if scale_name not in self._where:
                raise CheckpointError(
                    f"FP8 tensor {name} has no {scale_name} (one float32 scale per "
                    f"{self.fp8_block[0]}×{self.fp8_block[1]} block)"
                )
            scale = self._load(scale_name)
            self._check(scale_name, scale)
            t = dequantize_fp8_blocks(t, scale, self.fp8_block, name=name)
        self._check(name, t)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def read_into(
        self,
        name: str,
        out,
        *,
        transpose: bool = False,
        rows: tuple[int, int] | None = None,
        chunk_bytes: int = 64 << 20,
    ):
        """Read tensor `name` into the preallocated `out` (its dtype is the cast), in row chunks.

        `out` has the stored shape, or its transpose when `transpose` (2-D only); with
        `rows=(a, b)`, stored rows a to b only (`out` is `stored[a:b]`'s shape; not with
        `transpose`; ValueError outside the tensor's rows). Each chunk of
        about `chunk_bytes` of stored data is read from the shard with plain file reads (no
        memory map, so no file pages accumulate in the resident set), checked (NaN/Inf,
        overflow of the reader's dtype: the same `CheckpointError`s as `read`) and cast into
        its rows (columns, in tiles: `copy_transposed`) of `out`, so the peak is `out` plus one
        chunk instead of the stored tensor, its cast and `out`. FP8 and 0-/1-D tensors go
        through `read` whole."""
        import torch

        if name not in self._where or name in self.skipped:
            raise KeyError(name)
        shape = self.shape(name)
        if transpose and len(shape) != 2:
            raise ValueError(f"transposed read of {name}: {len(shape)}-D, only 2-D is supported")
        first, last = rows if rows is not None else (0, shape[0] if shape else 1)
        if rows is not None and (transpose or len(shape) < 1 or not 0 <= first < last <= shape[0]):
            raise ValueError(f"rows {rows} of {name} {list(shape)}: not a range of its rows")
        stored = self._stored_dtype(name)
        if stored not in _TORCH_DTYPES or len(shape) < 2:  # FP8, integers, 0-/1-D: whole
            t = self.read(name, out.dtype)
            if rows is not None:
                t = t[first:last]
            if transpose:
                copy_transposed(out, t)
            else:
                out.copy_(t)
            return out
        start, _ = self._offsets(name)
        torch_dtype = getattr(torch, _TORCH_DTYPES[stored])
        row_elems = math.prod(shape[1:])
        row_bytes = max(1, row_elems * torch.tensor([], dtype=torch_dtype).element_size())
        step = max(1, chunk_bytes // row_bytes)
        with open(self._where[name], "rb", buffering=0) as f:
            for a in range(first, last, step):
                n = min(step, last - a)
                buf = self._chunk_buffer(n * row_bytes)
                f.seek(start + a * row_bytes)
                if f.readinto(buf) != len(buf):
                    raise CheckpointError(f"tensor {name} is truncated in {self._where[name].name}")
                chunk = torch.frombuffer(buf, dtype=torch_dtype).view(n, *shape[1:])
                self._check(name, chunk)
                if transpose:
                    copy_transposed(out[:, a : a + n], chunk)
                else:
                    out[a - first : a - first + n].copy_(chunk)
                del chunk, buf
        return out

    def _chunk_buffer(self, nbytes: int) -> memoryview:
        """`nbytes` of this thread's chunk buffer, grown as needed and kept until `close`.

        A fresh `bytearray` per chunk costs its zero-fill and a page fault per 4 KiB (an mmap'd
        allocation each time): reading the 1.5B's 198 2-D weights through `read_into` took
        5.3 s with fresh buffers and 2.1 s with one reused buffer (benchmarks/
        read_into_buffers.py, docs/BENCHMARKS.md). One buffer per thread, since `read_into`
        runs on the writer's worker threads at once."""
        held = getattr(self._chunk_buffers, "buf", None)
        if held is None or len(held) < nbytes:
            held = self._chunk_buffers.buf = bytearray(nbytes)
        return memoryview(held)[:nbytes]

    def _offsets(self, name: str) -> tuple[int, int]:
        """Absolute byte range of `name`'s data in its shard (safetensors layout: an 8-byte
        little-endian header length, the JSON header, then data at `data_offsets`)."""
        file = self._where[name]
        if file not in self._headers:
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._headers[file] = (8 + n, json.loads(f.read(n)))
        base, header = self._headers[file]
        begin, end = header[name]["data_offsets"]
        return base + begin, base + end

    def __iter__(self) -> Iterator[tuple[str, object]]:
        """(name, tensor in `self.dtype`) for every tensor the model uses, one at a time."""
        for name in self.names:
            yield name, self.read(name, self.dtype)

    def lazy_state_dict(self) -> dict[str, _Lazy]:
        """name → a value that reads the tensor when transformers' loader materialises it."""
        return {name: _Lazy(self, name) for name in self.names}

    def _check(self, name: str, t) -> None:
        import torch

        if not t.is_floating_point() or t.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(t))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            what = "NaN" if math.isnan(lo) or math.isnan(hi) else "Inf"
            raise CheckpointError(
                f"checkpoint tensor {name} ({self._where[name].name}) holds {what} values"
            )
        target = self.dtype
        if target is not None and target.is_floating_point:
            limit = torch.finfo(target).max
            peak = max(abs(lo), abs(hi))
            if limit < torch.finfo(t.dtype).max and peak > limit:
                wider = "bf16" if target == torch.float16 else "fp32"
                raise CheckpointError(
                    f"checkpoint tensor {name} holds values up to {peak:.4g}, beyond "
                    f"{str(target).removeprefix('torch.')}'s range ({limit:.6g}); export with "
                    f"--dtype {wider}"
                )

    def close(self) -> None:
        handles, self._handles = self._handles, {}
        self._chunk_buffers = threading.local()  # the other threads' buffers go with the old one
        for handle in handles.values():
            # safe_open handles are context managers; __exit__ releases the memory map.
            handle.__exit__(None, None, None)

    def __enter__(self) -> WeightReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
