"""Calibration: run the graph on calibration text and collect what the Q/DQ passes need.

The graph runs in ONNX Runtime (prefill, empty KV cache) with extra graph outputs: the activation
input of every quantizable MatMul, and the top-k expert indices of every MoE router. For each
activation it keeps

- `absmax`: per-channel max |x| (SmoothQuant, AWQ),
- `meanabs`: per-channel mean |x| (AWQ),
- `hist`: a histogram of |x| over [0, `hist_max`], 2048 bins (percentile / entropy / MSE ranges),
- `rows`: a fixed, evenly strided sample of up to `max_rows` activation rows (AWQ output MSE),

and for each router the number of tokens routed to each expert. Everything is deterministic:
the same model and data give bit-identical statistics.

The histogram grows without a second pass: when a batch exceeds its range, the range doubles
and adjacent bins are merged pairwise, which is exact.

Statistics are cached on disk keyed by sha256(model) + sha256(data) (`$DSC_CACHE_DIR`, default
`~/.cache/dsc/calibration`); the ranges derived from them by a method are keyed by the method too.
The cache is bounded: after each write the least recently used files go until it holds at most
`$DSC_CACHE_MAX_GB` GiB (default 8; the file just written always stays). At
R1-Distill-Qwen-1.5B one entry is ~1.5 GB, and an unbounded cache filled a 75 GB disk in a day.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from dsc import paths
from dsc.errors import BadInput, DoesNotFit, UsageError
from dsc.passes.quant.exposure import (  # noqa: F401  (_feeds: also the tests')
    _expose,
    _feeds,
    exposed_activations,
    inline_branches,
)
from dsc.passes.quant.qdq import find_routers, find_targets, range_sources

logger = logging.getLogger(__name__)

BINS = 2048
# Bumped when the set of collected values changes (If branches inlined, copied values).
STATS_VERSION = "v3"  # v3: model_sha256 hashes weights tensor by tensor
MAX_ROWS = 1024


CACHE_MAX_GB = 8.0


def cache_dir() -> Path:
    return paths.cache_dir("calibration")


def cache_max_bytes() -> int:
    """The calibration cache's size bound in bytes: `$DSC_CACHE_MAX_GB` GiB (a float ≥ 0; 0
    keeps only the newest file), default `CACHE_MAX_GB`. Raises UsageError (exit 2) for another
    value."""
    raw = os.environ.get("DSC_CACHE_MAX_GB")
    try:
        gb = CACHE_MAX_GB if raw in (None, "") else float(raw)
    except ValueError:
        gb = -1.0
    if not gb >= 0:
        raise UsageError(f"DSC_CACHE_MAX_GB must be a number of GiB ≥ 0, got {raw!r}")
    return int(gb * 2**30)


def prune_cache(keep: Path | None = None, max_bytes: int | None = None) -> list[Path]:
    """Delete the least recently used cache files (oldest mtime first; a hit refreshes it) until
    the calibration cache holds at most `max_bytes` (default `cache_max_bytes()`). `keep` is
    never deleted. Returns the deleted paths; files that vanish meanwhile are skipped."""
    limit = cache_max_bytes() if max_bytes is None else max_bytes
    entries = []
    for f in cache_dir().glob("*"):
        try:
            st = f.stat()
        except OSError:
            continue
        if f.is_file() and ".tmp-" not in f.name:
            entries.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in entries)
    deleted = []
    for _, size, f in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if keep is not None and f == keep:
            continue
        try:
            f.unlink()
        except OSError:
            continue
        total -= size
        deleted.append(f)
    if deleted:
        logger.info(
            "calibration cache: removed %d least recently used file(s) to stay under %.1f GiB",
            len(deleted),
            limit / 2**30,
        )
    return deleted


@dataclass(frozen=True)
class SpilledRows:
    """Sample rows written to an .npy file in a temporary directory, read back memory-mapped.
    `owner` (the tempfile.TemporaryDirectory) stays alive while any statistics refer to it."""

    path: Path
    owner: object = field(repr=False, compare=False)


class RowSpill:
    """A temporary directory ($TMPDIR) for sample rows; deleted when nothing refers to it."""

    def __init__(self):
        import tempfile

        self.dir = tempfile.TemporaryDirectory(prefix="dsc-rows-")
        self.count = 0
        self.bytes = 0

    def put(self, rows: np.ndarray) -> SpilledRows:
        path = Path(self.dir.name) / f"{self.count}.npy"
        self.count += 1
        self.bytes += rows.nbytes
        np.save(path, rows)
        return SpilledRows(path, self.dir)


@dataclass
class ActStats:
    """Per-channel statistics of one activation: `absmax`, `meanabs` [channels] float32; `hist`
    [BINS] float64 counts of |x| over [0, `hist_max`]; the sample rows [n, channels] float32 in
    memory or spilled to disk (`SpilledRows`; `rows` then maps the file)."""

    absmax: np.ndarray
    meanabs: np.ndarray
    hist: np.ndarray
    hist_max: float
    rows_source: np.ndarray | SpilledRows

    @property
    def rows(self) -> np.ndarray:
        """[n, channels] float32. A read-only memory map when spilled: its pages count as
        resident only while the returned array lives, so use it and let it go."""
        src = self.rows_source
        return np.load(src.path, mmap_mode="r") if isinstance(src, SpilledRows) else src

    @property
    def spilled(self) -> bool:
        return isinstance(self.rows_source, SpilledRows)

    @property
    def amax(self) -> float:
        return float(self.absmax.max())


@dataclass
class CalibStats:
    model_sha256: str
    data_sha256: str
    tokens: int
    acts: dict[str, ActStats] = field(default_factory=dict)
    experts: dict[str, list[int]] = field(default_factory=dict)  # router module -> counts
    seconds: float = 0.0
    cache_hit: bool = False
    # The file these statistics were saved to or loaded from (the cache), if any.
    file: Path | None = field(default=None, compare=False, repr=False)

    def save_or_link(self, path: Path) -> None:
        """`save` to `path`, or when these statistics were saved to or loaded from a file that
        is still there (the cache), hard-link that file: the same arrays without writing them
        again (11 GB at DeepSeek-V2-Lite with AWQ's activation rows). Copies when a link
        cannot be made (another filesystem)."""
        if self.file is not None and self.file.is_file():
            try:
                os.link(self.file, path)
                return
            except OSError:
                pass
        self.save(path)

    def save(self, path: Path) -> None:
        """An uncompressed .npz (np.load reads it), written one array at a time: spilled rows
        are mapped one activation at a time, so saving holds one activation's rows at most."""
        import zipfile

        meta = {
            "model_sha256": self.model_sha256,
            "data_sha256": self.data_sha256,
            "tokens": self.tokens,
            "experts": self.experts,
            "seconds": self.seconds,
            "acts": [[name, s.hist_max] for name, s in self.acts.items()],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npz")

        def arrays():
            for i, st in enumerate(self.acts.values()):
                for k in ("absmax", "meanabs", "hist", "rows"):
                    yield f"{i}.{k}", getattr(st, k)
            yield "meta", np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)

        # Uncompressed: at R1-Distill-Qwen-1.5B the activation rows are ~1.5 GB, which zlib took
        # ~6 minutes per file to shrink by a third on this 2-core host (4 saves per INT8 build).
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for key, arr in arrays():
                    with zf.open(key + ".npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
                    del arr
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path, *, spill: bool = False) -> CalibStats:
        """Statistics saved by `save`. `spill`: the rows go to a `RowSpill` one activation at
        a time (never all in memory), as layer-wise calibration keeps them."""
        spill_to = RowSpill() if spill else None
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            acts = {}
            for i, (name, hmax) in enumerate(meta["acts"]):
                rows = z[f"{i}.rows"]
                if spill_to is not None:
                    rows = spill_to.put(rows)
                acts[name] = ActStats(
                    z[f"{i}.absmax"], z[f"{i}.meanabs"], z[f"{i}.hist"], hmax, rows
                )
        return cls(
            meta["model_sha256"],
            meta["data_sha256"],
            meta["tokens"],
            acts,
            meta["experts"],
            meta["seconds"],
            cache_hit=True,
            file=Path(path),
        )


class _HashWriter:
    """A write-only file object feeding a hash (no `fileno`: onnx_ir copies in chunks)."""

    def __init__(self, h):
        self.write = h.update


def model_sha256(model: ir.Model) -> str:
    """sha256 of the graph and every weight's bytes, read one tensor at a time.

    Not of the serialized proto: that would hold a second copy of every weight in memory,
    cannot exceed 2 GiB, and for external tensors covers only their file offsets, not their
    content.
    """
    h = hashlib.sha256()

    def put(*parts) -> None:
        h.update(("\x1f".join(map(str, parts)) + "\x1e").encode())

    for value in [*model.graph.inputs, *model.graph.outputs]:
        put("io", value.name, value.dtype, value.shape)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        put(
            "node",
            node.domain,
            node.op_type,
            [v.name if v is not None else "" for v in node.inputs],
            [v.name for v in node.outputs],
        )
        for name, a in sorted(node.attributes.items()):
            if a.type == ir.AttributeType.TENSOR:
                put("attr", name, a.value.dtype, a.value.shape)
                h.update(a.value.tobytes())
            elif a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                put("attr", name, a.type)  # the subgraph's nodes are visited in turn
            else:
                put("attr", name, a.type, a.value)
    for name, value in sorted(model.graph.initializers.items()):
        tensor = value.const_value
        put("init", name, value.dtype, value.shape)
        if isinstance(tensor, ir.ExternalTensor):
            # Its bytes as `tobytes` gives them, streamed by onnx_ir's bounded-buffer copy
            # (`tofile` to a writer that hashes): `tobytes` maps the whole data file and copies
            # the tensor (at 7B, 1.09 GB for the embedding table, twice resident).
            try:
                tensor.tofile(_HashWriter(h))
            except OSError as e:
                raise BadInput(f"{tensor.path}: external data of {name}: {e}") from None
        elif tensor is not None:
            h.update(tensor.tobytes())
    return h.hexdigest()


def data_sha256(windows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(windows, dtype=np.int64).tobytes()).hexdigest()


class _Acc:
    def __init__(self, channels: int, stride: int, max_rows: int):
        self.absmax = np.zeros(channels, np.float64)
        self.sumabs = np.zeros(channels, np.float64)
        self.count = 0
        self.hist = np.zeros(BINS, np.float64)
        self.hmax = 0.0
        self.rows: list[np.ndarray] = []
        self.stride, self.max_rows, self.seen = stride, max_rows, 0

    def add(self, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float32)
        a = np.abs(x)
        self.absmax = np.maximum(self.absmax, a.max(axis=0))
        self.sumabs += a.sum(axis=0, dtype=np.float64)
        self.count += a.shape[0]
        m = float(a.max())
        if self.hmax == 0.0:
            self.hmax = max(m, 1e-8)
        while m > self.hmax:  # double the range, merging bin pairs (exact)
            self.hist = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.concatenate([self.hist, np.zeros(BINS // 2)])
            self.hmax *= 2
        h, _ = np.histogram(a, bins=BINS, range=(0.0, self.hmax))
        self.hist += h
        idx = np.arange(x.shape[0]) + self.seen
        keep = x[(idx % self.stride) == 0]
        self.seen += x.shape[0]
        have = sum(r.shape[0] for r in self.rows)
        if have < self.max_rows and keep.size:
            self.rows.append(keep[: self.max_rows - have])

    def stats(self, spill: RowSpill | None = None) -> ActStats:
        rows = (
            np.concatenate(self.rows) if self.rows else np.zeros((0, self.absmax.size), np.float32)
        ).astype(np.float32)
        self.rows = []
        return ActStats(
            self.absmax.astype(np.float32),
            (self.sumabs / max(self.count, 1)).astype(np.float32),
            self.hist,
            self.hmax,
            rows if spill is None else spill.put(rows),
        )


def gathered_expert_bytes(model: ir.Model, tokens: int) -> int:
    """Bytes of expert weights one MoE layer of the export's gather form copies for `tokens`
    tokens: every `GatherND(W[E, a, b], idx)` on a constant expert weight gathers one [a, b]
    matrix per token-slot (tokens × top-k; `dsc.passes.fusion.moe`), summed over the gathers
    of one routing index, largest layer. k is the largest constant K of the graph's TopK
    nodes (the expert choice; group selection takes fewer). 0 without such gathers (no MoE,
    or lowered by `lower-moe`, whose dense branch runs prefill)."""
    from dsc.passes._ir import const_info, const_ints
    from dsc.passes.fusion.moe import expert_gathers

    per_layer = [
        sum(
            w.shape[1] * w.shape[2] * w.dtype.itemsize
            for w in map(const_info, (n.inputs[0] for n in g))
        )
        for g in expert_gathers(model.graph).values()
    ]
    if not per_layer:
        return 0
    k = 1
    for node in model.graph:
        if node.op_type == "TopK" and len(node.inputs) > 1:
            ks = const_ints(node.inputs[1])
            k = max([k, *ks]) if ks else k
    return tokens * k * max(per_layer)


def gather_form_fits(model: ir.Model, tokens: int) -> None:
    """Raise `DoesNotFit` (exit 6) when one calibration batch of `tokens` tokens would gather
    more expert weights (`gathered_expert_bytes`) than half this host's memory, before any
    work: at V2-Lite's width (64 experts of 2 × 1408 × 2048, top-6) a batch of 4 × 128 tokens
    copies 53 GB, which ONNX Runtime otherwise reports as std::bad_alloc deep in a GatherND."""
    need = gathered_expert_bytes(model, tokens)
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > host // 2:
        raise DoesNotFit(
            f"calibrating this graph's MoE experts in the export's gather form would copy "
            f"{need / 1e9:.1f} GB of expert weights per batch of {tokens} tokens (one matrix "
            f"per token and chosen expert), over half this host's {host / 2**30:.0f} GiB; "
            "run `dsc optimize` on it first (its lower-moe pass makes the experts GEMMs), or "
            "`dsc build`"
        )


def collect(
    model: ir.Model,
    io: dict,
    windows: np.ndarray,
    *,
    exclude=(),
    batch: int = 4,
    max_rows: int = MAX_ROWS,
    use_cache: bool = True,
    threads: int | None = None,
    progress=None,
    layerwise: bool = False,
) -> CalibStats:
    """Run `model` on token `windows` [N, L]; statistics for every quantizable MatMul input.

    `layerwise`: run the windows through one decoder layer at a time
    (`dsc.passes.quant.layerwise`), so ONNX Runtime holds one layer's weights instead of the
    model's; the statistics equal the whole graph's, bit for bit or within fp16 steps (see
    that module); each way has its own cache entry."""
    from dsc.backends.onnxruntime.runner import inference_session, spilled

    t0 = time.perf_counter()
    gather_form_fits(model, min(batch, windows.shape[0]) * windows.shape[1])
    if use_cache:
        cache_max_bytes()  # a bad $DSC_CACHE_MAX_GB fails before the work, not after it
    msha, dsha = model_sha256(model), data_sha256(windows)
    # Every target's input is collected whatever the exclusions, so they are not in the key; the
    # row sample size is.
    way = "-layer" if layerwise else ""
    path = cache_dir() / f"{msha[:20]}-{dsha[:20]}-r{int(max_rows)}{way}-{STATS_VERSION}.npz"
    if use_cache and path.is_file():
        try:
            stats = CalibStats.load(path, spill=layerwise)
            if stats.model_sha256 == msha and stats.data_sha256 == dsha:
                logger.info("calibration cache hit: %s", path)
                with contextlib.suppress(OSError):
                    os.utime(path)  # recently used: pruned last
                return stats
        except (OSError, ValueError, KeyError) as e:
            logger.warning("ignoring unreadable calibration cache %s: %s", path, e)

    targets = find_targets(model, exclude, defaults=False)
    # Each activation, then the values it copies (a branch calibration never runs may still
    # read a copy of a calibrated value: that value's range is the activation's range).
    sources = [[v.name for v in range_sources(t.activation)] for t in targets]
    routers = find_routers(model)
    idx_names = [idx.name for _, idx in routers]
    # A bf16 graph is calibrated on its float32 view (ONNX Runtime's CPU provider has no bf16
    # MatMul; same value names, and the statistics are float32 either way).
    with spilled(model) as (source, base_dir):
        proto = ir.to_proto(source)
        conds = {
            n.output[0]: n.input[0]
            for n in proto.graph.node
            if n.op_type == "If" and n.domain in ("", "ai.onnx")
        }
        cond_names = list(dict.fromkeys(conds.values()))
        vals = {v.name: v for n in source.graph.all_nodes() for v in n.outputs}
        # The graph as written: higher levels could also fuse away the exposed tensors.
        sessions: dict[tuple, tuple] = {}

        def session(taken: dict[str, bool]):
            key = tuple(sorted(taken.items()))
            if key not in sessions:
                p = inline_branches(proto, taken)
                acts = exposed_activations(p, sources)
                _expose(p, acts + idx_names + cond_names, vals)
                sess = inference_session(p, base_dir=base_dir, threads=threads)
                sessions[key] = (sess, acts)
            return sessions[key]

        total = int(windows.shape[0] * windows.shape[1])
        stride = max(1, total // max_rows)
        accs: dict[str, _Acc] = {}
        counts: dict[str, np.ndarray] = {}
        n_experts = {mod: _num_experts(model, mod) for mod, _ in routers}
        # Layer-wise, an activation's statistics are final once its segment has run: its rows
        # go to disk then, so memory holds one layer's rows, not every layer's.
        spill = RowSpill() if layerwise else None
        final: dict[str, ActStats] = {}
        touched: set[str] = set()

        def accumulate(got: dict[str, np.ndarray]) -> None:
            for name, x in got.items():
                if name in idx_set:
                    continue
                if name not in accs:
                    accs[name] = _Acc(x.shape[-1], stride, max_rows)
                accs[name].add(x)
                touched.add(name)
            for mod, idx_name in routers_by_idx:
                if idx_name in got:
                    idx = got[idx_name]
                    c = np.bincount(idx.reshape(-1).astype(np.int64), minlength=n_experts[mod] or 0)
                    counts[mod] = counts.get(mod, 0) + c

        def segment_done(_k: int) -> None:
            for name in sorted(touched):
                final[name] = accs.pop(name).stats(spill)
            touched.clear()

        idx_set = set(idx_names)
        routers_by_idx = [(mod, idx.name) for mod, idx in routers]
        if layerwise:
            from dsc.passes.quant.layerwise import collect_layerwise

            collect_layerwise(
                proto,
                base_dir,
                io,
                windows,
                sources=sources,
                idx_names=idx_names,
                conds=conds,
                vals=vals,
                batch=batch,
                threads=threads,
                on_batch=lambda b, got: accumulate(got),
                on_segment=segment_done,
                progress=progress,
            )
        else:
            _collect_whole(
                proto,
                base_dir,
                io,
                windows,
                conds,
                vals,
                session,
                batch,
                threads,
                idx_names,
                accumulate,
                progress,
                t0,
            )
    # One order whichever way the batches ran: targets', then routers' (graph order).
    rank = {n: i for i, n in enumerate(n for src in sources for n in src)}
    final.update((k, a.stats(spill)) for k, a in accs.items())
    acts = dict(sorted(final.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    counts = {mod: counts[mod] for mod, _ in routers if mod in counts}
    stats = CalibStats(
        msha,
        dsha,
        total,
        acts,
        {k: [int(x) for x in v] for k, v in counts.items()},
        seconds=round(time.perf_counter() - t0, 3),
    )
    if use_cache:
        try:
            stats.save(path)
            stats.file = path
            prune_cache(keep=path)
        except OSError as e:
            logger.warning("cannot write the calibration cache %s: %s", path, e)
    return stats


def _collect_whole(
    proto,
    base_dir,
    io,
    windows,
    conds,
    vals,
    session,
    batch,
    threads,
    idx_names,
    accumulate,
    progress,
    t0,
) -> None:
    """The whole graph in one ONNX Runtime session per branch combination, batch by batch."""
    import onnx

    from dsc.backends.onnxruntime.runner import inference_session

    cond_names = list(dict.fromkeys(conds.values()))
    taken: dict[str, bool] = {}
    if conds:
        # The branch each If takes on calibration windows (prefill: MLA expanded, MoE dense
        # unless the batch has fewer token-slots than experts), read from the graph itself.
        p = onnx.ModelProto()
        p.CopyFrom(proto)
        _expose(p, cond_names, vals)
        sess0 = inference_session(p, base_dir=base_dir, threads=threads)
        res = dict(
            zip(cond_names, sess0.run(cond_names, _feeds(io, windows[:batch])), strict=False)
        )
        taken = {k: bool(res[c]) for k, c in conds.items()}
        del sess0, p
    for i in range(0, windows.shape[0], batch):
        feeds = _feeds(io, windows[i : i + batch])
        while True:
            sess, acts = session(taken)
            res = sess.run(acts + idx_names + cond_names, feeds)
            c = dict(zip(cond_names, res[len(acts) + len(idx_names) :], strict=False))
            got = {k: bool(c[v]) for k, v in conds.items()}
            if got == taken:
                break
            taken = got  # this batch takes other branches: run it again on their inlined copy
        accumulate(dict(zip(acts + idx_names, res[: len(acts) + len(idx_names)], strict=False)))
        if progress:
            done, n = i // batch + 1, -(-windows.shape[0] // batch)
            eta = (time.perf_counter() - t0) / done * (n - done)
            progress(
                f"calibration batch {done}/{n}" + (f", about {eta:.0f}s left" if done < n else "")
            )


def _num_experts(model: ir.Model, router: str) -> int:
    """Number of experts of a router: rows of its Gemm/MatMul weight (the router's out-dim)."""
    for node in model.graph:
        if node.op_type in ("Gemm", "MatMul"):
            from dsc.node_meta import module_path

            if (
                module_path(node) == router
                and node.inputs[1] is not None
                and node.inputs[1].shape is not None
            ):
                dims = list(node.inputs[1].shape)
                trans = node.attributes.get_int("transB", 0) if node.op_type == "Gemm" else 0
                d = dims[0] if trans else dims[-1]
                if isinstance(d, int):
                    return d
    return 0


def under_calibrated(experts: dict[str, list[int]], min_tokens: int) -> list[dict]:
    """Every expert that saw fewer than `min_tokens` calibration tokens."""
    out = []
    for router, counts in experts.items():
        layer = router.rsplit(".mlp.gate", 1)[0]
        for e, c in enumerate(counts):
            if c < min_tokens:
                out.append({"router": router, "expert": f"{layer}.mlp.experts.{e}", "tokens": c})
    return out
