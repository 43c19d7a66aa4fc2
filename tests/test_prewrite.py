"""The external data written by a second process beside the trace (`dsc.export.prewrite`).

On every tiny family (with `external_data`, so that they take the path of a real-size model)
the plan must match the traced graph, so that the prewritten file is used and not rewritten,
and the export must hold the same initializers, byte for byte, as onnx_ir's writer writes.
A graph that does not match the plan falls back to that writer; a bad tensor in the child is
the parent's `CheckpointError`; a failed export leaves no data file and no child behind; the
child holds a bounded number of tensors, whatever the depth; direct I/O writes the same bytes
as the page cache. `PART_BYTES` set to 1 KiB makes the tiny models' tensors go through the
child in parts of rows, as a real model's embedding and fused experts do.
"""

from __future__ import annotations

import hashlib
import io
import math
import pickle
import weakref

import onnx
import pytest

from dsc import api
from dsc.errors import CheckpointError

from .conftest import FAMILIES


def _export(src, out, *, prewrite: bool, monkeypatch, dtype="fp16", trace_layers="kinds"):
    said: list[str] = []
    monkeypatch.setenv("DSC_PREWRITE", "1" if prewrite else "0")
    api.export(
        src,
        out,
        dtype=dtype,
        external_data=True,
        trace_layers=trace_layers,
        progress=said.append,
    )
    return said


def _initializers(path):
    model = onnx.load(str(path / "model.onnx"))
    return {
        i.name: (i.data_type, tuple(i.dims), onnx.numpy_helper.to_array(i).tobytes())
        for i in model.graph.initializer
    }


@pytest.mark.parametrize(
    ("family", "part_bytes"),
    [
        *((f, None) for f in FAMILIES),
        ("fp8", None),
        ("llama-tied", None),
        ("deepseek_v3", 1024),
        ("fp8", 1024),
        ("llama-tied", 1024),
    ],
)
def test_prewritten_data_is_what_onnx_ir_writes(
    tmp_path, checkpoints, fp8_checkpoint, tokenizer_dir, family, part_bytes, monkeypatch
):
    """Same initializers (name, dtype, shape, bytes), the prewritten file used as planned
    (nothing said about rewriting it), the same data file size, and the manifest's digest is
    the file's sha256. Also with tied embeddings (one tensor, used by Gather and by the
    lm_head's MatMul) and DeepSeek's FP8 blocks; and with the child writing in parts
    (`part_bytes`: the embedding and V3's fused experts in runs of rows, most of them not
    aligned to the direct-I/O block)."""
    from dsc.export import prewrite

    if part_bytes is not None:
        monkeypatch.setattr(prewrite, "PART_BYTES", part_bytes)
    if family == "llama-tied":
        from dsc.fixtures import make_fixture

        src = make_fixture(
            "llama",
            tmp_path / "tied",
            tokenizer_dir=tokenizer_dir,
            overrides={"tie_word_embeddings": True},
        )
    else:
        src = fp8_checkpoint if family == "fp8" else checkpoints[family]
    dtype = "bf16" if family == "deepseek_v2" else "fp16"
    said = _export(src, tmp_path / "p", prewrite=True, monkeypatch=monkeypatch, dtype=dtype)
    _export(src, tmp_path / "o", prewrite=False, monkeypatch=monkeypatch, dtype=dtype)
    assert not [m for m in said if "not laid out as planned" in m], said
    p, o = _initializers(tmp_path / "p"), _initializers(tmp_path / "o")
    assert p.keys() == o.keys()
    assert [k for k in p if p[k] != o[k]] == []
    data = tmp_path / "p" / "model.onnx.data"
    assert data.stat().st_size == (tmp_path / "o" / "model.onnx.data").stat().st_size
    external = [
        i
        for i in onnx.load(
            str(tmp_path / "p" / "model.onnx"), load_external_data=False
        ).graph.initializer
        if i.data_location == onnx.TensorProto.EXTERNAL
    ]
    assert len(external) > 10
    manifest = (tmp_path / "p" / "manifest.json").read_text()
    assert hashlib.sha256(data.read_bytes()).hexdigest() in manifest


