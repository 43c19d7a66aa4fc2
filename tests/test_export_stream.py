"""The streaming export (fake-tensor trace, weights written one at a time) against loading whole.

`dsc export` streams by default (`dsc.export.streaming`); `--no-stream` loads the model with
transformers first. On every tiny family, and on the FP8-layout V3 checkpoint, both must write
the same `model.onnx` and `model.onnx.data`, byte for byte. And the streaming export must never
hold more than a few checkpoint tensors at once, whatever the number of layers.
"""

from __future__ import annotations

import gc
import weakref

import onnx
import pytest
from safetensors import safe_open

from dsc import api

from .conftest import FAMILIES


def _quiet(msg: str) -> None:
    pass


def _export(src, out, *, stream: bool, dtype: str = "fp16", trace_layers: str = "kinds"):
    api.export(
        src,
        out,
        dtype=dtype,
        external_data=True,
        stream=stream,
        trace_layers=trace_layers,
        progress=_quiet,
    )
    return onnx.load(str(out / "model.onnx"))  # external data loaded too


def _canonical(model):
    """The graph with initializers keyed by name (their order aside), as comparable values."""
    g = model.graph
    inits = {
        i.name: (i.data_type, tuple(i.dims), onnx.numpy_helper.to_array(i).tobytes())
        for i in g.initializer
    }
    g.ClearField("initializer")
    value_info = {v.name: v.SerializeToString() for v in g.value_info}
    g.ClearField("value_info")
    return g.SerializeToString(), inits, value_info


@pytest.mark.parametrize("family", [*FAMILIES, "fp8", "llama-tied"])
def test_streamed_export_writes_the_same_graph(
    tmp_path, checkpoints, fp8_checkpoint, tokenizer_dir, family
):
    """Same nodes, inputs, outputs, value infos and initializer bytes. The one difference is
    the order of the initializers (so of the tensors in model.onnx.data): the streaming export
    folds `Transpose(W)` into lazily transposed initializers before the exporter's optimizer,
    which appends its own folded constants after them, where loading whole interleaves the two
    in the order it visits the nodes. Every layer is traced here (`trace_layers="all"`): the
    copies of `--trace-layers kinds` are compared with it in tests/test_export_by_kind.py."""
    if family == "llama-tied":  # lm_head.weight absent: it is embed_tokens.weight
        from dsc.fixtures import make_fixture

        src = make_fixture(
            "llama",
            tmp_path / "tied",
            tokenizer_dir=tokenizer_dir,
            overrides={"tie_word_embeddings": True},
        )
        with safe_open(str(src / "model.safetensors"), framework="pt") as f:
            assert "lm_head.weight" not in f.keys()  # noqa: SIM118  (a safetensors handle)
    else:
        src = fp8_checkpoint if family == "fp8" else checkpoints[family]
    dtype = "bf16" if family == "deepseek_v2" else "fp16"  # one family through bf16 storage
    graph_s, inits_s, info_s = _canonical(
        _export(src, tmp_path / "s", stream=True, dtype=dtype, trace_layers="all")
    )
    graph_w, inits_w, info_w = _canonical(_export(src, tmp_path / "w", stream=False, dtype=dtype))
    assert graph_s == graph_w
    assert info_s == info_w
    assert inits_s.keys() == inits_w.keys()
    assert [k for k in inits_s if inits_s[k] != inits_w[k]] == []
    assert sum(len(v[2]) for v in inits_s.values()) > 10_000


class _LiveTensors:
    """Counts the weight tensors made by `CheckpointSources.materialize` (the writer's reads,
    and the range check's for keys the data file does not hold) and by
    `WrittenWeights.materialize` (the range check's views of the data file: mapped pages are
    resident), and how many of them are alive at once, from any thread (the range check
    reads ahead on one, the writer uses two)."""

    def __init__(self, monkeypatch):
        import threading

        from dsc.export.streaming import CheckpointSources, WrittenWeights

        self.live = self.peak = 0
        self.made = {"checkpoint": 0, "written": 0}
        self.checked_from_checkpoint: list[int] = []  # sizes, once the range check has begun
        self.checking = False
        self._alive: set[int] = set()
        self._lock = threading.Lock()
        for cls, kind in ((CheckpointSources, "checkpoint"), (WrittenWeights, "written")):
            monkeypatch.setattr(cls, "materialize", self._counting(cls.materialize, kind))
        begin = WrittenWeights.__init__  # made just before the range check runs

        def init(weights, *args, **kwargs):
            self.checking = True
            begin(weights, *args, **kwargs)

        monkeypatch.setattr(WrittenWeights, "__init__", init)

    def _counting(self, original, kind):
        def materialize(sources, key, **kwargs):
            t = original(sources, key, **kwargs)
            with self._lock:
                if id(t) in self._alive:  # a `WrittenWeights` fallback: counted as a checkpoint's
                    return t
                self._alive.add(id(t))
                self.made[kind] += 1
                if kind == "checkpoint" and self.checking:
                    self.checked_from_checkpoint.append(t.numel())
                self.live += 1
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._gone, id(t))
            return t

        return materialize

    def _gone(self, ident: int) -> None:
        with self._lock:
            self._alive.discard(ident)
            self.live -= 1


