"""Export without materialising the model: trace on fake tensors, write weights one at a time.

The in-memory export (`dsc.export.onnx_export.export_graph(stream=False)`) loads the whole model
with transformers, traces it, and writes it: peak RSS about twice the weights (7.35 GB for the
3.55 GB R1-Distill-Qwen-1.5B). Here:

1. **Skeleton.** The transformers model is built inside a `FakeTensorMode` with the export
   dtype (`_from_config(config, dtype=...)`: transformers' dtype plan applies, e.g. the MoE
   router stays float32): every parameter is a fake CPU tensor, with shape and dtype and no
   storage. Fake CPU rather than the meta device, because some operators trace differently by
   device (on meta, scaled-dot-product attention leaves an extra Reshape; on fake CPU the
   graph is the in-memory export's, node for node). Non-persistent buffers, which no checkpoint
   holds (rotary `inv_freq`), are computed by building their owning module alone on the real
   CPU (`type(module)(model.config)`).
2. **Sources.** `CheckpointSources` works out, for every tensor of the model's state dict,
   which checkpoint tensors make it and where each goes. The mapping is transformers' own:
   `transformers.core_model_loading.revert_weight_conversion` (what `save_pretrained` applies)
   is run on a probe, an index tensor of the parameter's shape with its last dimension cut to 1
   (so a probe of V2-Lite's [64, 2816, 2048] `gate_up_proj` holds 180,224 indices, not 369 M).
   Each checkpoint tensor it returns names the rows of the parameter it fills. Tied weights
   (`lm_head` ← `embed_tokens`) take the tensor the checkpoint holds. A missing, unexpected or
   misshapen tensor is a `CheckpointError`, as in the in-memory load.
3. **Range check** (fp16; run after step 5): the export example runs through the model with
   each module's own parameters loaded just before its forward and dropped after (forward
   hooks), so one module's weights are resident at a time; non-finite logits or cache are a
   `BadInput`. The weights are maps of the bytes step 5 wrote (`WrittenWeights`), so none is
   read from the checkpoint or cast a second time.
4. **Trace.** `torch.onnx.export(dynamo=True)` on the fake model with fake example inputs of
   the same mode (torch.export picks the mode up from them): the graph is the same; its
   initializers have no data.
5. **Write.** Each initializer becomes an `onnx_ir.LazyTensor` that reads its checkpoint
   tensors (through `dsc.models.weights.WeightReader`: memory-mapped, FP8 blocks dequantized,
   NaN/Inf and overflow checked, cast to the parameter's dtype) when the writer reaches it and
   is not cached; then the exporter's own optimizer (`ONNXProgram.optimize`) and save. onnx_ir's
   external-data writer materialises one tensor at a time, so the peak is the skeleton, the
   graph, and about three copies of the largest tensor (stored, cast, serialised).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator

from dsc.errors import BackendError, CheckpointError
from dsc.models.loading import few_names

__all__ = ["CheckpointSources", "WrittenWeights", "fake_model", "is_fake", "onloaded"]


def fake_model(info, torch_dtype, *, num_layers: int | None = None):
    """The transformers model of `info` as fake CPU tensors, plus its non-persistent buffers.

    `num_layers`: build it with its config cut to its first `num_layers` decoder layers
    (`dsc.export.by_kind.cut_config`).

    Returns (model, buffers, mode): `model` in eval mode with the family's export settings,
    every parameter and buffer a fake tensor of `mode` (a `FakeTensorMode`; make the trace's
    example inputs with `mode.from_tensor`); `buffers` maps state-dict-style names of the
    non-persistent buffers (e.g. `model.rotary_emb.inv_freq`, float32) to real CPU tensors
    computed from the config. Raises `CheckpointError` for a config transformers refuses and
    `BackendError` for a buffer whose module cannot be built alone."""
    import transformers
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dsc.models.loading import model_config, transformers_quiet

    config = model_config(info)
    if num_layers is not None:
        from dsc.export.by_kind import cut_config

        config = cut_config(config, num_layers)
    model_class = getattr(transformers, info.architecture)
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with mode, warnings.catch_warnings(), transformers_quiet():
        warnings.simplefilter("ignore")
        config._attn_implementation = "sdpa"
        model = model_class._from_config(config, dtype=torch_dtype)
    model.eval()
    info.family.prepare_model(model)
    return model, _non_persistent_buffers(model), mode


def is_fake(t) -> bool:
    """Whether `t` is a fake tensor (shape and dtype, no data)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _non_persistent_buffers(model) -> dict:
    import torch

    out = {}
    for mod_name, module in model.named_modules():
        names = [n for n in module._buffers if n in module._non_persistent_buffers_set]
        if not names or module._buffers[names[0]] is None:
            continue
        try:
            with torch.device("cpu"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                real = type(module)(model.config)
        except Exception as e:  # an arbitrary module constructor: say which buffer and why
            raise BackendError(
                f"cannot compute buffer {mod_name}.{names[0]} without loading the model: "
                f"{type(module).__name__}(config) failed: {e}"
            ) from None
        for n in names:
            value = getattr(real, n)
            fake = module._buffers[n]
            if tuple(value.shape) != tuple(fake.shape):
                raise BackendError(
                    f"buffer {mod_name}.{n} computed alone has shape {list(value.shape)}, the "
                    f"model's is {list(fake.shape)}"
                )
            out[f"{mod_name}.{n}" if mod_name else n] = value.to(fake.dtype)
    return out


class _Spec:
    """A tensor's shape and dtype, where `CheckpointSources` has no fake tensor."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return self.dtype.itemsize


class CheckpointSources:
    """Every model state-dict tensor as a recipe over checkpoint tensors (module docstring, 2).

    `model`: the fake model (`fake_model`); `reader`: a `WeightReader` over the checkpoint.
    `names` are the state-dict keys with a source (tied keys included); `materialize(key)`
    returns the CPU tensor, in the model's dtype for that key, built from its checkpoint
    tensors. Raises `CheckpointError` when a tensor the model needs is missing, when the
    checkpoint holds one the model has no place for, or when shapes disagree."""

    def __init__(self, model, reader, *, path=None, architecture: str = ""):
        import torch

        self._reader = reader
        self._where = path or "the checkpoint"
        self._arch = architecture
        state = model.state_dict(keep_vars=True)
        non_persistent = {
            f"{m}.{n}" if m else n
            for m, mod in model.named_modules()
            for n in mod._non_persistent_buffers_set
        }
        present = set(reader.names)
        groups: dict[int, list[str]] = {}
        for key, t in state.items():
            if key not in non_persistent:
                groups.setdefault(id(t), []).append(key)
        self._fake = {k: state[k] for keys in groups.values() for k in keys}
        self._pieces: dict[str, list[tuple[str, object]]] = {}
        used: set[str] = set()
        missing: list[str] = []
        for keys in groups.values():
            candidates = [(k, self._revert(model, k, state[k], torch)) for k in keys]
            found = next(((k, p) for k, p in candidates if all(n in present for n, _ in p)), None)
            if found is None:
                missing += [n for n, _ in candidates[0][1] if n not in present]
                continue
            _, pieces = found
            for k in keys:
                self._pieces[k] = pieces
            used.update(n for n, _ in pieces)
        if missing:
            raise CheckpointError(
                f"checkpoint {self._where} lacks {few_names(missing)} that its {self._arch} "
                "config needs"
            )
        if unexpected := present - used:
            raise CheckpointError(
                f"checkpoint {self._where} holds {few_names(unexpected)} that its {self._arch} "
                "config has no place for"
            )
        for key, pieces in self._pieces.items():
            self._check_shapes(key, pieces)

    @classmethod
    def from_recipes(cls, reader, recipes: dict) -> CheckpointSources:
        """Sources for the keys of `recipes` (`recipes()` of another instance, e.g. in another
        process: `dsc.export.prewrite`) over `reader`, without the model."""
        import torch

        self = cls.__new__(cls)
        self._reader = reader
        self._where, self._arch = "the checkpoint", ""
        self._fake, self._pieces = {}, {}
        for key, (shape, dtype, pieces) in recipes.items():
            self._fake[key] = _Spec(shape, dtype)
            lead = shape[:-1] if len(shape) > 1 else ()
            self._pieces[key] = [
                (name, torch.arange(math.prod(lead), dtype=torch.int64).view(*lead, 1))
                if piece is None
                else (name, piece)
                for name, piece in pieces
            ]
        return self

    def recipes(self, keys) -> dict:
        """{key: (shape, torch dtype, [(checkpoint name, row indices or None for all rows in
        order)])}: what `from_recipes` needs to materialize `keys` (picklable).

        Each piece's row indices are a copy: `_revert`'s pieces are views of one index tensor
        per key, and pickling a view writes its whole storage. For V2-Lite's experts (128
        pieces of a [64, 2816] index tensor per layer) that made 250 MB of pickle per layer:
        the export's writer process held 6.6 GB of it at 27 layers (docs/BENCHMARKS.md,
        session 18)."""
        import torch

        out = {}
        for key in keys:
            fake = self._fake[key]
            shape = tuple(fake.shape)
            lead = shape[:-1] if len(shape) > 1 else ()
            rows = math.prod(lead)
            pieces = []
            for name, piece in self._pieces[key]:
                whole = tuple(piece.shape) == (*lead, 1) and bool(
                    (piece.reshape(-1) == torch.arange(rows)).all()
                )
                pieces.append((name, None if whole else piece.clone()))
            out[key] = (shape, fake.dtype, pieces)
        return out

    @staticmethod
    def _revert(model, key: str, spec, torch) -> list[tuple[str, object]]:
        """[(checkpoint name, row indices into the key's [rows, last] view)]."""
        from transformers.core_model_loading import revert_weight_conversion

        shape = tuple(spec.shape)
        lead = shape[:-1] if len(shape) > 1 else ()
        rows = int(math.prod(lead))
        probe = torch.arange(rows, dtype=torch.int64).view(*lead, 1)
        out = revert_weight_conversion(model, {key: probe})
        return [(name, piece) for name, piece in out.items()]

    def _check_shapes(self, key: str, pieces) -> None:
        shape = tuple(self._fake[key].shape)
        last = shape[-1] if shape else 1
        covered = 0
        for name, piece in pieces:
            want = (*tuple(piece.shape)[:-1], last) if len(shape) > 1 else shape
            got = self._reader.shape(name)
            if len(shape) > 1 and tuple(piece.shape)[-1] != 1:
                raise CheckpointError(
                    f"{key}: transformers splits it along its last dimension, which dsc's "
                    "streaming export does not map; export with --no-stream"
                )
            if tuple(got) != want:
                raise CheckpointError(
                    f"checkpoint {self._where} has 1 tensor of the wrong shape: {name} is "
                    f"{list(got)}, its {self._arch} config needs {list(want)}"
                )
            covered += piece.numel()
        rows = int(math.prod(shape[:-1])) if len(shape) > 1 else 1
        if covered != rows:
            raise CheckpointError(f"{key}: its checkpoint tensors cover {covered} of {rows} rows")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._pieces)

    def __contains__(self, key: str) -> bool:
        return key in self._pieces

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's weights in their dtypes, a tied tensor counted once."""
        unique = {id(t): t for t in self._fake.values()}
        return sum(t.numel() * t.element_size() for t in unique.values())

    def fake(self, key: str):
        return self._fake[key]

    def checkpoint_names(self, key: str) -> list[str]:
        return [n for n, _ in self._pieces[key]]

    def materialize(
        self,
        key: str,
        *,
        perm: tuple[int, ...] | None = None,
        out=None,
        rows: tuple[int, int] | None = None,
    ):
        """The CPU tensor for state-dict key `key`, in the model's dtype for it.

        `perm` returns it permuted (contiguous, as ONNX `Transpose(perm)` would): a weight the
        graph uses as `Transpose(W)` is written as such without holding `W` as well. Each
        checkpoint tensor is written straight into its place in the (permuted) output, so the
        peak is the output plus one checkpoint tensor; a key made of one 2-D checkpoint tensor
        is read in row chunks (`WeightReader.read_into`), the peak then being the output plus
        one chunk. `out`: a contiguous tensor of the result's shape and dtype to write into
        (e.g. a reused buffer: `dsc.export.prewrite`), instead of a new one.

        `rows=(a, b)`: only `result[a:b]`, for a key of 2 or more axes whose axis 0 stays first
        under `perm` (a part of a large tensor: `dsc.export.prewrite.parts`); only the
        checkpoint tensors with rows in that range are read (for V2-Lite's fused experts, the
        experts a to b). Raises ValueError for another `rows`."""
        import torch

        spec = self._fake[key]
        shape = tuple(spec.shape)
        perm = tuple(perm) if perm is not None else tuple(range(len(shape)))
        if sorted(perm) != list(range(len(shape))):
            raise ValueError(f"{key}: {perm} is not a permutation of its {len(shape)} axes")
        want = [shape[p] for p in perm]
        first = 0
        if rows is not None:
            first, last = rows
            if len(shape) < 2 or perm[0] != 0 or not 0 <= first < last <= shape[0]:
                raise ValueError(
                    f"{key}: rows {rows} need 2 or more axes, axis 0 kept first, and a range of "
                    f"its {shape[0] if shape else 0} rows"
                )
            want[0] = last - first
        if out is None:
            out = torch.empty(want, dtype=spec.dtype)
        elif list(out.shape) != want or out.dtype != spec.dtype or not out.is_contiguous():
            raise ValueError(f"{key}: out is {list(out.shape)} {out.dtype}, needs {want}")
        inverse = _inverse(perm)
        view = out.permute(inverse)  # `out`'s memory in the key's own axis order
        pieces = self._pieces[key]
        nrows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        if len(pieces) == 1 and pieces[0][1].numel() == nrows and len(shape) <= 2:
            name, piece = pieces[0]
            identity = bool((piece.reshape(-1) == torch.arange(nrows)).all())
            if identity and tuple(self._reader.shape(name)) == shape:
                self._reader.read_into(name, out, transpose=perm == (1, 0), rows=rows)
                return out
        if len(shape) < 2:
            ((name, _),) = pieces
            view.copy_(self._reader.read(name, spec.dtype).reshape(shape))
            return out
        for name, piece in pieces:
            index = torch.unravel_index(piece.reshape(-1), shape[:-1])
            if rows is not None:  # this piece's rows within the range, renumbered from 0
                keep = (index[0] >= first) & (index[0] < last)
                if not bool(keep.any()):
                    continue  # not read
                index = (index[0][keep] - first, *(ix[keep] for ix in index[1:]))
            t = self._reader.read(name, spec.dtype).reshape(-1, shape[-1])
            if rows is not None and len(index[0]) < len(t):  # some of its rows are outside
                t = t[keep]
            view[index] = t
            del t
        return out


class WrittenWeights:
    """State-dict tensors read back from the external data file an export has just written.

    The fp16 range check runs after the write (module docstring, 3): what it needs is every
    weight in the export dtype, which `model.onnx.data` now holds, in the page cache. Each
    `materialize(key)` maps the key's bytes from that file (copy-on-write, so the tensor is
    writable and nothing is copied unless written); the mapping goes when the tensor does, so
    only the modules `onloaded` holds are resident. A weight written permuted (the MatMul
    weights, W^T) is the inverse permutation of its map where the CPU's matmul in its dtype
    takes a transposed operand at full speed (`native_strided_matmul`), and read into a copy
    in its own axis order elsewhere (`_unpermuted`: torch's own fp16 matmul is slow on
    transposed views). This replaces a second read of the checkpoint and a second cast of
    every weight (the 1.5B: 3.55 GB read and cast; docs/BENCHMARKS.md).

    `data_path`: the external data file; `entries`: {state-dict key: (byte offset, shape as
    written, torch dtype, permutation it was written with or None)}, from the writer's
    callback (`dsc.export.onnx_export._save_external`); `fallback`: the `CheckpointSources` of
    the export, for the keys the file does not hold as such (a tensor kept inside the .onnx,
    one the optimizer merged with an equal one) and for permuted reads; `wait(key)`: called
    before a key's bytes are read, while another process still writes the file
    (`dsc.export.prewrite.PreWrite.wait_for`).

    `permuted_from_fallback`: a key written permuted (W^T) is read from `fallback` (still
    after `wait(key)`), the others from the file. For a file written with direct I/O
    (`dsc.export.prewrite`): its bytes are not in the page cache, the checkpoint's are, so a
    weight the check reads whole is cheaper to read and cast from there; a tensor written as
    it is (the embedding, which the check only gathers a few rows of) stays a map of the file,
    of which only the pages touched are read and resident. Reading the 7B's embedding from the
    checkpoint instead held a 1.09 GB copy: the stage's peak went from 2.0-2.3 GB to 2.5-2.7 GB
    (docs/BENCHMARKS.md, session 18)."""

    def __init__(
        self,
        data_path,
        entries: dict,
        fallback: CheckpointSources,
        *,
        wait=None,
        permuted_from_fallback: bool = False,
    ):
        self._path = data_path
        self._entries = dict(entries)
        self._fallback = fallback
        self._wait = wait
        self._permuted_from_fallback = permuted_from_fallback

    @property
    def mapped(self) -> frozenset[str]:
        """The keys read from the data file (the others come from the checkpoint)."""
        return frozenset(self._entries)

    def materialize(self, key: str, *, perm: tuple[int, ...] | None = None):
        """The tensor of `key` in its own axis order and the export dtype: a view of the
        data file's bytes (permuted back for a key written permuted, where
        `native_strided_matmul`), a copy for a key written permuted elsewhere, or
        `fallback.materialize(key, perm=perm)` (see the class; `permuted_from_fallback`)."""
        import mmap

        import torch

        entry = self._entries.get(key)
        if entry is None or perm is not None:
            return self._fallback.materialize(key, perm=perm)
        if self._wait is not None:  # the file is still being written (`dsc.export.prewrite`)
            self._wait(key)
        offset, shape, dtype, written_perm = entry
        permuted = written_perm is not None and list(written_perm) != sorted(written_perm)
        if permuted and self._permuted_from_fallback:
            return self._fallback.materialize(key)
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if nbytes == 0:
            return self._fallback.materialize(key)
        if written_perm is not None and not native_strided_matmul(dtype):
            return self._unpermuted(offset, shape, dtype, written_perm)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        with open(self._path, "rb") as f:
            mapped = mmap.mmap(
                f.fileno(), offset + nbytes - start, offset=start, access=mmap.ACCESS_COPY
            )
        # the tensor holds the buffer; the file is unmapped when the tensor is freed
        t = torch.frombuffer(mapped, dtype=dtype, count=count, offset=offset - start)
        return (
            t.view(shape) if written_perm is None else t.view(shape).permute(_inverse(written_perm))
        )

    def _unpermuted(self, offset: int, shape: tuple, dtype, perm: tuple[int, ...]):
        """The tensor written at `offset` with `shape`, stored permuted by `perm`, as a
        contiguous tensor in its own axis order (`written.permute(inverse of perm)`).

        A copy, not the permuted view of a map: torch's fp16 matmul on a CPU without
        AVX512-FP16 or AMX runs a fallback kernel that is about 16x slower when the weight is
        a transposed view (`F.linear` of [6, 1536] by gate_proj's [8960, 1536]: 121 ms on the
        view, 7 ms contiguous; AMD EPYC with AVX2, torch 2.13): the 1.5B's range check took
        22.7 s on views, most of the export (docs/BENCHMARKS.md). `onloaded` makes the copy on
        its read-ahead thread, beside the running module's forward. When the permutation
        swaps the last two axes (W^T, the experts' [E, in, out]) the file is read
        `TRANSPOSE_TILE_ROWS` stored rows at a time and each tile transposed into place
        (`dsc.models.weights.copy_transposed`), so the resident bytes are the copy and one
        tile, not the copy and a map of the whole tensor (lm_head: 467 MB at 1.5B)."""
        import torch

        from dsc.models.weights import TRANSPOSE_TILE_ROWS, copy_transposed

        n = len(shape)
        order = _inverse(perm)
        own = [shape[i] for i in order]
        if n < 2 or order != [*range(n - 2), n - 1, n - 2]:
            whole = torch.empty(shape, dtype=dtype)
            with open(self._path, "rb") as f:
                f.seek(offset)
                _read_exact(f, whole)
            return whole.permute(order).contiguous()
        out = torch.empty(own, dtype=dtype)
        rows, cols = shape[-2:]
        step = min(rows, TRANSPOSE_TILE_ROWS)
        tile = torch.empty(step, cols, dtype=dtype)
        with open(self._path, "rb", buffering=0) as f:
            f.seek(offset)
            for dst in out.reshape(-1, cols, rows):  # one [out, in] matrix per leading index
                for r in range(0, rows, step):
                    part = tile[: min(step, rows - r)]
                    _read_exact(f, part)
                    copy_transposed(dst[:, r : r + len(part)], part)
        return out


@functools.cache
def native_strided_matmul(dtype) -> bool:
    """Whether torch's CPU matmul in `dtype` (a torch dtype) takes a transposed operand at
    full speed, so the range check can run on the written W^T as a view.

    fp16 and bf16 matmuls go to oneDNN where the CPU has the instructions for it (torch's own
    test: `torch.ops.mkldnn._is_mkldnn_fp16_supported()`, AVX512-FP16 or AMX-FP16; bf16:
    AVX512-BF16 or AMX-BF16), and oneDNN reads either layout. Elsewhere fp16 runs torch's
    fallback kernel, about 16× slower on a transposed weight (session 14's AVX2 host). On this
    session's Sapphire Rapids host `F.linear` of [6, 3584] by a [18944, 3584] fp16 weight took
    12.0 ms on the transposed view and 9.1 ms contiguous, where the contiguous copy costs a
    transposed read of 136 MB (docs/BENCHMARKS.md, session 15). Any other dtype, or a torch
    without the probe: False (copies)."""
    import torch

    probe = {
        torch.float16: "_is_mkldnn_fp16_supported",
        torch.bfloat16: "_is_mkldnn_bf16_supported",
    }.get(dtype)
    if probe is None:
        return False
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return False


def _inverse(perm) -> list[int]:
    """The permutation that undoes `perm` (`t.permute(perm).permute(_inverse(perm))` is `t`)."""
    return [list(perm).index(i) for i in range(len(perm))]


def _read_exact(f, tensor) -> None:
    """Fill the contiguous CPU `tensor` with the next bytes of the binary file `f`; an
    `OSError` if the file ends first."""
    import torch

    view = memoryview(tensor.view(torch.uint8).numpy()).cast("B")
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise OSError(f"{f.name} ended {len(view) - done} bytes early")
        done += got


@contextlib.contextmanager
def onloaded(
    model,
    sources: CheckpointSources | WrittenWeights,
    buffers: dict,
    *,
    ahead: int = 1,
    advance: Callable[..., None] | None = None,
) -> Iterator[None]:
    """Run `model` on the CPU with one module's parameters resident at a time (plus `ahead`).

    Each module that owns parameters or persistent buffers gets them from `sources` just before
    its forward and its fake tensors back after it; the non-persistent `buffers` are set for
    the duration. A module that uses another module's parameters outside that one's forward
    would fail, mixing fake and real tensors (none of dsc's families do).

    While a module runs, one thread reads the next `ahead` owners (in `named_modules` order,
    after the one that last ran and not yet read) from the checkpoint: file reads and casts
    release the GIL, so they overlap the forward on another core. A module reached out of
    that order (a layer's norms, its first projection) is read on the spot; so at most
    `ahead` modules' weights are held beyond the running one's. Errors of a read ahead are
    raised when its module runs; reads never used are dropped.

    `advance`: called as `advance(total=<modules with weights>)` after each such module's
    forward (`dsc.pipeline.progress.counted`'s, for a bar over the modules)."""
    import concurrent.futures

    import torch

    owners = []
    for mod_name, module in model.named_modules():
        own = [
            n
            for n, t in [*module._parameters.items(), *module._buffers.items()]
            if t is not None and n not in module._non_persistent_buffers_set
        ]
        if own:
            owners.append((mod_name, module, own))
    saved_buffers = []
    for key, value in buffers.items():
        mod_name, _, attr = key.rpartition(".")
        module = model.get_submodule(mod_name)
        saved_buffers.append((module, attr, module._buffers[attr]))
        module._buffers[attr] = value

    def read(index: int) -> dict:
        mod_name, _, own = owners[index]
        return {n: sources.materialize(f"{mod_name}.{n}" if mod_name else n) for n in own}

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dsc-read-ahead")
    pending: dict[int, concurrent.futures.Future] = {}
    started: set[int] = set()

    def values_for(index: int) -> dict:
        future = pending.pop(index, None)
        values = future.result() if future is not None else read(index)
        started.add(index)
        following = (i for i in range(index + 1, len(owners)) if i not in started)
        for i in following:
            if len(pending) >= ahead:
                break
            started.add(i)
            pending[i] = pool.submit(read, i)
        return values

    def load(index: int):
        mod_name, module, own = owners[index]
        fakes = {}

        def pre(_module, _args, _kwargs=None):
            values = values_for(index)
            for n in own:
                fakes[n] = module._parameters.get(n, module._buffers.get(n))
                if n in module._parameters:
                    module._parameters[n] = torch.nn.Parameter(values[n], requires_grad=False)
                else:
                    module._buffers[n] = values[n]

        def post(_module, _args, _output):
            for n in own:
                if n in module._parameters:
                    module._parameters[n] = fakes.pop(n)
                else:
                    module._buffers[n] = fakes.pop(n)
            if advance is not None:
                advance(total=len(owners))

        return pre, post

    handles = []
    try:
        for index, (_, module, _) in enumerate(owners):
            pre, post = load(index)
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
        yield
    finally:
        for future in pending.values():
            future.cancel()
        pool.shutdown(wait=True)
        pending.clear()
        for h in handles:
            h.remove()
        for module, attr, value in saved_buffers:
            module._buffers[attr] = value