def test_a_graph_that_differs_from_the_plan_is_written_again(tmp_path, checkpoints, monkeypatch):
    """A plan with one weight in the wrong layout: the export says so, writes through onnx_ir
    instead, and writes the same initializers."""
    from dsc.export import prewrite

    plan = prewrite.plan

    def wrong(model, sources):
        items = plan(model, sources)
        first = next(i for i, item in enumerate(items) if item.perm == (1, 0))
        item = items[first]
        items[first] = prewrite.Item(
            item.key, None, item.shape[::-1], item.dtype, item.offset, item.nbytes
        )
        return items

    monkeypatch.setattr(prewrite, "plan", wrong)
    said = _export(checkpoints["qwen2"], tmp_path / "p", prewrite=True, monkeypatch=monkeypatch)
    assert [m for m in said if "not laid out as planned" in m], said
    monkeypatch.setattr(prewrite, "plan", plan)
    _export(checkpoints["qwen2"], tmp_path / "o", prewrite=False, monkeypatch=monkeypatch)
    assert _initializers(tmp_path / "p") == _initializers(tmp_path / "o")


def test_a_bad_tensor_in_the_child_is_a_checkpoint_error(tmp_path, checkpoints, monkeypatch):
    """A NaN in a large weight, found by the child: the parent's `CheckpointError` names it,
    and the failed export leaves no data file."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "nan"
    shutil.copytree(checkpoints["qwen2"], src)
    tensors = load_file(str(src / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name][0, 0] = torch.nan
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="down_proj.weight.*NaN"):
        _export(src, tmp_path / "out", prewrite=True, monkeypatch=monkeypatch)
    assert not list(tmp_path.glob("out*/**/model.onnx.data"))


def test_a_failed_trace_stops_the_child_and_removes_its_file(tmp_path, checkpoints, monkeypatch):
    from dsc.errors import BackendError
    from dsc.export import onnx_export, prewrite

    started = []
    launch = prewrite.PreWrite.launch.__func__

    def spy(cls, *args, **kwargs):
        started.append(launch(cls, *args, **kwargs))
        return started[-1]

    def fail(*args, **kwargs):
        raise BackendError("ONNX export of the model failed: injected")

    monkeypatch.setattr(prewrite.PreWrite, "launch", classmethod(spy))
    monkeypatch.setattr(onnx_export, "_streamed_program", fail)
    with pytest.raises(BackendError, match="injected"):
        _export(checkpoints["qwen2"], tmp_path / "out", prewrite=True, monkeypatch=monkeypatch)
    (child,) = started
    assert child._proc.returncode is not None  # waited for: not left running
    assert not child.data_path.exists()


@pytest.mark.parametrize(
    ("buffer_bytes", "part_bytes"),
    [(0, 1 << 30), (1 << 30, 1 << 30), (1 << 30, 1024)],
    ids=["alone", "buffers", "parts"],
)
@pytest.mark.parametrize("layers", [2, 6])
def test_the_child_holds_a_bounded_number_of_tensors(
    tmp_path, fixture_with_layers, layers, buffer_bytes, part_bytes, monkeypatch
):
    """The child's pipeline, run in this process on V3's plan at two depths: at most `BUFFERS`
    tensors are alive at once, or one when every tensor is larger than `BUFFER_BYTES`
    (read alone); with `part_bytes` of 1 KiB, the embedding and the fused experts are read in
    parts (more reads than tensors), still at most `BUFFERS` at once; the file and its hash
    are every planned tensor's bytes, then the tail's, and the parent is told of whole
    tensors only, in order."""
    import threading

    import torch

    from dsc.export import prewrite
    from dsc.export.streaming import CheckpointSources, fake_model
    from dsc.models.checkpoint import inspect_checkpoint
    from dsc.models.weights import WeightReader

    src = fixture_with_layers("deepseek_v3", layers)
    info = inspect_checkpoint(src)
    with WeightReader.for_checkpoint(info, dtype=torch.float16) as reader:
        model, _, _ = fake_model(info, torch.float16)
        sources = CheckpointSources(model, reader, path=info.path)
        items = prewrite.plan(model, sources)
        job = {
            "reader": reader.spec(),
            "recipes": sources.recipes([item.key for item in items]),
            "items": items,
            "part_bytes": part_bytes,
            "path": str(tmp_path / "model.onnx.data"),
            "hash": True,
        }
        expected = b"".join(
            prewrite._as_bytes(sources.materialize(i.key, perm=i.perm)).tobytes() for i in items
        )
    assert len(items) >= 4 * layers
    lock = threading.Lock()
    live = peak = calls = 0
    materialize = CheckpointSources.materialize

    def gone() -> None:
        nonlocal live
        with lock:
            live -= 1

    def counted(self, key, **kwargs):
        nonlocal live, peak, calls
        t = materialize(self, key, **kwargs)
        with lock:
            calls += 1
            live += 1
            peak = max(peak, live)
        weakref.finalize(t, gone)
        return t

    monkeypatch.setattr(CheckpointSources, "materialize", counted)
    monkeypatch.setattr(prewrite, "BUFFER_BYTES", buffer_bytes)
    out = io.BytesIO()
    stdin = io.BytesIO(pickle.dumps(job) + pickle.dumps(("tail", [b"tail"])))
    assert prewrite._child(stdin, out) == 0
    out.seek(0)
    messages = []
    while out.tell() < len(out.getvalue()):
        messages.append(pickle.load(out))
    assert messages[-1] == ("done", hashlib.sha256(expected + b"tail").hexdigest())
    counts = [m[1] for m in messages if m[0] == "wrote"]
    assert counts[-1] == len(items) + 1
    assert counts == sorted(set(counts)), counts  # whole tensors, each told once, in order
    assert (tmp_path / "model.onnx.data").read_bytes() == expected + b"tail"
    assert peak == 1 if buffer_bytes == 0 else 1 <= peak <= prewrite.BUFFERS, peak
    units = prewrite.parts(items, part_bytes)
    assert calls == len(units)
    assert (len(units) > len(items) + 2 * layers) == (part_bytes == 1024), (len(units), len(items))


def test_the_stage_peak_counts_both_processes(tmp_path, checkpoints, monkeypatch):
    """The export's recorded peak RSS is at least this process's and the largest sampled sum
    of this process's and the writer's resident sets (`PreWrite.peak_rss_bytes`), which is
    more than the writer alone held (its torch, about 0.2 GB and up)."""
    import json

    from dsc.export import prewrite

    seen = []
    complete = prewrite.PreWrite.complete

    def spy(self, *args, **kwargs):
        out = complete(self, *args, **kwargs)
        seen.append(self.peak_rss_bytes)
        return out

    monkeypatch.setattr(prewrite.PreWrite, "complete", spy)
    _export(checkpoints["qwen2"], tmp_path / "p", prewrite=True, monkeypatch=monkeypatch)
    (both,) = seen
    assert both is not None and both > 200 << 20
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    recorded = [v for k, v in _items(manifest) if k == "peak_rss_bytes"]
    assert recorded and max(recorded) >= both


def _items(tree):
    """(key, value) of every dict in a JSON tree."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield k, v
            yield from _items(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _items(v)


def test_the_child_runs_this_dsc_not_one_in_the_current_directory(
    tmp_path, checkpoints, monkeypatch
):
    """`python -m` puts the current directory first on sys.path: a `dsc` package there (another
    checkout, say) would be imported by the child instead of the parent's. The child is
    started with `-P` and the parent's `dsc` first on its path, so the export works and that
    package is never imported. Found by a newcomer's trial."""
    here = tmp_path / "cwd"
    (here / "dsc" / "export").mkdir(parents=True)
    marker = tmp_path / "imported"
    (here / "dsc" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (here / "dsc" / "export" / "__init__.py").write_text("")
    (here / "dsc" / "export" / "prewrite.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(here)
    said = _export(checkpoints["qwen2"], tmp_path / "out", prewrite=True, monkeypatch=monkeypatch)
    assert not [m for m in said if "not laid out as planned" in m], said
    assert (tmp_path / "out" / "model.onnx.data").exists()
    assert not marker.exists()


def test_direct_io_writes_every_byte_in_place(tmp_path):
    """`_DirectFile` against plain writes: pieces of every size around the block (1 byte to
    several blocks), each from memory placed as in the file (written from it directly) or not
    (through the bounce buffer), make the same file; only whole aligned blocks are written while
    O_DIRECT is set, and `durable` never counts the partial block still in memory."""
    import fcntl
    import mmap
    import os
    import random

    from dsc.export import prewrite

    a = prewrite.DIRECT_ALIGN
    rng = random.Random(0)
    sizes = [1, 2, a - 1, a, a + 1, 3 * a + 7, 2050, 5, 7 * a, 1, a // 2, a // 2, 12345]
    pieces = [rng.randbytes(n) for n in sizes]
    path = tmp_path / "direct.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    writes: list[tuple[int, int, bool]] = []
    real = os.pwrite

    def pwrite(f, data, offset):
        direct = bool(fcntl.fcntl(f, fcntl.F_GETFL) & os.O_DIRECT)
        writes.append((offset, len(data), direct))
        return real(f, data, offset)

    try:
        out = prewrite._DirectFile(fd)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        offset = 0
        for i, piece in enumerate(pieces):
            buf = mmap.mmap(-1, len(piece) + 2 * a)
            shift = offset % a if i % 2 == 0 else (offset + 1) % a  # placed, or not
            buf[shift : shift + len(piece)] = piece
            view = memoryview(buf)[shift : shift + len(piece)]
            address = 0  # only the address modulo the block matters here: the buffer is aligned
            os.pwrite = pwrite
            try:
                out.write(view, address + shift)
            finally:
                os.pwrite = real
            offset += len(piece)
            assert out.durable <= offset and out.durable % a == 0
            assert offset - out.durable < a
            del view
        assert not out.buffered  # no direct write was refused
        assert out.finish() == offset
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(pieces)
    assert [w for w in writes if w[2] and (w[0] % a or w[1] % a)] == []
    assert any(w[2] for w in writes)


def test_direct_io_refused_by_a_write_goes_through_the_page_cache(tmp_path, monkeypatch):
    """A device that refuses a direct write (EINVAL) gets the same bytes through the page cache,
    O_DIRECT cleared."""
    import errno
    import fcntl
    import mmap
    import os

    from dsc.export import prewrite

    a = prewrite.DIRECT_ALIGN
    real = os.pwrite

    def pwrite(f, data, offset):
        if fcntl.fcntl(f, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(f, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    data = bytes(range(256)) * (3 * a // 256) + b"tail"
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    path = tmp_path / "refused.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        out = prewrite._DirectFile(fd)
        out.write(memoryview(buf), 0)
        assert out.buffered
        assert out.finish() == len(data)
    finally:
        os.close(fd)
    assert path.read_bytes() == data


@pytest.mark.parametrize("family", ["qwen2", "deepseek_v2", "fp8"])
def test_direct_io_and_the_page_cache_write_the_same_export(
    tmp_path, checkpoints, fp8_checkpoint, family, monkeypatch
):
    """The child's data file with direct I/O (`DSC_DIRECT_IO`, the default) and without: the
    same bytes, and the same model.onnx. The fp16 range check reads the file back
    (`WrittenWeights`) in both modes, with direct I/O taking the weights written permuted from
    the checkpoint instead (`permuted_from_fallback`)."""
    from dsc.export.streaming import WrittenWeights

    src = fp8_checkpoint if family == "fp8" else checkpoints[family]
    dtype = "bf16" if family == "deepseek_v2" else "fp16"
    made: list[tuple[str, bool | None]] = []
    init = WrittenWeights.__init__

    def spy(weights, *args, **kwargs):
        made.append((mode, kwargs.get("permuted_from_fallback")))
        init(weights, *args, **kwargs)

    monkeypatch.setattr(WrittenWeights, "__init__", spy)
    for mode in ("1", "0"):
        monkeypatch.setenv("DSC_DIRECT_IO", mode)
        said = _export(src, tmp_path / mode, prewrite=True, monkeypatch=monkeypatch, dtype=dtype)
        assert not [m for m in said if "not laid out as planned" in m], said
    # bf16 has no range check
    assert made == ([("1", True), ("0", False)] if dtype == "fp16" else [])
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "0" / name).read_bytes()


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3", "qwen2"])
def test_the_childs_recipes_hold_only_their_own_row_indices(checkpoints, family):
    """What the parent pickles to the child (`CheckpointSources.recipes`): each piece's row
    indices own their storage (a view would pickle the whole index tensor of its key: at
    V2-Lite's size 250 MB per MoE layer, 6.6 GB held by the writer at 27 layers), so the
    pickle is about the indices' own bytes; and sources rebuilt from it in another process
    (`from_recipes`) give every key's tensor bit for bit."""
    import torch

    from dsc.export.streaming import CheckpointSources, fake_model
    from dsc.models.checkpoint import inspect_checkpoint
    from dsc.models.weights import WeightReader

    info = inspect_checkpoint(checkpoints[family])
    with WeightReader.for_checkpoint(info, dtype=torch.float16) as reader:
        model, _, _ = fake_model(info, torch.float16)
        sources = CheckpointSources(model, reader, path=info.path, architecture=info.architecture)
        recipes = sources.recipes(sources.names)
        pieces = [p for *_, ps in recipes.values() for _, p in ps if p is not None]
        if family != "qwen2":  # MoE experts: one piece per expert of a fused 3-D parameter
            assert len(pieces) >= 8
        own = 0
        for piece in pieces:
            assert piece.untyped_storage().nbytes() == piece.numel() * piece.element_size()
            own += piece.numel() * piece.element_size()
        sent = pickle.dumps(recipes)
        assert len(sent) < own + 2048 * (len(pieces) + len(recipes))
        rebuilt = CheckpointSources.from_recipes(reader, pickle.loads(sent))
        for key in recipes:
            assert torch.equal(rebuilt.materialize(key), sources.materialize(key)), key


def test_parts_cut_axis_0_first_tensors_into_contiguous_runs_of_rows():
    """`parts`: a tensor written with axis 0 first and larger than `part_bytes` is cut into
    runs of whole rows of at most `part_bytes` (one row when a row is larger), back to back
    from its offset; a transposed 2-D weight, a 1-D tensor and a small one stay whole."""
    import torch

    from dsc.export.prewrite import Item, parts

    def item(key, shape, perm, offset):
        return Item(key, perm, shape, torch.float16, offset, 2 * math.prod(shape))

    experts = item("experts", (8, 6, 4), None, 0)  # 48-byte rows
    lm_head = item("lm_head", (4, 40), (1, 0), experts.nbytes)  # transposed: whole
    bias = item("bias", (300,), None, lm_head.offset + lm_head.nbytes)
    small = item("small", (2, 4), None, bias.offset + bias.nbytes)
    wide = item("wide", (3, 100), (0, 1), small.offset + small.nbytes)  # 200-byte rows
    items = [experts, lm_head, bias, small, wide]
    got = parts(items, 100)
    assert [(p.item, p.rows) for p in got] == [
        (0, (0, 2)),
        (0, (2, 4)),
        (0, (4, 6)),
        (0, (6, 8)),
        (1, None),
        (2, None),
        (3, None),
        (4, (0, 1)),
        (4, (1, 2)),
        (4, (2, 3)),
    ]
    end = 0
    for p in got:  # back to back, every byte once
        assert p.offset == end
        end += p.nbytes
    assert end == wide.offset + wide.nbytes
    assert [p.nbytes for p in got if p.item == 0] == [96] * 4
    assert [(p.item, p.rows) for p in parts(items, 1 << 20)] == [(i, None) for i in range(5)]


@pytest.mark.parametrize("family", [*FAMILIES, "fp8"])
def test_materialize_rows_is_those_rows_of_the_whole_tensor(checkpoints, fp8_checkpoint, family):
    """`CheckpointSources.materialize(key, perm=..., rows=(a, b))` of every planned tensor
    written with axis 0 first, for the first row, a middle run and the last rows: equal to
    `[a:b]` of the whole tensor; a transposed weight refuses `rows` (ValueError)."""
    import torch

    from dsc.export import prewrite
    from dsc.export.streaming import CheckpointSources, fake_model
    from dsc.models.checkpoint import inspect_checkpoint
    from dsc.models.weights import WeightReader

    info = inspect_checkpoint(fp8_checkpoint if family == "fp8" else checkpoints[family])
    with WeightReader.for_checkpoint(info, dtype=torch.float16) as reader:
        model, _, _ = fake_model(info, torch.float16)
        sources = CheckpointSources(model, reader, path=info.path)
        items = prewrite.plan(model, sources)
        checked = 0
        for item in items:
            whole = sources.materialize(item.key, perm=item.perm)
            n = item.shape[0]
            if len(item.shape) < 2 or item.perm is not None and item.perm[0] != 0:
                with pytest.raises(ValueError, match="rows"):
                    sources.materialize(item.key, perm=item.perm, rows=(0, 1))
                continue
            for a, b in {(0, 1), (n // 3, max(n // 3 + 1, 2 * n // 3)), (n - 1, n)}:
                part = sources.materialize(item.key, perm=item.perm, rows=(a, b))
                assert torch.equal(part, whole[a:b]), (item.key, a, b)
            checked += 1
    assert checked >= 1 + (2 if family == "deepseek_v3" else 0)  # the embedding, V3's experts