@pytest.mark.parametrize("layers", [2, 6])
def test_streamed_export_holds_a_bounded_number_of_tensors(
    tmp_path, fixture_with_layers, layers, monkeypatch
):
    """MoE layers (V3: per-expert tensors fused into one 3-D parameter) at two depths: the
    streaming export's peak of live weight tensors is small and does not grow with depth.
    A streaming export that kept what it wrote (the control: `materialize` results stashed)
    fails the same count, so the count does see residency. This is onnx_ir's writer in this
    process (`DSC_PREWRITE=0`); the second process's writer is bounded in
    tests/test_prewrite.py."""
    from dsc.export.streaming import CheckpointSources

    monkeypatch.setenv("DSC_PREWRITE", "0")

    src = fixture_with_layers("deepseek_v3", layers)
    counter = _LiveTensors(monkeypatch)
    api.export(src, tmp_path / "stream", dtype="fp16", external_data=True, progress=_quiet)
    gc.collect()
    # Every weight read from the checkpoint once, to write it (11-14 per layer); the fp16
    # range check, after the write, maps the large ones back from model.onnx.data (the
    # projections and experts: at least 6 per layer) and reads from the checkpoint again
    # only small ones (<= 256 bytes, kept inside model.onnx; or <= 1,024 elements, merged
    # with an equal tensor: `by_kind.instantiate`).
    assert counter.made["written"] >= 6 * layers, counter.made
    assert counter.made["checkpoint"] - len(counter.checked_from_checkpoint) >= 11 * layers
    assert max(counter.checked_from_checkpoint) <= 1024, counter.checked_from_checkpoint
    # The range check holds the running module's tensors and the next one's (read ahead):
    # V3's router (weight, score-correction bias) then its experts (gate_up, down) make 4;
    # the writer holds at most one per thread (2), and is done before the check starts.
    assert counter.peak <= 4, counter.peak

    kept = []
    materialize = CheckpointSources.materialize

    def keep(self, key, **kwargs):
        kept.append(materialize(self, key, **kwargs))
        return kept[-1]

    monkeypatch.setattr(CheckpointSources, "materialize", keep)
    counter.peak = counter.live = 0
    api.export(src, tmp_path / "kept", dtype="fp16", external_data=True, progress=_quiet)
    assert counter.peak > 10 * layers


@pytest.mark.parametrize("native", [False, True], ids=["copies", "views"])
@pytest.mark.parametrize("family", ["qwen2", "deepseek_v3"])
def test_range_check_reads_back_what_was_written(
    tmp_path, checkpoints, family, native, monkeypatch
):
    """The fp16 range check runs after the write and takes each weight the data file holds
    from it (`WrittenWeights`): every such key's tensor equals the checkpoint's in the export
    dtype (the model's dtype for the key), value for value and in its own axis order, the
    transposed writes included: as contiguous copies where the CPU's matmul is slow on a
    transposed operand, as permuted views of the map where it is not
    (`native_strided_matmul`, forced each way here); the export passes its check both ways.
    The file written through the page cache (`DSC_DIRECT_IO=0`): written with direct I/O, the
    check reads the checkpoint instead (tests/test_prewrite.py)."""
    import torch

    from dsc.export import streaming
    from dsc.export.streaming import CheckpointSources, WrittenWeights, fake_model

    monkeypatch.setattr(streaming, "native_strided_matmul", lambda dtype: native)
    monkeypatch.setenv("DSC_DIRECT_IO", "0")
    from dsc.models.checkpoint import inspect_checkpoint
    from dsc.models.weights import WeightReader

    captured: dict = {}
    init = WrittenWeights.__init__

    def spy(weights, data_path, entries, fallback, **kwargs):
        captured.update(entries)
        init(weights, data_path, entries, fallback, **kwargs)

    monkeypatch.setattr(WrittenWeights, "__init__", spy)
    out = tmp_path / "out"
    api.export(checkpoints[family], out, dtype="fp16", external_data=True, progress=_quiet)
    assert len(captured) >= 8
    assert any(perm is not None for *_, perm in captured.values())  # W^T as written
    info = inspect_checkpoint(checkpoints[family])
    with WeightReader.for_checkpoint(info, dtype=torch.float16) as reader:
        model, _, _ = fake_model(info, torch.float16)
        sources = CheckpointSources(model, reader, path=info.path, architecture=info.architecture)
        written = WrittenWeights(out / "model.onnx.data", captured, sources)
        assert written.mapped == set(captured)
        for key in captured:
            got, want = written.materialize(key), sources.materialize(key)
            assert got.dtype == want.dtype, key  # fp16; V3's router stays float32
            assert got.shape == want.shape and torch.equal(got, want), key
            perm = captured[key][3]
            permuted = perm is not None and list(perm) != sorted(perm)  # experts: (0, 1, 2)
            # W^T read back as W: a copy (`WrittenWeights._unpermuted`) or a view of the map
            assert got.is_contiguous() == (not native or not permuted), key


def _write_data_file(path, own: dict, perms: dict) -> dict:
    """Write each tensor of `own` to `path` one after another, permuted by `perms[key]` (None:
    as it is); returns `WrittenWeights` entries {key: (offset, shape as written, dtype, perm)}."""
    import torch

    entries, offset = {}, 0
    with open(path, "wb") as f:
        for key, t in own.items():
            stored = t.permute(perms[key]).contiguous() if perms[key] else t
            f.write(stored.view(torch.uint8).numpy().tobytes())
            entries[key] = (offset, tuple(stored.shape), t.dtype, perms[key])
            offset += stored.numel() * t.element_size()
    return entries


@pytest.mark.parametrize("native", [False, True], ids=["copies", "views"])
def test_written_weights_undo_permutations(tmp_path, native, monkeypatch):
    """`WrittenWeights.materialize` of a tensor written permuted: equal to the inverse
    permutation of what was written, a contiguous copy where the CPU's matmul is slow on
    transposed operands and a view of the map where not (`native_strided_matmul`, forced each
    way), for W^T (stored rows not a multiple of the tile), experts' [E, in, out], and a
    permutation that is not a last-two-axes swap; and a tensor written as it is; a file that
    ends early is an OSError (copies) or a ValueError (views: the map is short)."""
    import torch

    from dsc.export import streaming
    from dsc.export.streaming import WrittenWeights
    from dsc.models.weights import TRANSPOSE_TILE_ROWS

    monkeypatch.setattr(streaming, "native_strided_matmul", lambda dtype: native)

    g = torch.Generator().manual_seed(0)
    own = {
        "w": torch.randn(40, TRANSPOSE_TILE_ROWS * 2 + 37, generator=g).half(),
        "experts": torch.randn(3, 20, 300, generator=g).half(),
        "cube": torch.randn(4, 5, 6, generator=g).float(),
        "plain": torch.randn(7, 9, generator=g).half(),
    }
    perms = {"w": (1, 0), "experts": (0, 2, 1), "cube": (2, 0, 1), "plain": None}
    path = tmp_path / "model.onnx.data"
    entries = _write_data_file(path, own, perms)
    offset = path.stat().st_size
    written = WrittenWeights(path, entries, fallback=None)
    for key, want in own.items():
        got = written.materialize(key)
        assert got.is_contiguous() == (not native or perms[key] is None), key
        assert got.dtype == want.dtype and torch.equal(got, want), key
    short = dict(entries, w=(offset - 8, entries["w"][1], torch.float16, (1, 0)))
    with pytest.raises(OSError if not native else ValueError):
        WrittenWeights(path, short, fallback=None).materialize("w")


def test_written_weights_read_permuted_keys_from_the_fallback_after_the_wait(tmp_path):
    """`permuted_from_fallback` (a data file written with direct I/O): a key written with a
    real permutation (W^T, experts' [E, in, out]) comes from the fallback, in its own axis
    order, and only after `wait(key)`; a key written as it is (the embedding) or with the
    identity permutation stays a map of the file (not the fallback's tensor); without the
    option every key is read from the file."""
    import torch

    from dsc.export.streaming import WrittenWeights

    g = torch.Generator().manual_seed(1)
    own = {
        "w": torch.randn(40, 24, generator=g).half(),
        "experts": torch.randn(3, 20, 30, generator=g).half(),
        "same": torch.randn(2, 5, 6, generator=g).half(),
        "embed": torch.randn(50, 8, generator=g).half(),
    }
    perms = {"w": (1, 0), "experts": (0, 2, 1), "same": (0, 1, 2), "embed": None}
    path = tmp_path / "model.onnx.data"
    entries = _write_data_file(path, own, perms)
    events: list[tuple[str, str]] = []

    class Fallback:  # what the checkpoint holds: the same values, as a new tensor
        def materialize(self, key, *, perm=None):
            assert perm is None
            events.append(("read", key))
            return own[key].clone()

    for option in (True, False):
        events.clear()
        written = WrittenWeights(
            path,
            entries,
            Fallback(),
            wait=lambda key: events.append(("wait", key)),
            permuted_from_fallback=option,
        )
        for key, want in own.items():
            got = written.materialize(key)
            assert got.dtype == want.dtype and torch.equal(got, want), key
        from_fallback = ["w", "experts"] if option else []
        assert [k for e, k in events if e == "read"] == from_fallback
        assert [k for e, k in events if e == "wait"] == list(own)
        for key in from_fallback:  # read once its wait has returned
            assert events.index(("wait", key)) < events.index(("read", key))


def _onloaded_run(src, *, fail_on: str | None = None, advance=None):
    """Logits of the fake fp32 model of `src` run under `onloaded`, and the (state-dict key,
    thread name) of every read; `fail_on`: a key whose read raises a CheckpointError."""
    import threading

    import torch

    from dsc.errors import CheckpointError
    from dsc.export.streaming import CheckpointSources, fake_model, onloaded
    from dsc.models.checkpoint import inspect_checkpoint
    from dsc.models.weights import WeightReader

    info = inspect_checkpoint(src)
    model, buffers, _ = fake_model(info, torch.float32)
    reads: list[tuple[str, str]] = []
    with WeightReader.for_checkpoint(info, dtype=torch.float32) as reader:
        sources = CheckpointSources(model, reader)
        materialize = sources.materialize

        def spy(key, **kw):
            reads.append((key, threading.current_thread().name))
            if key == fail_on:
                raise CheckpointError(f"checkpoint tensor {key} holds NaN values")
            return materialize(key, **kw)

        sources.materialize = spy
        ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
        with torch.no_grad(), onloaded(model, sources, buffers, advance=advance):
            logits = model(input_ids=ids, use_cache=False).logits
    return logits, reads, info, ids


def test_onloaded_advances_once_per_module_with_weights(checkpoints):
    """The range check's progress: one `advance(total=N)` per module that owns weights, N
    that count every time (the modules that read a tensor: one read each)."""
    calls: list[dict] = []
    _, reads, _, _ = _onloaded_run(checkpoints["qwen2"], advance=lambda **kw: calls.append(kw))
    modules = {key.rpartition(".")[0] for key, _ in reads}
    assert len(calls) == len(modules) > 5
    assert all(c == {"total": len(modules)} for c in calls)


@pytest.mark.parametrize("family", ["qwen2", "deepseek_v3"])
def test_onloaded_reads_ahead_on_another_thread(checkpoints, family):
    """The range check's forward with weights read one module at a time, the next module's on
    a second thread: the logits are the whole model's, bit for bit; every tensor is read once;
    the reads ahead did happen; no thread is left behind."""
    import threading

    import torch

    from dsc.models.loading import load_model

    logits, reads, info, ids = _onloaded_run(checkpoints[family])
    whole = load_model(info, "fp32")
    with torch.no_grad():
        want = whole(input_ids=ids, use_cache=False).logits
    assert torch.equal(logits, want)
    keys = [k for k, _ in reads]
    assert len(keys) == len(set(keys)), "a tensor was read twice"
    ahead = [k for k, thread in reads if thread.startswith("dsc-read-ahead")]
    assert len(ahead) > len(keys) // 2, (len(ahead), len(keys))
    assert not [t for t in threading.enumerate() if t.name.startswith("dsc-read-ahead")]


def test_a_failed_read_ahead_fails_the_forward(checkpoints):
    from dsc.errors import CheckpointError

    key = "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(CheckpointError, match=f"{key} holds NaN"):
        _onloaded_run(checkpoints["qwen2"], fail_on=key)
